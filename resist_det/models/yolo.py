"""YOLOv2-style detector on a torchvision ResNet backbone (ResIST paper, section 5).

The backbone is torchvision's ``ResNet`` (stock blocks) kept under the
attribute ``backbone`` with its torchvision names (``backbone.conv1``, ``backbone.layer3.5``...),
so :func:`resist_det.resist.partition.partitionable_blocks` finds ``backbone.layer3`` and
torchvision checkpoints load with ``strict=False`` (only ``fc`` is gone).  The stride-32 output
of ``layer4`` feeds an optional neck (3x3 conv + BN + LeakyReLU) and the detection layer, a 1x1
convolution with ``A * (5 + C)`` outputs: per anchor ``tx, ty, tw, th, to`` and ``C`` class
logits (Redmon & Farhadi 2017).  A 448x448 input gives a 14x14 grid.

Prediction layout: :meth:`YOLODetector.forward` returns raw (un-activated) predictions
``[B, H, W, A, 5 + C]`` (contiguous), channel order ``tx, ty, tw, th, to, class logits...``.
Decoding them to boxes and scores (with NMS) lives in :mod:`resist_det.models.yolo_decode`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import ResNet

from ..resist.seeding import init_network_
from .resnet import TV_DEPTHS, resnet
from .yolo_decode import (
    VOC_ANCHORS,
    _check_anchors,
    _pair,
    cxcywh_to_xyxy,
    decode_boxes,
    decode_predictions,
    rescale_boxes,
)

__all__ = [
    "VOC_ANCHORS",
    "YOLO_STRIDE",
    "DetectionHead",
    "YOLODetector",
    "yolo_resnet",
    "decode_boxes",
    "decode_predictions",
    "rescale_boxes",
]

YOLO_STRIDE = 32  # output stride of a ResNet's layer4


def _check_multiple_of_stride(h: int, w: int, what: str) -> None:
    if h % YOLO_STRIDE or w % YOLO_STRIDE:
        raise ValueError(
            f"{what} must be a multiple of {YOLO_STRIDE} (the backbone's output stride), got {h}x{w}"
        )


class DetectionHead(nn.Conv2d):
    """The detection layer: a 1x1 convolution to ``A * (5 + C)`` channels (anchor-major).

    Knows its own initialisation (:meth:`seeded_reset_`): ``normal(0, 0.01)`` weights so that
    the initial boxes are the anchors (a He-normal 1x1 conv gives ``tw`` a standard deviation
    of 4 to 8 at init, hence boxes ``e^8`` times too large or small), zero biases except ``logit(objectness_prior)`` on the
    objectness channels, so the ~1000 empty anchors start near "no object".
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, objectness_prior: float = 0.1) -> None:
        if not 0.0 < objectness_prior < 1.0:
            raise ValueError(f"objectness_prior must be in (0, 1), got {objectness_prior}")
        super().__init__(in_channels, num_anchors * (5 + num_classes), kernel_size=1)
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.objectness_prior = float(objectness_prior)

    @torch.no_grad()
    def seeded_reset_(self, generator: torch.Generator) -> None:
        """Initialise in place, weights drawn from ``generator`` (a unit generator)."""
        self.weight.normal_(0.0, 0.01, generator=generator)
        bias = self.bias.view(self.num_anchors, 5 + self.num_classes)
        bias.zero_()
        p = self.objectness_prior
        bias[:, 4] = math.log(p / (1.0 - p))


class YOLODetector(nn.Module):
    """ResNet backbone + optional neck + 1x1 detection layer; see the module docstring.

    Args:
        backbone: a torchvision ``ResNet`` (its ``fc`` is replaced by ``nn.Identity`` and its
            ``avgpool`` is not used).
        num_classes: object classes ``C`` (20 for VOC), no background class.
        anchors: ``A`` anchor priors ``(w, h)`` in grid cells.
        image_size: nominal square input size (multiple of 32); only a default for
            :meth:`decode` and a record of the training resolution - :meth:`forward` accepts
            any ``H, W`` that are multiples of 32.
        neck_channels: width of a 3x3 conv + BN + LeakyReLU(0.1) before the detection layer,
            or 0 for none (the paper's plain 1x1 detection layer).
        objectness_prior: initial ``sigmoid(to)`` (the detection layer's objectness bias), so
            the ~1000 empty anchors start near "no object" instead of 0.5.
    """

    #: ResIST partitions section 3 only, as the paper does, so its figures stay reproducible
    #: (``resist.sections`` chooses others).
    resist_sections = ("layer3",)

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int = 20,
        anchors: Sequence[Sequence[float]] = VOC_ANCHORS,
        image_size: int = 448,
        *,
        neck_channels: int = 0,
        objectness_prior: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, ResNet):
            raise TypeError(f"backbone must be a torchvision ResNet, got {type(backbone).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if neck_channels < 0:
            raise ValueError(f"neck_channels must be >= 0, got {neck_channels}")
        _check_multiple_of_stride(*_pair(image_size, "image_size"), "image_size")
        self.anchors = _check_anchors(anchors)  # a plain attribute: a buffer would make the root an init unit
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.objectness_prior = float(objectness_prior)
        feat = backbone.fc.in_features if isinstance(backbone.fc, nn.Linear) else backbone.inplanes
        backbone.fc = nn.Identity()
        self.backbone = backbone
        device = backbone.conv1.weight.device
        with torch.device(device):
            if neck_channels:
                self.neck: nn.Module = nn.Sequential(
                    nn.Conv2d(feat, neck_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(neck_channels),
                    nn.LeakyReLU(0.1, inplace=True),
                )
                feat = neck_channels
            else:
                self.neck = nn.Identity()
            self.head = DetectionHead(feat, self.num_anchors, self.num_classes, objectness_prior)

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> YOLODetector:
        """Initialise every unit from ``(seed, unit name)`` (:func:`init_network_`); the head
        initialises itself through :meth:`DetectionHead.seeded_reset_`."""
        init_network_(self, seed)
        return self

    def features(self, images: Tensor) -> Tensor:
        """Stride-32 features of ``layer4`` (torchvision's forward without avgpool/fc)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return x

    def forward(self, images: Tensor) -> Tensor:
        """Raw predictions ``[B, H/32, W/32, A, 5 + C]`` for ``images`` ``[B, 3, H, W]``."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        _check_multiple_of_stride(images.shape[-2], images.shape[-1], "input size")
        out = self.head(self.neck(self.features(images)))
        bsz, _, h, w = out.shape
        return out.view(bsz, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2).contiguous()

    def decode(
        self,
        predictions: Tensor,
        image_size: int | Sequence[int] | None = None,
        conf_threshold: float = 0.005,
        nms_iou: float = 0.45,
        max_detections: int = 100,
        pre_nms_top_k: int | None = 5000,
    ) -> list[dict[str, Tensor]]:
        """:func:`decode_predictions` with this detector's anchors; ``image_size`` defaults to
        the grid size times 32 (the input that produced ``predictions``)."""
        if image_size is None:
            image_size = (predictions.shape[1] * YOLO_STRIDE, predictions.shape[2] * YOLO_STRIDE)
        return decode_predictions(
            predictions,
            self.anchors,
            image_size,
            conf_threshold=conf_threshold,
            nms_iou=nms_iou,
            max_detections=max_detections,
            pre_nms_top_k=pre_nms_top_k,
        )

    @torch.no_grad()
    def predict(self, images: Tensor, **decode_kwargs: Any) -> list[dict[str, Tensor]]:
        """Forward + :meth:`decode` (no grad; the caller chooses train/eval mode)."""
        return self.decode(self(images), (images.shape[-2], images.shape[-1]), **decode_kwargs)


def yolo_resnet(
    depth: int = 101,
    *,
    num_classes: int = 20,
    anchors: Sequence[Sequence[float]] = VOC_ANCHORS,
    image_size: int = 448,
    neck_channels: int = 0,
    objectness_prior: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> YOLODetector:
    """YOLOv2-style detector on a torchvision ResNet of ``depth`` (18/34/50/101/152).

    Initialised per unit from ``seed`` (:meth:`YOLODetector.reset_parameters`), so each
    residual block ``backbone.layerN.i`` can be rebuilt alone; ``device="meta"`` gives the
    structure only (no memory, no init).
    """
    if depth not in TV_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(TV_DEPTHS)}, but got {depth}")
    _check_multiple_of_stride(*_pair(image_size, "image_size"), "image_size")
    target = torch.device(device) if device is not None else torch.device("cpu")
    # Build on meta, then allocate once: every parameter is initialised below, so the
    # classifier-network init that resnet() would do on a real device is skipped.
    backbone = resnet(depth, seed=seed, device="meta")
    backbone.fc = nn.Identity()
    if target.type != "meta":
        backbone = backbone.to_empty(device=target)
    model = YOLODetector(
        backbone,
        num_classes,
        anchors,
        image_size,
        neck_channels=neck_channels,
        objectness_prior=objectness_prior,
    )
    if target.type != "meta":
        model.reset_parameters(seed)
    return model
