"""Networks by name, on the meta device (structure only): what ``resist-det plan`` sizes.

* ``cifar-resnet101``: the paper's CIFAR pre-activation ResNet101 (basic blocks);
* ``preact-resnet<depth>``: a pre-activation ResNet (ImageNet stem);
* ``resnet<depth>`` and any other torchvision classification name (``resnet50``,
  ``wide_resnet50_2``, ``resnext50_32x4d``, ``vit_b_16``...): torchvision's stock model;
* ``yolo-resnet<depth>``: this project's detector;
* ``vit-tiny``: a small torchvision ViT for 32x32 images (patch 4, 8 layers, width 128).
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

__all__ = ["build_named_model", "MODEL_NAMES_HELP"]

MODEL_NAMES_HELP = "cifar-resnet101, preact-resnet<depth>, yolo-resnet<depth>, vit-tiny, or a torchvision model name (resnet50, vit_b_16, ...)"


def build_named_model(name: str, num_classes: int = 100) -> nn.Module:
    """The network called ``name`` on the meta device."""
    if name == "cifar-resnet101":
        from .preact_resnet import cifar_preact_resnet101

        return cifar_preact_resnet101(num_classes, device="meta")
    if m := re.fullmatch(r"preact-resnet(\d+)", name):
        from .preact_resnet import preact_resnet

        return preact_resnet(int(m.group(1)), num_classes=num_classes, device="meta")
    if m := re.fullmatch(r"yolo-resnet(\d+)", name):
        from .yolo import yolo_resnet

        return yolo_resnet(int(m.group(1)), num_classes=20, device="meta")
    import torchvision

    with torch.device("meta"):
        if name == "vit-tiny":
            from torchvision.models import VisionTransformer

            return VisionTransformer(image_size=32, patch_size=4, num_layers=8, num_heads=4, hidden_dim=128,
                                     mlp_dim=256, num_classes=num_classes)
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            raise ValueError(f"--model must be {MODEL_NAMES_HELP}; got {name!r}") from None
        kwargs: dict = {"weights": None, "num_classes": num_classes}
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # a detector's backbone would otherwise fetch ImageNet weights
        return builder(**kwargs)
