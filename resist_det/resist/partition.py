"""Which residual blocks of a network ResIST may partition.

A block is *partitionable* when it can be left out of a sub-ResNet: its shortcut is the
identity (:mod:`resist_det.resist.adapters`).  Strided or width-changing blocks are always
shared.  By default the partitioned section is the first module named ``layer3`` (a ResNet's
section 3, top level or nested as in ``backbone.body.layer3``; paper section 2.2: 22 of 23
blocks of ResNet101) or, for a vision transformer, its ``encoder.layers``.  A regular
expression over module names selects other blocks of one section, e.g.
``r"layer3\\.(1[0-9]|2[0-2])"`` selects the last 13 blocks of section 3.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .adapters import adapter_for, unknown_block_error
from .seeding import seeded_init_

__all__ = ["DEFAULT_SECTIONS", "find_section", "partitionable_blocks", "build_block"]

#: Where the partitioned section is looked for, in order (a module with this name or ending in it).
DEFAULT_SECTIONS = ("layer3", "encoder.layers")


def find_section(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The default partitioned section of ``model``: ``(name, module)``, or ``None``."""
    modules = list(model.named_modules())
    for suffix in DEFAULT_SECTIONS:
        for name, m in modules:
            if name == suffix or name.endswith("." + suffix):
                return name, m
    return None


def _check_section(name: str, section: nn.Module) -> None:
    if not isinstance(section, nn.Sequential):
        raise TypeError(
            f"{name!r} is a {type(section).__name__}, but ResIST needs the partitioned section to be an nn.Sequential "
            "of residual blocks; wrap its blocks in an nn.Sequential or choose blocks with resist.block_pattern"
        )


def partitionable_blocks(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the blocks ResIST may partition, in network order.

    Args:
        model: any network whose residual blocks have a registered adapter (torchvision
            ResNets and ViTs, detection backbones, this project's models, ``register_block``).
        pattern: regular expression matched (``re.fullmatch``) against module names.  ``None``
            selects every partitionable block of the default section (:data:`DEFAULT_SECTIONS`).

    Raises:
        TypeError: the section is not an ``nn.Sequential``, or holds a block of unknown type.
        ValueError: the pattern matches nothing, matches a module that is not a residual
            block, matches a strided block, or selects blocks of different shapes or sections.
    """
    if pattern is None:
        found = find_section(model)
        if found is None:
            return []
        section_name, section = found
        _check_section(section_name, section)
        for child, b in section.named_children():
            if adapter_for(b) is None:
                raise unknown_block_error(f"{section_name}.{child}", b)
        return [f"{section_name}.{child}" for child, b in section.named_children() if adapter_for(b).identity(b)]
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"resist.block_pattern {pattern!r} is not a valid regular expression: {e}") from None
    modules = dict(model.named_modules())
    names = [n for n in modules if n and rx.fullmatch(n)]
    if not names:
        raise ValueError(f"resist.block_pattern {pattern!r} matches no module of {type(model).__name__}")
    for n in names:
        adapter = adapter_for(modules[n])
        if adapter is None:
            raise ValueError(
                f"resist.block_pattern {pattern!r} matches {n!r}, a {type(modules[n]).__name__}, which is not a "
                "residual block; match the blocks themselves (e.g. 'layer3\\.\\d+') or register the type with "
                "resist_det.register_block"
            )
        if not adapter.identity(modules[n]):
            raise ValueError(
                f"resist.block_pattern {pattern!r} matches the strided block {n!r}; strided blocks change the "
                "feature shape and must stay shared"
            )
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) > 1:
        raise ValueError(f"resist.block_pattern {pattern!r} selects blocks of several sections {sorted(parents)}; choose one")
    _check_section(parents.pop(), model.get_submodule(names[0].rpartition(".")[0]))
    shapes = {tuple((k, tuple(v.shape)) for k, v in modules[n].state_dict().items()) for n in names}
    if len(shapes) > 1:
        raise ValueError(f"resist.block_pattern {pattern!r} selects blocks with different parameter shapes")
    return names


def build_block(template: nn.Module, name: str, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """Build block ``name`` of ``template`` alone, initialised from ``(seed, name)``.

    ``template`` may live on the meta device (no memory); the result is bit-identical to the
    same block inside a network initialised with
    :func:`resist_det.resist.seeding.init_network_` and the same seed.
    """
    modules = dict(template.named_modules())
    if name not in modules:
        raise KeyError(f"no module named {name!r} in {type(template).__name__}")
    block = copy.deepcopy(modules[name]).to_empty(device=device)
    return seeded_init_(block, seed, name)
