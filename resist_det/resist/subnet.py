"""A rank's sub-ResNet: the shared layers plus a fixed number of block slots.

``deepspeed.initialize`` broadcasts every parameter from rank 0, so all ranks must hold the
same module structure.  The partitioned section is therefore replaced by a
:class:`SlottedSection`: its unpartitioned blocks (the strided first block) plus ``k`` slots,
each holding one partitioned block.  Which block a slot holds changes every round; new blocks
are copied into the slots in place, so the optimizer's parameter references stay valid.
Blocks run in their global order, whatever slot they sit in.

During the optional local-SGD warm-up (paper section 2.6) a rank holds every block, one per
slot; :meth:`SlottedSection.keep` then shrinks the section to the rank's first ResIST group,
releasing the other slots.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .seeding import network_units, seeded_init_

__all__ = ["SlottedSection", "make_sub_resnet", "get_submodule_parent"]


class SlottedSection(nn.Module):
    """A residual section whose partitionable blocks live in ``k`` slots.

    Args:
        fixed: blocks that every sub-ResNet keeps, with their positions in the section.
        slots: ``k`` blocks of identical structure.
        positions: position (in the original section) of each partitionable block index.
        child_names: the names of the original section's children, in order.
    """

    def __init__(
        self,
        fixed: Sequence[tuple[int, nn.Module]],
        slots: Sequence[nn.Module],
        positions: Sequence[int],
        child_names: Sequence[str],
    ) -> None:
        super().__init__()
        self.fixed = nn.ModuleList([m for _, m in fixed])
        self.fixed_positions = [p for p, _ in fixed]
        self.slots = nn.ModuleList(slots)
        self.positions = list(positions)  # partitionable block index -> position in the section
        self.child_names = list(child_names)  # the original section's child names, by position
        self.slot_blocks: list[int] = []  # block index held by each slot
        self._order: list[nn.Module] = []

    def assign(self, blocks: Sequence[int]) -> None:
        """Record that slot ``i`` now holds block ``blocks[i]`` and rebuild the run order."""
        if len(blocks) != len(self.slots):
            raise ValueError(f"expected {len(self.slots)} blocks for {len(self.slots)} slots, got {len(blocks)}")
        self.slot_blocks = list(blocks)
        seq = [(p, m) for p, m in zip(self.fixed_positions, self.fixed)]
        seq += [(self.positions[b], s) for b, s in zip(blocks, self.slots)]
        self._order = [m for _, m in sorted(seq, key=lambda t: t[0])]

    def keep(self, blocks: Sequence[int]) -> list[nn.Module]:
        """Keep only the slots holding ``blocks`` (slot ``i`` then holds ``blocks[i]``).

        The kept slot modules (and their parameter objects) are reused, not copied.  Returns the
        removed slots: once the caller drops its references to them (an optimizer, say) their
        memory is freed.
        """
        held = dict(zip(self.slot_blocks, self.slots))
        missing = [b for b in blocks if b not in held]
        if missing or len(set(blocks)) != len(blocks):
            raise ValueError(f"cannot keep blocks {list(blocks)}: the slots hold {self.slot_blocks}")
        removed = [m for b, m in held.items() if b not in set(blocks)]
        self.slots = nn.ModuleList([held[b] for b in blocks])
        self.assign(blocks)
        return removed

    def as_sequential(self, blocks: Sequence[nn.Module]) -> nn.Sequential:
        """The original section (an ``nn.Sequential`` with its child names) from copies of the
        fixed blocks and ``blocks[b]`` for every partitionable block ``b``."""
        seq = [(p, copy.deepcopy(m)) for p, m in zip(self.fixed_positions, self.fixed)]
        seq += [(self.positions[b], m) for b, m in enumerate(blocks)]
        return nn.Sequential(OrderedDict((self.child_names[p], m) for p, m in sorted(seq, key=lambda t: t[0])))

    def forward(self, x: Tensor) -> Tensor:
        for m in self._order:
            x = m(x)
        return x


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@torch.no_grad()
def make_sub_resnet(
    model: nn.Module,
    block_names: Sequence[str],
    held: Sequence[int],
    *,
    seed: int = 0,
) -> tuple[nn.Module, SlottedSection, str]:
    """Turn ``model`` in place into a sub-ResNet holding the blocks ``held``.

    ``block_names`` are the partitionable blocks (all in one section, see
    :func:`resist_det.resist.partition.partitionable_blocks`).  Blocks not held are dropped
    before anything else is allocated.  A model built on the meta device is materialised
    unit by unit from ``seed`` (only the shared layers and held blocks ever get memory); a
    real model keeps its own weights and the held blocks keep their parameter objects.

    Returns ``(model, section, section_name)``.
    """
    section_name = block_names[0].rpartition(".")[0]
    section = model.get_submodule(section_name)
    if not isinstance(section, nn.Sequential):
        raise TypeError(f"{section_name!r} must be an nn.Sequential of residual blocks, got {type(section).__name__}")
    child_names = list(section._modules)
    children = list(section.children())
    positions = [child_names.index(n.rpartition(".")[2]) for n in block_names]
    partitioned = set(positions)
    fixed = [(i, children[i]) for i in range(len(children)) if i not in partitioned]
    slots = [children[positions[b]] for b in held]
    container = SlottedSection(fixed, slots, positions, child_names)
    was_meta = any(p.is_meta for p in model.parameters())
    parent, child = get_submodule_parent(model, section_name)
    setattr(parent, child, container)  # the blocks not held are released here
    if was_meta:
        # Materialise only what remains, each unit under its original name so that its
        # weights equal the same unit of a fully built network with this seed.
        model.to_empty(device="cpu")
        for name, unit in network_units(model):
            if not name.startswith(section_name + "."):
                seeded_init_(unit, seed, name)
        for pos, m in fixed:
            seeded_init_(m, seed, f"{section_name}.{child_names[pos]}")
        for b, m in zip(held, slots):
            seeded_init_(m, seed, block_names[b])
    container.assign(held)
    return model, container, section_name
