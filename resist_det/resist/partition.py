"""Which residual blocks of a network ResIST may partition, and how to scale them.

A block is *partitionable* when it can be left out of a sub-ResNet: its shortcut is the
identity, so skipping it maps a valid input to a valid input.  Strided or width-changing
blocks (a projection shortcut) are always shared.  By default the partitionable blocks are
the non-strided blocks of section 3 (paper section 2.2; 22 of 23 in ResNet101); a regular
expression over module names selects others, e.g. ``r"^layer[23]\\.\\d+$"`` is refused (mixed
shapes) but ``r"^layer3\\.(1[0-9]|2[0-2])$"`` selects the last 13 blocks of section 3.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..models.init import seeded_init_

__all__ = [
    "DEFAULT_SECTION",
    "is_strided",
    "partitionable_blocks",
    "set_residual_scales",
    "residual_scales",
    "build_block",
]

DEFAULT_SECTION = "layer3"


def is_strided(block: nn.Module) -> bool:
    """True when the block changes shape (stride != 1 or a projection shortcut)."""
    for attr in ("downsample", "shortcut"):
        if getattr(block, attr, None) is not None:
            return True
    stride = getattr(block, "stride", 1)
    stride = stride if isinstance(stride, int) else max(stride)
    return stride != 1


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "residual_scale")


def partitionable_blocks(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the blocks ResIST may partition, in network order.

    Args:
        model: a network whose residual blocks carry a ``residual_scale`` attribute (the
            blocks of :mod:`resist_det.models`).
        pattern: regular expression matched (``re.fullmatch``) against module names.  ``None``
            selects every non-strided block of the first module named ``layer3``
            (top level or nested, e.g. ``backbone.layer3``).

    Raises:
        ValueError: the pattern matches nothing, matches a module that is not a scalable
            residual block, matches a strided block, or selects blocks of different shapes
            or in different sections.
    """
    if pattern is None:
        # The first ``layer3`` found, at top level or nested (a detector's ``backbone.layer3``).
        section_name, section = next(
            ((n, m) for n, m in model.named_modules() if n == DEFAULT_SECTION or n.endswith("." + DEFAULT_SECTION)),
            ("", None),
        )
        if not isinstance(section, nn.Sequential):
            return []
        names = [f"{section_name}.{i}" for i, b in enumerate(section) if _is_block(b) and not is_strided(b)]
    else:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"block pattern {pattern!r} is not a valid regular expression: {e}") from None
        names = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
        if not names:
            raise ValueError(f"block pattern {pattern!r} matches no module of {type(model).__name__}")
        modules = dict(model.named_modules())
        for n in names:
            if not _is_block(modules[n]):
                raise ValueError(
                    f"block pattern {pattern!r} matches {n!r}, a {type(modules[n]).__name__}, which is not a "
                    "scalable residual block (use the blocks of resist_det.models)"
                )
            if is_strided(modules[n]):
                raise ValueError(
                    f"block pattern {pattern!r} matches the strided block {n!r}; strided blocks change the "
                    "feature shape and must stay shared"
                )
        parents = {n.rsplit(".", 1)[0] for n in names}
        if len(parents) > 1:
            raise ValueError(f"block pattern {pattern!r} selects blocks of several sections {sorted(parents)}; choose one")
        shapes = {tuple((k, tuple(v.shape)) for k, v in modules[n].state_dict().items()) for n in names}
        if len(shapes) > 1:
            raise ValueError(f"block pattern {pattern!r} selects blocks with different parameter shapes")
    return names


def set_residual_scales(model: nn.Module, scales: Mapping[str, float]) -> nn.Module:
    """Set ``residual_scale`` of the named blocks; unknown names are an error."""
    modules = dict(model.named_modules())
    for name, s in scales.items():
        if name not in modules or not _is_block(modules[name]):
            raise KeyError(f"no scalable residual block named {name!r} in {type(model).__name__}")
        modules[name].residual_scale = float(s)
    return model


def residual_scales(model: nn.Module) -> dict[str, float]:
    """The ``residual_scale`` of every block that is not 1."""
    return {n: float(m.residual_scale) for n, m in model.named_modules() if _is_block(m) and m.residual_scale != 1.0}


def build_block(template: nn.Module, name: str, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """Build block ``name`` of ``template`` alone, initialised from ``(seed, name)``.

    ``template`` may live on the meta device (no memory); the result is bit-identical to the
    same block inside a network built with :func:`resist_det.models.init.init_network_` and
    the same seed.
    """
    modules = dict(template.named_modules())
    if name not in modules:
        raise KeyError(f"no module named {name!r} in {type(template).__name__}")
    block = copy.deepcopy(modules[name]).to_empty(device=device)
    return seeded_init_(block, seed, name)
