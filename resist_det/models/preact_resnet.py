"""Pre-activation ResNets for classification (He et al. 2016, "Identity mappings").

The paper's CIFAR "ResNet101" is the *basic-block* pre-activation network with sections
``[3, 4, 23, 3]`` and a 3x3 stem (about 41.4 M parameters with 100 classes);
:func:`cifar_preact_resnet101` builds it.  The standard ResNet101 uses bottlenecks.

Example::

    >>> from resist_det.models import preact_resnet
    >>> net = preact_resnet(18, num_classes=10, stem="cifar")
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .blocks import PreActBasicBlock, PreActBottleneck
from ..depths import PREACT_DEPTHS
from ..resist.seeding import init_network_

__all__ = ["PreActResNet", "preact_resnet", "cifar_preact_resnet101", "DEPTHS"]

BlockType = type[PreActBasicBlock] | type[PreActBottleneck]

#: depth -> (block kind, blocks per section), as in He et al. 2016.
DEPTHS = PREACT_DEPTHS
_BLOCKS: dict[str, BlockType] = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


class PreActResNet(nn.Module):
    """A pre-activation ResNet with sections ``layer1..layer4`` (torchvision's names).

    Args:
        block: :class:`PreActBasicBlock` or :class:`PreActBottleneck`.
        layers: number of blocks in each of the four sections (each >= 1).
        num_classes: classifier outputs.
        in_channels: input image channels (1 for Fashion-MNIST, 3 for CIFAR / ImageNet).
        stem: ``"cifar"`` (3x3 conv, stride 1, no max-pool; for 32x32 inputs) or
            ``"imagenet"`` (7x7 conv stride 2, BN-ReLU, 3x3 max-pool).
        base_width: channels of section 1 (64 in He et al.); sections double it. Small
            widths give fast test and demo networks.
        seed: seed of the per-unit initialisation (see :mod:`resist_det.resist.seeding`).
    """

    #: ResIST partitions section 3 only, as the paper does, so its figures stay reproducible
    #: (``resist.sections`` chooses others).
    resist_sections = ("layer3",)

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: Literal["cifar", "imagenet"] = "imagenet",
        base_width: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 sections, but got {list(layers)}")
        for i, n in enumerate(layers):
            if n < 1:
                raise ValueError(f"layers[{i}] (section {i + 1}) must have at least one block, but got {n}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, but got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, but got {in_channels}")
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, but got {base_width}")
        w = base_width
        self.inplanes = w
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False)
            self.stem = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w, kernel_size=7, stride=2, padding=3, bias=False)
            self.stem = nn.Sequential(nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', but got {stem!r}")
        self.layer1 = self._make_layer(block, w, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2)
        # Pre-activation nets end with the BN-ReLU that the last block left out.
        self.bn_final = nn.BatchNorm2d(8 * w * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w * block.expansion, num_classes)
        if not any(p.is_meta for p in self.parameters()):
            init_network_(self, seed)

    def _make_layer(self, block: BlockType, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.relu(self.bn_final(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def preact_resnet(
    depth: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    block: Literal["basic", "bottleneck"] | None = None,
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: Literal["cifar", "imagenet"] = "imagenet",
    base_width: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> PreActResNet:
    """Build a pre-activation ResNet by depth (18/34/50/101/152/200) or custom section counts.

    ``layers`` overrides the depth's section counts and ``block`` its block kind, so
    ``preact_resnet(101, block="basic", stem="cifar")`` is the paper's CIFAR ResNet101.
    ``device="meta"`` builds the structure without allocating or initialising weights.
    """
    if depth is None and layers is None:
        raise ValueError("give a depth (one of %s) or explicit layers" % sorted(DEPTHS))
    if depth is not None and depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)} (or pass layers=...), but got {depth}")
    kind, default_layers = DEPTHS[depth] if depth is not None else ("basic", None)
    kind = block or kind
    if kind not in _BLOCKS:
        raise ValueError(f"block must be 'basic' or 'bottleneck', but got {kind!r}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return PreActResNet(
            _BLOCKS[kind],
            list(layers if layers is not None else default_layers),
            num_classes=num_classes,
            in_channels=in_channels,
            stem=stem,
            base_width=base_width,
            seed=seed,
        )


def cifar_preact_resnet101(num_classes: int = 100, *, in_channels: int = 3, seed: int = 0, device=None) -> PreActResNet:
    """The paper's CIFAR ResNet101: basic pre-activation blocks, sections [3, 4, 23, 3]."""
    return preact_resnet(101, block="basic", num_classes=num_classes, in_channels=in_channels, stem="cifar", seed=seed, device=device)

