"""Networks: pre-activation ResNets (classification), seeded torchvision ResNets, the YOLOv2-style detector."""

from .blocks import PreActBasicBlock, PreActBottleneck
from .preact_resnet import DEPTHS, PreActResNet, cifar_preact_resnet101, preact_resnet
from .resnet import resnet

__all__ = [
    "DEPTHS",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "cifar_preact_resnet101",
    "preact_resnet",
    "resnet",
]

from .yolo import YOLODetector, yolo_resnet
from .yolo_decode import VOC_ANCHORS, decode_predictions, rescale_boxes
from .yolo_loss import YOLOv2Loss, assign_targets

__all__ += ["VOC_ANCHORS", "YOLODetector", "YOLOv2Loss", "assign_targets", "decode_predictions", "rescale_boxes", "yolo_resnet"]
