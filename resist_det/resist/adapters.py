"""What ResIST needs from a residual block, for unmodified modules.

ResIST asks three things of a block (paper section 2.2 and 2.6):

* can it be skipped? Its shortcut must be the identity (no stride, no projection), so that
  leaving it out of a sub-ResNet maps a valid input to a valid input;
* how to scale its residual branch, ``y = x + s * f(x)`` (post-activation:
  ``y = relu(x + s * f(x))``; a transformer block has two branches, both scaled).  The scale
  is applied by a forward hook on the module that ends each branch, so the user's class and
  its ``state_dict`` keys never change;
* how to fold a scale into the weights: the module ending a branch is affine in its output
  (the last norm of a post-activation branch, the last conv or linear of a pre-activation or
  transformer branch, possibly followed by dropout), so multiplying its ``weight`` and
  ``bias`` by ``s`` equals scaling the branch, exactly.

Adapters are found by type (the first registered class in the block's MRO).  Built in:
torchvision's ``BasicBlock`` / ``Bottleneck`` (ResNet, ResNeXt, Wide-ResNet and the backbones
of ``torchvision.models.detection``), torchvision's ViT ``EncoderBlock``, this project's
pre-activation blocks, and timm's ResNet blocks when timm is installed.  Anything else::

    >>> import torch
    >>> from torch import nn
    >>> class MyBlock(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return x + self.conv(x)
    >>> register_block(MyBlock, branch="conv")
    >>> block = MyBlock()
    >>> set_branch_scale(block, 0.0)
    >>> x = torch.randn(1, 4, 5, 5)
    >>> torch.equal(block(x), x)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BlockAdapter",
    "register_block",
    "adapter_for",
    "is_block",
    "set_branch_scale",
    "branch_scale",
    "fold_branch_scale",
    "unknown_block_error",
]


@dataclass(frozen=True)
class BlockAdapter:
    """How ResIST handles one block type.

    Attributes:
        branches: for a block, the names of the submodules whose output ends each residual
            branch (scaled by a forward hook).
        identity: for a block, whether its shortcut is the identity (it may be partitioned).
        folds: for a block, the names of the affine submodules whose ``weight`` and ``bias``
            absorb a scale, one per branch (default: the last module under each branch end that
            has a ``weight``); ``None`` when the scale cannot be folded exactly.
    """

    branches: Callable[[nn.Module], Sequence[str]]
    identity: Callable[[nn.Module], bool]
    folds: Callable[[nn.Module], Sequence[str] | None] | None = None


_REGISTRY: dict[type, BlockAdapter] = {}
_BUILTINS_LOADED = False


def _as_names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _no_projection(block: nn.Module) -> bool:
    """Identity shortcut: no ``downsample`` / ``shortcut`` module and stride 1."""
    for attr in ("downsample", "shortcut"):
        if getattr(block, attr, None) is not None:
            return False
    stride = getattr(block, "stride", 1)
    return (stride if isinstance(stride, int) else max(stride)) == 1


def register_block(
    block_type: type[nn.Module],
    *,
    branch: str | Sequence[str] | Callable[[nn.Module], Sequence[str]],
    identity: Callable[[nn.Module], bool] | None = None,
    fold: str | Sequence[str] | Callable[[nn.Module], Sequence[str] | None] | None = None,
) -> None:
    """Teach ResIST a residual block type.

    Args:
        block_type: the block class (subclasses are covered too).
        branch: name(s) of the submodule(s) whose output ends each residual branch, i.e. what
            is added to the shortcut; or a function of the block returning them.
        identity: whether a block's shortcut is the identity (default: no ``downsample`` or
            ``shortcut`` submodule and ``stride`` 1).
        fold: name(s) of the affine submodules that absorb the scale (default: the last module
            with a ``weight`` under each branch end).
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"block_type must be an nn.Module subclass, but got {block_type!r}")
    branches = branch if callable(branch) else (lambda _b, names=_as_names(branch): names)
    folds = fold if (fold is None or callable(fold)) else (lambda _b, names=_as_names(fold): names)
    _REGISTRY[block_type] = BlockAdapter(branches=branches, identity=identity or _no_projection, folds=folds)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from torchvision.models import resnet as tv_resnet
    from torchvision.models import vision_transformer as tv_vit

    register_block(tv_resnet.BasicBlock, branch="bn2")
    register_block(tv_resnet.Bottleneck, branch="bn3")
    register_block(tv_vit.EncoderBlock, branch=("self_attention", "mlp"), identity=lambda b: True)
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:  # timm is an optional extra
        return
    # timm's branch: ... -> bnN -> optional SE attention -> drop path -> + shortcut.
    register_block(timm_resnet.BasicBlock, branch=lambda b: ("se",) if b.se is not None else ("bn2",),
                   fold=lambda b: None if b.se is not None else ("bn2",))
    register_block(timm_resnet.Bottleneck, branch=lambda b: ("se",) if b.se is not None else ("bn3",),
                   fold=lambda b: None if b.se is not None else ("bn3",))


def adapter_for(module: nn.Module) -> BlockAdapter | None:
    """The adapter of ``module``'s type (or of its nearest registered base class)."""
    _load_builtins()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def is_block(module: nn.Module) -> bool:
    """True for a residual block of a registered type."""
    return adapter_for(module) is not None


def unknown_block_error(name: str, module: nn.Module) -> TypeError:
    cls = type(module)
    return TypeError(
        f"{name!r} is a {cls.__module__}.{cls.__qualname__}, which ResIST does not know as a residual block; "
        f"register it first: resist_det.register_block({cls.__qualname__}, branch=\"<submodule ending the "
        "residual branch>\")"
    )


def _adapter(block: nn.Module) -> BlockAdapter:
    adapter = adapter_for(block)
    if adapter is None:
        raise unknown_block_error(type(block).__name__, block)
    return adapter


class _BranchScale:
    """Forward hook multiplying a module's output (the first element of a tuple) by ``scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, module: nn.Module, inputs: tuple, output):
        if isinstance(output, tuple):  # nn.MultiheadAttention: (output, attention weights)
            return (output[0] * self.scale, *output[1:])
        return output * self.scale


def _branch_modules(block: nn.Module) -> list[nn.Module]:
    return [block.get_submodule(n) for n in _adapter(block).branches(block)]


def set_branch_scale(block: nn.Module, scale: float) -> None:
    """Scale the residual branch(es) of ``block`` by ``scale`` from now on (1: unscaled)."""
    for m in _branch_modules(block):
        for key in [k for k, h in m._forward_hooks.items() if isinstance(h, _BranchScale)]:
            del m._forward_hooks[key]
        if scale != 1.0:
            m.register_forward_hook(_BranchScale(scale))


def branch_scale(block: nn.Module) -> float:
    """The scale :func:`set_branch_scale` set on ``block`` (1 when none)."""
    for m in _branch_modules(block):
        for h in m._forward_hooks.values():
            if isinstance(h, _BranchScale):
                return h.scale
    return 1.0


def _fold_targets(block: nn.Module) -> list[nn.Module]:
    adapter = _adapter(block)
    if adapter.folds is not None:
        names = adapter.folds(block)
        if names is None:
            raise ValueError(
                f"the residual scale of a {type(block).__name__} cannot be folded into its weights exactly "
                "(its branch ends in a non-linear module); keep the scale as a hook (fold=False)"
            )
        return [block.get_submodule(n) for n in names]
    targets = []
    for end in _branch_modules(block):
        with_weight = [m for m in end.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
        if not with_weight:
            raise ValueError(f"no module with a weight ends the residual branch of {type(block).__name__}; pass fold= to register_block")
        targets.append(with_weight[-1])
    return targets


@torch.no_grad()
def fold_branch_scale(block: nn.Module, scale: float) -> None:
    """Multiply the weights that end each residual branch by ``scale`` (and drop any scale hook).

    Afterwards ``block`` computes exactly what it computed with ``set_branch_scale(block, scale)``
    (up to float rounding), as an ordinary module of its own class.
    """
    targets = _fold_targets(block)
    set_branch_scale(block, 1.0)
    for m in targets:
        m.weight.mul_(scale)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            m.bias.mul_(scale)
