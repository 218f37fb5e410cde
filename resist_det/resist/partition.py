"""Which residual blocks of a network ResIST may partition.

A block is *partitionable* when it can be left out of a sub-ResNet: its shortcut is the
identity (:mod:`resist_det.resist.adapters`).  Strided or width-changing blocks are always
shared, so every section keeps its first block and a sub-ResNet always has a path through
every section (where a section of several has no such block, its first block stays shared).  Which sections are partitioned (``resist.sections``):

* a network that names them itself (a ``resist_sections`` attribute, e.g. this project's
  pre-activation ResNets and detector: ``("layer3",)``, the paper's section 3);
* otherwise every ResNet section (a module named ``layerN``, top level or nested as in
  ``backbone.body.layer3``) with a trainable partitionable block: on a stock torchvision
  ``resnet50`` that is 12 blocks holding 65 % of the parameters, where ``layer3`` alone holds 24 %;
* otherwise a vision transformer's ``encoder.layers``.

A regular expression over module names (``resist.block_pattern``) selects blocks instead, e.g.
``r"layer3\\.(1[0-9]|2[0-2])"`` the last 13 blocks of section 3, or ``r"layer[34]\\.[1-9]"``
blocks of two sections.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import adapter_for, unknown_block_error
from .seeding import RESNET_SECTION, seeded_init_

__all__ = ["find_sections", "partitionable_blocks", "section_of", "is_section_name", "build_block"]

# A ResNet section: a module named layerN (or ending in .layerN); a ViT's encoder.
_RESNET_SECTION = re.compile(rf"(^|\.){RESNET_SECTION}$")
_VIT_SECTION = "encoder.layers"


def is_section_name(name: str) -> bool:
    """Whether ``name`` names a ResNet section or a ViT encoder (where blocks may be partitioned)."""
    return bool(_RESNET_SECTION.search(name)) or _matches(name, _VIT_SECTION)


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def _check_section(name: str, section: nn.Module, key: str) -> None:
    if not isinstance(section, nn.Sequential):
        raise TypeError(
            f"{name!r} is a {type(section).__name__}, but ResIST needs a partitioned section to be an nn.Sequential "
            f"of residual blocks; wrap its blocks in an nn.Sequential or choose others with {key}"
        )


def _trainable(block: nn.Module) -> bool:
    return any(p.requires_grad for p in block.parameters())


def find_sections(model: nn.Module, sections: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The partitioned sections of ``model``, in network order: ``[(name, module), ...]``.

    ``sections`` names them (a module name, or its last components, e.g. ``"layer3"`` for
    ``backbone.body.layer3``); ``None`` takes the model's ``resist_sections`` or the default
    (see the module docstring).  An empty list when the model has no section.
    """
    modules = list(model.named_modules())
    key = "resist.sections"
    if sections is None and getattr(model, "resist_sections", None) is not None:
        sections, key = tuple(model.resist_sections), f"{type(model).__name__}.resist_sections"
    if sections is not None:
        found = []
        for wanted in sections:
            hits = [(n, m) for n, m in modules if n and _matches(n, wanted)]
            if not hits:
                raise ValueError(f"{key}: {wanted!r} names no module of {type(model).__name__}")
            name, module = hits[0]
            _check_section(name, module, key)
            found.append((name, module))
        order = {n: i for i, (n, _) in enumerate(modules)}
        return sorted(dict(found).items(), key=lambda nm: order[nm[0]])
    resnet = [(n, m) for n, m in modules if _RESNET_SECTION.search(n)]
    if resnet:
        for name, section in resnet:  # a section of unknown blocks is an error, not skipped in silence
            _check_section(name, section, key)
            _section_blocks(name, section)
        # Frozen sections (a pretrained detector's layer1) never change: partitioning them would
        # only move bytes.
        return [(n, m) for n, m in resnet if any(_partitionable(b) and _trainable(b) for b in m.children())] or resnet[:0]
    vit = [(n, m) for n, m in modules if _matches(n, _VIT_SECTION)]
    if vit:
        _check_section(vit[0][0], vit[0][1], key)
    return vit[:1]


def _partitionable(block: nn.Module) -> bool:
    adapter = adapter_for(block)
    return adapter is not None and adapter.identity(block)


def _section_blocks(name: str, section: nn.Module) -> list[str]:
    for child, b in section.named_children():
        if adapter_for(b) is None:
            raise unknown_block_error(f"{name}.{child}", b)
    return [f"{name}.{child}" for child, b in section.named_children() if _partitionable(b)]


def partitionable_blocks(model: nn.Module, pattern: str | None = None, sections: Sequence[str] | None = None) -> list[str]:
    """Names of the blocks ResIST may partition, in network order (sections one after another).

    Args:
        model: any network whose residual blocks have a registered adapter (torchvision
            ResNets and ViTs, detection backbones, this project's models, ``register_block``).
        pattern: regular expression matched (``re.fullmatch``) against module names
            (``resist.block_pattern``).
        sections: the partitioned sections (``resist.sections``); ``None``: the default.
            Give at most one of ``pattern`` and ``sections``.

    Raises:
        TypeError: a section is not an ``nn.Sequential``, or holds a block of unknown type.
        ValueError: a named section does not exist or has no partitionable block; the pattern
            matches nothing, a module that is not a residual block, or a strided block; the
            blocks of one section differ in shape.
    """
    if pattern is not None and sections is not None:
        raise ValueError("resist.block_pattern and resist.sections both select blocks; give one of them")
    if pattern is None:
        names = []
        chosen = find_sections(model, sections)
        for name, section in chosen:
            found = _section_blocks(name, section)
            if len(chosen) > 1 and len(found) == len(section):
                # No strided block keeps this section in every sub-ResNet (resnet18's layer1):
                # its first block stays shared instead, so no sub-ResNet skips a whole section.
                found = found[1:]
            if not found and sections is not None:
                raise ValueError(f"resist.sections: {name!r} has no partitionable block (every block of it is strided "
                                 "or changes the width); leave it out")
            names += found
        _check_shapes(model, names, "resist.sections")
        return names
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
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in names):
        _check_section(parent, model.get_submodule(parent), "resist.block_pattern")
    _check_shapes(model, names, f"resist.block_pattern {pattern!r}")
    return names


def _check_shapes(model: nn.Module, names: list[str], key: str) -> None:
    """The blocks of one section share a shape (they take turns in the same slots)."""
    modules = dict(model.named_modules())
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in names):
        shapes = {tuple((k, tuple(v.shape)) for k, v in modules[n].state_dict().items())
                  for n in names if n.rpartition(".")[0] == parent}
        if len(shapes) > 1:
            raise ValueError(f"{key} selects blocks of {parent!r} with different parameter shapes")


def section_of(block_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """The sections of ``block_names`` in order, and each block's section index."""
    parents = [n.rpartition(".")[0] for n in block_names]
    sections = list(dict.fromkeys(parents))
    return sections, [sections.index(p) for p in parents]


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
