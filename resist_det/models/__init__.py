"""Networks: pre-activation ResNets (classification), torchvision ResNets with scalable blocks."""

from .blocks import PreActBasicBlock, PreActBottleneck, ScalableBasicBlock, ScalableBottleneck
from .init import init_network_, seeded_init_
from .preact_resnet import DEPTHS, PreActResNet, cifar_preact_resnet101, preact_resnet
from .resnet import resnet

__all__ = [
    "DEPTHS",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "ScalableBasicBlock",
    "ScalableBottleneck",
    "cifar_preact_resnet101",
    "init_network_",
    "preact_resnet",
    "resnet",
    "seeded_init_",
]

from .yolo import VOC_ANCHORS, YOLODetector, decode_predictions, rescale_boxes, yolo_resnet
from .yolo_loss import YOLOv2Loss, assign_targets

__all__ += ["VOC_ANCHORS", "YOLODetector", "YOLOv2Loss", "assign_targets", "decode_predictions", "rescale_boxes", "yolo_resnet"]
