"""torchvision's (post-activation) ResNets, initialised per unit from a seed.

The detector backbone is torchvision's own ``resnet101``: the same class and blocks, the same
module names (``layer3.5.conv2.weight``...), so torchvision checkpoints load unchanged.  ResIST
scales their residual branches through its adapters (:mod:`resist_det.resist.adapters`).
"""

from __future__ import annotations

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..resist.seeding import init_network_
from ..depths import TORCHVISION_DEPTHS

__all__ = ["resnet", "TV_DEPTHS"]

#: depth -> (torchvision block class, blocks per section).
TV_DEPTHS = {d: ({"basic": BasicBlock, "bottleneck": Bottleneck}[kind], list(layers))
             for d, (kind, layers) in TORCHVISION_DEPTHS.items()}


def resnet(depth: int = 101, *, num_classes: int = 1000, in_channels: int = 3, seed: int = 0,
           device: torch.device | str | None = None) -> ResNet:
    """torchvision ``ResNet`` of the given depth.

    Initialised per unit from ``seed`` (He-normal convolutions, as torchvision), so any
    block can be rebuilt alone; ``device="meta"`` gives the structure only.  ``in_channels``
    other than 3 (grayscale images) changes only the first convolution's input width.
    """
    if depth not in TV_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(TV_DEPTHS)}, but got {depth}")
    block, layers = TV_DEPTHS[depth]
    with torch.device(device or "cpu"):
        model = ResNet(block, layers, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = torch.nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if not any(p.is_meta for p in model.parameters()):
        init_network_(model, seed)
    return model
