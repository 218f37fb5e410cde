"""Pre-activation residual blocks (He et al. 2016, "Identity mappings in deep residual networks").

Plain modules: ResIST scales and folds their residual branch through the adapters registered
at the end of this file (:mod:`resist_det.resist.adapters`); the branch of a pre-activation
block ends in its last convolution.
"""

from __future__ import annotations

from torch import Tensor, nn
from ..resist.adapters import register_block

__all__ = [
    "PreActBasicBlock",
    "PreActBottleneck",
]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings in deep residual networks").

    ``bn-relu-conv3x3-bn-relu-conv3x3``; a projection shortcut (1x1 conv on the pre-activated
    input) where the stride or width changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _conv1x1(inplanes, out, stride) if stride != 1 or inplanes != out else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return identity + out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block: ``bn-relu-conv1x1-bn-relu-conv3x3-bn-relu-conv1x1``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _conv1x1(inplanes, out, stride) if stride != 1 or inplanes != out else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return identity + out


register_block(PreActBasicBlock, branch="conv2")
register_block(PreActBottleneck, branch="conv3")
