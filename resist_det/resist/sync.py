"""One ResIST synchronisation round over ``deepspeed.comm`` (paper Algorithm 1, Figure 3).

* Shared tensors are averaged over all ranks with one ``all_reduce`` per flat bucket.
* Each partitioned block is averaged over the ranks that held it (sent point-to-point to one
  *reducer*) and the average is sent point-to-point to the ranks that hold it next.  No
  per-block process groups, no gather on one rank: every rank only ever stores its own blocks
  plus the few in flight.

Every call goes through ``deepspeed.comm`` with ``prof=True``, so DeepSpeed's comms logger,
when enabled, records every message.  Each function also returns the bytes this rank sent
under the costing of :mod:`resist_det.resist.comm_cost` (ring all-reduce: ``2 (g - 1) / g`` of
the message per rank; point-to-point: the message on the sender).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import deepspeed.comm as dist
import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .comm_cost import ALLREDUCE_LOG, P2P_LOG
from .plan import Plan, reducer_of
from .sparse import SparseAverager
from .subnet import block_tensors
from .topology import Topology
from .transport import Codec, compressed_average

__all__ = ["block_tensors", "average_tensors", "flat_topology", "reducer_of", "route_blocks", "gather_blocks", "ALLREDUCE_LOG",
           "P2P_LOG"]



def _flat_buffer(tensors: Sequence[Tensor]) -> Tensor:
    """An uninitialised flat buffer that a flattened copy of ``tensors`` fits (no copy made)."""
    return torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    out: list[list[Tensor]] = []
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        cur, size = [], 0
        for t in group:
            if cur and size + t.numel() * t.element_size() > bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(t)
            size += t.numel() * t.element_size()
        if cur:
            out.append(cur)
    return out


def flat_topology() -> Topology:
    """Every rank a worker, all on one machine: the topology of a call that names none."""
    return Topology("rank", dist.get_rank(), [0] * dist.get_world_size())


@torch.no_grad()
def average_tensors(tensors: Sequence[Tensor], *, bucket_bytes: int = 32 << 20, log_name: str = ALLREDUCE_LOG,
                    codec: Codec | None = None, generator: torch.Generator | None = None,
                    sparse: SparseAverager | None = None, sparse_key: str = "", topology: Topology | None = None) -> int:
    """Replace every tensor by its mean over the workers; return the bytes this rank sent.

    With a lossy ``codec`` (float32 tensors), each bucket travels quantised through
    :func:`resist_det.resist.transport.compressed_average` (point-to-point messages); with
    ``sparse`` (``resist.compression.topk``), as top-k deltas through :class:`SparseAverager`.
    With a ``node`` ``topology`` the tensors must already agree inside each machine: local rank
    ``j`` averages shard ``j`` of each bucket across machines, then the machine all-gathers."""
    top = topology or flat_topology()
    if top.workers == 1 or not tensors:
        return 0
    sent = 0
    for i, bucket in enumerate(_buckets(tensors, bucket_bytes)):
        flat = _flatten_dense_tensors(bucket)
        part = top.shard(flat)
        if sparse is not None and flat.dtype == torch.float32:
            sent += sparse.average(part, f"{sparse_key}/{i}", top.exchange, top.worker, top.workers, generator)
        elif codec is not None and not codec.lossless and flat.dtype == torch.float32:
            sent += compressed_average(part, codec, top.exchange, top.worker, top.workers, generator)
        else:
            sent += top.all_reduce_mean(part, log_name)
        flat, inside = top.assemble(part, flat.numel())
        sent += inside
        for t, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(avg)
    return sent


def _layout(slot_blocks: Sequence[int | None], slot_section: Sequence[int], section_of: Sequence[int],
            new_group: Sequence[int]) -> list[int | None]:
    """Which block each slot holds after the sync: kept blocks stay in their slot, an arriving
    block takes the first slot of its section that is empty or whose block leaves."""
    out: list[int | None] = [b if b in new_group else None for b in slot_blocks]
    for b in new_group:
        if b in slot_blocks:
            continue
        i = next((i for i, x in enumerate(out) if x is None and slot_section[i] == section_of[b]), None)
        if i is None:
            raise ValueError(f"no free slot of section {section_of[b]} for block {b}: the slots hold {list(slot_blocks)}")
        out[i] = b
    return out


@torch.no_grad()
def route_blocks(slots: Sequence[nn.Module], slot_blocks: Sequence[int | None], old: Plan, new: Plan,
                 topology: Topology, tensors: Callable[[nn.Module], list[Tensor]] = block_tensors,
                 codec: Codec | None = None, generator: torch.Generator | None = None, *,
                 slot_section: Sequence[int] | None = None, section_of: Sequence[int] | None = None,
                 prepare: Callable[[int], None] | None = None,
                 release: Callable[[int], None] | None = None) -> tuple[list[int | None], int]:
    """Average every partitioned block over its holders in ``old`` and deliver it to ``new``.

    ``slots[i]`` holds block ``slot_blocks[i]`` (this worker's group in ``old``; ``None``: an
    empty slot).  With several sections, ``slot_section[i]`` and ``section_of[b]`` say which
    section a slot and a block belong to (a block only ever goes into a slot of its section);
    ``prepare(i)`` gives an empty slot storage before a block arrives in it, ``release(i)``
    drops the storage of a slot left empty.  On return the slots hold this worker's group in
    ``new``; a block this worker keeps stays in its slot.  ``tensors(block)`` is what travels
    with a block (default :func:`block_tensors`; the same sizes on every rank for a block).
    With a lossy ``codec`` every message is quantised, and a reducer that keeps the block it
    sent keeps the decoded copy, so all holders stay identical.  With a ``node`` topology each
    of a machine's ranks carries its shard of every message and the machine all-gathers what
    arrived.  Returns ``(new slot_blocks, bytes sent by this rank)``.
    """
    router = _Router(topology, tensors, codec or Codec(), generator)
    slot_section = [0] * len(slots) if slot_section is None else slot_section
    section_of = [0] * old.num_blocks if section_of is None else section_of
    new_slot_blocks = _layout(slot_blocks, slot_section, section_of, new.groups[topology.worker])
    for i, (a, b) in enumerate(zip(slot_blocks, new_slot_blocks)):
        if a is None and b is not None and prepare is not None:
            prepare(i)  # storage for the block about to arrive (nothing of value is in this slot)
    mine_old = {b: slots[i] for i, b in enumerate(slot_blocks) if b is not None}
    averaged, sent = router.reduce(old, new, mine_old)
    incoming, delivered = router.deliver(old, new, mine_old, averaged, {b: slots[i] for i, b in enumerate(new_slot_blocks)
                                                                        if b is not None})
    sent += delivered
    # Write the new group into the slots (a machine joins its ranks' shards); release the slots left empty.
    for i, b in enumerate(new_slot_blocks):
        value = incoming.get(b, averaged.get(b)) if b is not None else None
        if value is not None:  # (None: held alone before and now, already in place)
            sent += router.write(slots[i], value)
    for i, (a, b) in enumerate(zip(slot_blocks, new_slot_blocks)):
        if a is not None and b is None and release is not None:
            release(i)
    return new_slot_blocks, sent


class _Router:
    """The messages of :func:`route_blocks`: this rank's share of each block (all of it, or its
    shard with topology ``node``), encoded with ``codec``."""

    def __init__(self, topology: Topology, tensors: Callable[[nn.Module], list[Tensor]], codec: Codec,
                 generator: torch.Generator | None) -> None:
        self.top, self.tensors, self.codec, self.generator = topology, tensors, codec, generator

    def part(self, block: nn.Module) -> Tensor:
        return self.top.shard(_flatten_dense_tensors(self.tensors(block)))

    def encode(self, flat: Tensor) -> Tensor:
        return flat if self.codec.lossless else self.codec.encode(flat, self.generator)

    def decode(self, message: Tensor, numel: int) -> Tensor:
        return message if self.codec.lossless else self.codec.decode(message, numel)

    def recv_buf(self, like: nn.Module) -> tuple[Tensor, int]:
        """A buffer for a message about a block sized like ``like``, and the values it carries."""
        shape = self.top.shard(_flat_buffer(self.tensors(like)))  # dtype, device and numel of this rank's share
        if self.codec.lossless:
            return torch.empty_like(shape), shape.numel()
        return torch.empty(self.codec.encoded_size(shape.numel()), dtype=torch.uint8), shape.numel()

    def reduce(self, old: Plan, new: Plan, mine_old: dict[int, nn.Module]) -> tuple[dict[int, Tensor], int]:
        """Phase 1: every holder but the reducer sends its copy to the reducer, which averages."""
        me, sends, recvs, partial = self.top.worker, [], [], {}
        for b in range(old.num_blocks):
            holders = old.holders(b)
            if len(holders) < 2:
                continue
            r = reducer_of(b, old, new)
            if me == r:
                others = [h for h in holders if h != r]
                bufs = [self.recv_buf(mine_old[b])[0] for _ in others]
                recvs += [(buf, h, b) for buf, h in zip(bufs, others)]
                partial[b] = (self.part(mine_old[b]), bufs, len(holders))
            elif me in holders:
                sends.append((self.encode(self.part(mine_old[b])), r, b))
        sent = self.top.exchange(sends, recvs)
        averaged: dict[int, Tensor] = {}
        for b, (own, bufs, count) in partial.items():
            for buf in bufs:
                own.add_(self.decode(buf, own.numel()))
            averaged[b] = own.div_(count)
        return averaged, sent

    def deliver(self, old: Plan, new: Plan, mine_old: dict[int, nn.Module], averaged: dict[int, Tensor],
                slot_of: dict[int, nn.Module]) -> tuple[dict[int, Tensor], int]:
        """Phase 2: the reducer sends the average to each next holder (``averaged`` then holds what
        the holders will hold, decoded); returns the blocks that arrived here."""
        me, sends, recvs, incoming = self.top.worker, [], [], {}
        for b in range(old.num_blocks):
            r = reducer_of(b, old, new)
            targets = [h for h in new.holders(b) if h != r]
            if me == r and targets:
                flat = averaged.get(b)
                if flat is None:  # a single holder: its copy is the average
                    flat = self.part(mine_old[b])
                message = self.encode(flat)
                if not self.codec.lossless:  # the reducer keeps what the targets will hold
                    averaged[b] = self.codec.decode(message, flat.numel())
                sends += [(message, h, old.num_blocks + b) for h in targets]
            elif me in targets:
                buf, numel = self.recv_buf(slot_of[b])  # sized like the block (its section's slot)
                recvs.append((buf, r, old.num_blocks + b))
                incoming[b] = (buf, numel)
        sent = self.top.exchange(sends, recvs)
        return {b: self.decode(buf, n) for b, (buf, n) in incoming.items()}, sent

    def write(self, slot: nn.Module, value: Tensor) -> int:
        """``value`` (this rank's share) into ``slot``, joined with the machine's other shards."""
        dst = self.tensors(slot)
        value, inside = self.top.assemble(value, sum(t.numel() for t in dst))
        for t, v in zip(dst, _unflatten_dense_tensors(value, dst)):
            t.copy_(v)
        return inside


@torch.no_grad()
def gather_blocks(slots: Sequence[nn.Module], slot_blocks: Sequence[int | None], plan: Plan, topology: Topology,
                  dst: int | None, out: Sequence[nn.Module]) -> int:
    """Copy every partitioned block into ``out[b]`` on global rank ``dst`` (every rank: ``None``),
    from one holder each.

    Collective: every rank calls it.  ``out`` is only touched on the receiving ranks.
    """
    rank, top = topology.rank, topology
    dsts = range(top.world) if dst is None else [dst]
    sends, recvs, incoming = [], [], {}
    for b in range(plan.num_blocks):
        holders = plan.holders(b)
        for d in dsts:
            src = d if top.worker_of(d) in holders else top.first_rank(holders[0])
            if rank == src:
                flat = _flatten_dense_tensors(block_tensors(slots[list(slot_blocks).index(b)]))
                if rank == d:
                    incoming[b] = flat
                else:
                    sends.append((flat, d, b))
            elif rank == d:
                buf = _flat_buffer(block_tensors(out[b]))
                recvs.append((buf, src, b))
                incoming[b] = buf
    sent = top.send_to_rank(sends, recvs)
    for b, flat in incoming.items():
        t = block_tensors(out[b])
        for x, v in zip(t, _unflatten_dense_tensors(flat, t)):
            x.copy_(v)
    return sent
