"""A rank's sub-ResNet: the shared layers plus, in each partitioned section, a fixed set of block slots.

``deepspeed.initialize`` broadcasts every parameter from rank 0, so all ranks must hold the
same module structure.  Each partitioned section is therefore replaced by a
:class:`SlottedSection`: its unpartitioned blocks (the strided first block) plus a fixed
number of slots, each holding one partitioned block of that section or nothing.  Which block a
slot holds changes every round; new blocks are copied into the slots in place, so the
optimizer's parameter references stay valid.  Blocks run in their global order, whatever slot
they sit in.

With several sections a sub-ResNet holds a different number of blocks of each section from
round to round (:mod:`resist_det.resist.plan`), so a section has as many slots as a worker can
hold of it, and a slot holding nothing is *empty*: it is skipped in the forward pass and its
tensors have no storage (0 elements), so it costs no memory, no gradient and no optimizer state.

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

from .partition import section_of
from .seeding import network_units, seeded_init_

__all__ = ["SlottedSection", "make_sub_resnet", "get_submodule_parent", "block_tensors"]


def block_tensors(module: nn.Module) -> list[Tensor]:
    """What travels with a block: its parameters and floating-point buffers (BN statistics)."""
    return [p.data for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]


def _storage(module: nn.Module) -> list[Tensor]:
    """The tensors whose storage a slot holds: parameters and floating-point buffers."""
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


class SlottedSection(nn.Module):
    """A residual section whose partitionable blocks live in slots.

    Args:
        fixed: blocks that every sub-ResNet keeps, with their positions in the section.
        slots: blocks of identical structure (full-sized when given).
        positions: position (in the original section) of each of its partitionable blocks.
        child_names: the names of the original section's children, in order.
        first_block: the global index (over all partitioned sections) of its first block.
    """

    def __init__(
        self,
        fixed: Sequence[tuple[int, nn.Module]],
        slots: Sequence[nn.Module],
        positions: Sequence[int],
        child_names: Sequence[str],
        first_block: int = 0,
    ) -> None:
        super().__init__()
        self.fixed = nn.ModuleList([m for _, m in fixed])
        self.fixed_positions = [p for p, _ in fixed]
        self.slots = nn.ModuleList(slots)
        self.positions = list(positions)  # partitionable block index (local) -> position in the section
        self.child_names = list(child_names)  # the original section's child names, by position
        self.first_block = first_block
        self.slot_blocks: list[int | None] = []  # global block index held by each slot (None: empty)
        self._shapes = [t.shape for t in _storage(slots[0])]
        self._order: list[nn.Module] = []

    @property
    def blocks(self) -> range:
        """The global indices of this section's partitionable blocks."""
        return range(self.first_block, self.first_block + len(self.positions))

    def assign(self, blocks: Sequence[int | None]) -> None:
        """Record that slot ``i`` now holds block ``blocks[i]`` (``None``: empty) and rebuild the run order."""
        if len(blocks) != len(self.slots):
            raise ValueError(f"expected {len(self.slots)} entries for {len(self.slots)} slots, got {len(blocks)}")
        self.slot_blocks = list(blocks)
        seq = [(p, m) for p, m in zip(self.fixed_positions, self.fixed)]
        seq += [(self.positions[b - self.first_block], s) for b, s in zip(blocks, self.slots) if b is not None]
        self._order = [m for _, m in sorted(seq, key=lambda t: t[0])]

    # ---- storage of empty slots -----------------------------------------------------------
    def is_empty(self, i: int) -> bool:
        return next(iter(_storage(self.slots[i]))).numel() == 0

    @torch.no_grad()
    def release(self, i: int) -> None:
        """Drop the storage (and gradients) of slot ``i``: it holds no block now."""
        for t in _storage(self.slots[i]):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            if isinstance(t, nn.Parameter):
                t.grad = None

    @torch.no_grad()
    def allocate(self, i: int) -> None:
        """Give an empty slot ``i`` storage again (uninitialised: a block is about to be copied in)."""
        for t, shape in zip(_storage(self.slots[i]), self._shapes):
            if t.shape != shape:
                t.data = torch.empty(shape, dtype=t.dtype, device=t.device)

    def new_block(self) -> nn.Module:
        """A new, uninitialised block of this section's structure (for assembling the global network)."""
        block = copy.deepcopy(self.slots[0])
        for t, shape in zip(_storage(block), self._shapes):
            t.data = torch.empty(shape, dtype=t.dtype, device=t.device)
        return block

    def keep(self, blocks: Sequence[int], num_slots: int | None = None) -> list[nn.Module]:
        """Keep only the slots holding ``blocks`` (slot ``i`` then holds ``blocks[i]``), plus
        empty slots up to ``num_slots``.

        The kept slot modules (and their parameter objects) are reused, not copied.  Returns the
        removed slots: once the caller drops its references to them (an optimizer, say) their
        memory is freed.
        """
        num_slots = len(blocks) if num_slots is None else num_slots
        held = {b: m for b, m in zip(self.slot_blocks, self.slots) if b is not None}
        missing = [b for b in blocks if b not in held]
        if missing or len(set(blocks)) != len(blocks) or num_slots < len(blocks):
            raise ValueError(f"cannot keep blocks {list(blocks)} in {num_slots} slots: the slots hold {self.slot_blocks}")
        others = [m for b, m in held.items() if b not in set(blocks)]
        spare, removed = others[: num_slots - len(blocks)], others[num_slots - len(blocks):]
        self.slots = nn.ModuleList([held[b] for b in blocks] + spare)
        for i in range(len(blocks), num_slots):
            self.release(i)
        self.assign(list(blocks) + [None] * len(spare))
        return removed

    def as_sequential(self, blocks: dict[int, nn.Module]) -> nn.Sequential:
        """The original section (an ``nn.Sequential`` with its child names) from copies of the
        fixed blocks and ``blocks[b]`` for every partitionable block ``b`` of this section."""
        seq = [(p, copy.deepcopy(m)) for p, m in zip(self.fixed_positions, self.fixed)]
        seq += [(self.positions[b - self.first_block], blocks[b]) for b in self.blocks]
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
    slots_per_section: Sequence[int] | None = None,
) -> tuple[nn.Module, list[tuple[str, SlottedSection]]]:
    """Turn ``model`` in place into a sub-ResNet holding the blocks ``held`` (global indices).

    ``block_names`` are the partitionable blocks, section after section (see
    :func:`resist_det.resist.partition.partitionable_blocks`).  Section ``s`` gets
    ``slots_per_section[s]`` slots (default: the blocks of it held, at least one): the held blocks first,
    then empty ones.  Blocks not held are dropped before anything else is allocated.  A model
    built on the meta device is materialised unit by unit from ``seed`` (only the shared layers
    and held blocks ever get memory); a real model keeps its own weights and the held blocks
    keep their parameter objects.

    Returns ``(model, [(section_name, section), ...])``.
    """
    names, sec_of = section_of(block_names)
    was_meta = any(p.is_meta for p in model.parameters())
    out: list[tuple[str, SlottedSection]] = []
    seeded: list[tuple[nn.Module, str]] = []
    for s, section_name in enumerate(names):
        section = model.get_submodule(section_name)
        if not isinstance(section, nn.Sequential):
            raise TypeError(f"{section_name!r} must be an nn.Sequential of residual blocks, got {type(section).__name__}")
        mine = [b for b, t in enumerate(sec_of) if t == s]
        first = mine[0]
        child_names = list(section._modules)
        children = list(section.children())
        positions = [child_names.index(block_names[b].rpartition(".")[2]) for b in mine]
        partitioned = set(positions)
        fixed = [(i, children[i]) for i in range(len(children)) if i not in partitioned]
        held_s = [b for b in held if sec_of[b] == s]
        count = max(1, len(held_s)) if slots_per_section is None else slots_per_section[s]
        if count < max(1, len(held_s)):
            raise ValueError(f"{section_name!r}: {count} slots cannot hold blocks {held_s}")
        spare = [b for b in mine if b not in held_s][: count - len(held_s)]
        slots = [children[positions[b - first]] for b in held_s + spare]
        container = SlottedSection(fixed, slots, positions, child_names, first_block=first)
        parent, child = get_submodule_parent(model, section_name)
        setattr(parent, child, container)  # the blocks not held are released here
        seeded += [(m, f"{section_name}.{child_names[pos]}") for pos, m in fixed]
        seeded += [(m, block_names[b]) for b, m in zip(held_s, slots)]
        container.assign(held_s + [None] * len(spare))
        out.append((section_name, container))
    if was_meta:
        # Materialise only what remains, each unit under its original name so that its
        # weights equal the same unit of a fully built network with this seed.
        model.to_empty(device="cpu")
        for name, unit in network_units(model):
            if not any(name.startswith(n + ".") for n in names):
                seeded_init_(unit, seed, name)
        for m, name in seeded:
            seeded_init_(m, seed, name)
    for _, container in out:
        for i, b in enumerate(container.slot_blocks):
            if b is None:
                container.release(i)
    return model, out
