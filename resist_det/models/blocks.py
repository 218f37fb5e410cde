"""Residual blocks whose residual branch can be scaled: ``y = shortcut(x) + scale * f(x)``.

``residual_scale`` is 1 during training.  ResIST's global network scales each partitioned
block's branch by the probability that a sub-ResNet held it (paper section 2.6), like
inference after stochastic depth.  The scale is a plain attribute, not a parameter or buffer:
it is a property of how the network is assembled, saved beside a checkpoint, never trained.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "PreActBasicBlock",
    "PreActBottleneck",
    "ScalableBasicBlock",
    "ScalableBottleneck",
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
        self.residual_scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return identity + out if self.residual_scale == 1.0 else identity + self.residual_scale * out


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
        self.residual_scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return identity + out if self.residual_scale == 1.0 else identity + self.residual_scale * out


class ScalableBasicBlock(tv_resnet.BasicBlock):
    """torchvision's post-activation basic block with a scalable residual branch.

    Same submodules and parameter names as torchvision, so torchvision weights load unchanged.
    ``y = relu(identity + scale * f(x))``; with scale 0 and a post-ReLU (non-negative) input,
    ``y == x`` exactly.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.residual_scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual_scale != 1.0:
            out = self.residual_scale * out
        return self.relu(out + identity)


class ScalableBottleneck(tv_resnet.Bottleneck):
    """torchvision's post-activation bottleneck with a scalable residual branch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.residual_scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual_scale != 1.0:
            out = self.residual_scale * out
        return self.relu(out + identity)
