"""Seeded, per-unit initialisation.

Every residual block (and every other parameterised unit of a network) draws its initial
weights from its own generator, seeded by ``(seed, unit name)``.  A worker can therefore build
and initialise just the blocks it holds, bit-identical to the same blocks inside a fully built
network, without materialising the rest (DESIGN: "build blocks from per-block seeds").
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

__all__ = ["mix_seed", "unit_generator", "seeded_init_", "init_network_", "network_units"]

#: A ResNet section's name (torchvision's ``layer1`` ... ``layer4``), the one rule used everywhere.
RESNET_SECTION = r"layer\d+"
# A child of a ResNet section is one residual block: the unit of partitioning.
_BLOCK_NAME = re.compile(rf"(^|\.){RESNET_SECTION}\.\d+$")


def mix_seed(seed: int, salt: int) -> int:
    """One seed from a run's ``seed`` and a ``salt`` (a unit's name hash, a rank): the seeding rule."""
    return (int(seed) * 1_000_003 + int(salt)) % (2**63 - 1)


def unit_generator(seed: int, unit: str) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and the unit's name."""
    return torch.Generator().manual_seed(mix_seed(seed, zlib.crc32(unit.encode())))


@torch.no_grad()
def seeded_init_(module: nn.Module, seed: int, unit: str) -> nn.Module:
    """Initialise every parameter of ``module`` in place from the generator of ``(seed, unit)``.

    Convolutions: He-normal (fan_out, ReLU) as torchvision's ResNets; norms: weight 1, bias 0;
    linear layers: normal(0, 0.01) weights and zero bias; a module with a ``seeded_reset_(generator)``
    method initialises itself.  Modules are visited in registration
    order, so the result does not depend on what surrounds ``module``.
    """
    g = unit_generator(seed, unit)
    for m in module.modules():
        if hasattr(m, "seeded_reset_"):
            m.seeded_reset_(g)  # a layer with its own initialisation rule (e.g. a detection head)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 0.01, generator=g)
            if m.bias is not None:
                m.bias.zero_()
        elif any(True for _ in m.parameters(recurse=False)):
            # Left as it is, a module materialised from the meta device would hold garbage.
            raise TypeError(
                f"seeded initialisation does not know {type(m).__name__} (in unit {unit!r}); build the model on a "
                "real device instead of 'meta', or give the module a seeded_reset_(generator) method"
            )
    return module


def network_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Split a ResNet-like model into initialisation units.

    Each residual block (``layerN.i``, also nested, e.g. ``backbone.layer3.4``) is a unit; every other module that owns parameters
    directly (stem convolution, final norm, classifier, detection head) is a unit of its own.
    """
    units: list[tuple[str, nn.Module]] = []
    inside_block: set[str] = set()
    for name, m in model.named_modules():
        if _BLOCK_NAME.search(name):
            units.append((name, m))
            inside_block.add(name)
            continue
        if any(name.startswith(b + ".") for b in inside_block):
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            units.append((name, m))
    return units


def init_network_(model: nn.Module, seed: int) -> nn.Module:
    """Initialise a whole network unit by unit (see :func:`seeded_init_`)."""
    for name, unit in network_units(model):
        seeded_init_(unit, seed, name)
    return model
