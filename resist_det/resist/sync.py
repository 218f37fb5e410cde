"""One ResIST synchronisation round over ``deepspeed.comm`` (paper Algorithm 1, Figure 3).

* Shared tensors are averaged over all ranks with one ``all_reduce`` per flat bucket.
* Each partitioned block is averaged over the ranks that held it (sent point-to-point to one
  *reducer*) and the average is sent point-to-point to the ranks that hold it next.  No
  per-block process groups, no gather on one rank: every rank only ever stores its own blocks
  plus the few in flight.

Every call goes through ``deepspeed.comm`` with ``prof=True``, so DeepSpeed's comms logger,
when enabled, records every message.  Each function also returns the bytes this rank sent
under the costing used by the benchmarks: a ring all-reduce costs ``2 (g - 1) / g`` of the
message per rank in a group of ``g``; a point-to-point message costs its size on the sender.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import deepspeed.comm as dist
import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .plan import Plan, reducer_of
from .sparse import SparseAverager
from .transport import Codec, compressed_average

__all__ = ["block_tensors", "average_tensors", "reducer_of", "route_blocks", "gather_blocks", "ALLREDUCE_LOG", "P2P_LOG"]

ALLREDUCE_LOG = "resist_all_reduce"
P2P_LOG = "resist_p2p"


def block_tensors(module: nn.Module) -> list[Tensor]:
    """What travels with a block: its parameters and floating-point buffers (BN statistics)."""
    return [p.data for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]


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


@torch.no_grad()
def average_tensors(tensors: Sequence[Tensor], *, bucket_bytes: int = 32 << 20, log_name: str = ALLREDUCE_LOG,
                    codec: Codec | None = None, generator: torch.Generator | None = None,
                    sparse: SparseAverager | None = None, sparse_key: str = "") -> int:
    """Replace every tensor by its mean over all ranks; return the bytes this rank sent.

    With a lossy ``codec`` (float32 tensors), each bucket travels quantised through
    :func:`resist_det.resist.transport.compressed_average` (point-to-point messages); with
    ``sparse`` (``resist.compression.topk``), as top-k deltas through :class:`SparseAverager`."""
    world = dist.get_world_size()
    if world == 1 or not tensors:
        return 0
    sent = 0
    for i, bucket in enumerate(_buckets(tensors, bucket_bytes)):
        flat = _flatten_dense_tensors(bucket)
        if sparse is not None and flat.dtype == torch.float32:
            sent += sparse.average(flat, f"{sparse_key}/{i}", _exchange, dist.get_rank(), world, generator)
        elif codec is not None and not codec.lossless and flat.dtype == torch.float32:
            sent += compressed_average(flat, codec, _exchange, dist.get_rank(), world, generator)
        else:
            dist.all_reduce(flat, prof=True, log_name=log_name)
            flat.div_(world)
            sent += round(2 * (world - 1) / world * flat.numel() * flat.element_size())
        for t, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(avg)
    return sent


def _exchange(sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]) -> int:
    """Post all sends and receives as one batch (deadlock-free on NCCL and gloo); wait for them."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops, prof=True, log_name=P2P_LOG):
            req.wait()
    return sum(t.numel() * t.element_size() for t, _, _ in sends)


@torch.no_grad()
def route_blocks(slots: Sequence[nn.Module], slot_blocks: Sequence[int], old: Plan, new: Plan, rank: int,
                 tensors: Callable[[nn.Module], list[Tensor]] = block_tensors, codec: Codec | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Average every partitioned block over its holders in ``old`` and deliver it to ``new``.

    ``slots[i]`` holds block ``slot_blocks[i]`` (this rank's group in ``old``).  On return the
    slots hold this rank's group in ``new``; a block this rank keeps stays in its slot.
    ``tensors(block)`` is what travels with a block (default :func:`block_tensors`; the same
    sizes on every rank).  With a lossy ``codec`` every message is quantised, and a reducer that
    keeps the block it sent keeps the decoded copy, so all holders stay identical.
    Returns ``(new slot_blocks, bytes sent by this rank)``.
    """
    codec = codec or Codec()
    lossless = codec.lossless
    enc = lambda flat: flat if lossless else codec.encode(flat, generator)  # noqa: E731
    dec = lambda buf, n: buf if lossless else codec.decode(buf, n)  # noqa: E731
    block_numel = sum(t.numel() for t in tensors(next(iter(slots))))  # every block's message has this size
    recv_buf = lambda: _flat_buffer(tensors(next(iter(slots)))) if lossless else torch.empty(  # noqa: E731
        codec.encoded_size(block_numel), dtype=torch.uint8)
    num_blocks = 1 + max(max(g) for g in old.groups)
    mine_old = {b: slots[i] for i, b in enumerate(slot_blocks)}
    new_group = new.groups[rank]
    sent = 0

    # Phase 1: every holder but the reducer sends its copy to the reducer, which averages.
    sends, recvs, partial = [], [], {}
    for b in range(num_blocks):
        holders = old.holders(b)
        if len(holders) < 2:
            continue
        r = reducer_of(b, old, new)
        if rank == r:
            own = _flatten_dense_tensors(tensors(mine_old[b]))
            bufs = [recv_buf() for h in holders if h != r]
            recvs += [(buf, h, b) for buf, h in zip(bufs, [h for h in holders if h != r])]
            partial[b] = (own, bufs, len(holders))
        elif rank in holders:
            sends.append((enc(_flatten_dense_tensors(tensors(mine_old[b]))), r, b))
    sent += _exchange(sends, recvs)
    averaged: dict[int, Tensor] = {}
    for b, (own, bufs, count) in partial.items():
        for buf in bufs:
            own.add_(dec(buf, own.numel()))
        averaged[b] = own.div_(count)

    # Phase 2: the reducer sends the average to each next holder.
    sends, recvs, incoming = [], [], {}
    for b in range(num_blocks):
        r = reducer_of(b, old, new)
        targets = [h for h in new.holders(b) if h != r]
        if rank == r and targets:
            flat = averaged.get(b)
            if flat is None:  # a single holder: its copy is the average
                flat = _flatten_dense_tensors(tensors(mine_old[b]))
            message = enc(flat)
            if not lossless:  # what the targets will hold; the reducer keeps the same if it stays a holder
                averaged[b] = codec.decode(message, flat.numel())
            sends += [(message, h, num_blocks + b) for h in targets]
        elif rank in targets:
            buf = recv_buf()
            recvs.append((buf, r, num_blocks + b))
            incoming[b] = buf
    sent += _exchange(sends, recvs)
    incoming = {b: dec(buf, block_numel) for b, buf in incoming.items()}

    # Write the new group into the slots: kept blocks stay, others fill the freed slots.
    new_slot_blocks = list(slot_blocks)
    free = [i for i, b in enumerate(slot_blocks) if b not in new_group]
    for b in new_group:
        if b in mine_old:
            i = slot_blocks.index(b)
        else:
            i = free.pop(0)
            new_slot_blocks[i] = b
        value = incoming.get(b, averaged.get(b))
        if value is None:
            continue  # held alone before and now: already in place
        dst = tensors(slots[i])
        for t, v in zip(dst, _unflatten_dense_tensors(value, dst)):
            t.copy_(v)
    return new_slot_blocks, sent


@torch.no_grad()
def gather_blocks(slots: Sequence[nn.Module], slot_blocks: Sequence[int], plan: Plan, rank: int, dst: int, out: Sequence[nn.Module]) -> int:
    """Copy every partitioned block into ``out[b]`` on rank ``dst`` from one holder each.

    Collective: every rank calls it.  ``out`` is only touched on ``dst``.
    """
    num_blocks = 1 + max(max(g) for g in plan.groups)
    sends, recvs, incoming = [], [], {}
    for b in range(num_blocks):
        src = dst if dst in plan.holders(b) else plan.holders(b)[0]
        if rank == src:
            flat = _flatten_dense_tensors(block_tensors(slots[list(slot_blocks).index(b)]))
            if rank == dst:
                incoming[b] = flat
            else:
                sends.append((flat, dst, b))
        elif rank == dst:
            buf = _flat_buffer(block_tensors(out[b]))
            recvs.append((buf, src, b))
            incoming[b] = buf
    sent = _exchange(sends, recvs)
    if rank == dst:
        for b, flat in incoming.items():
            t = block_tensors(out[b])
            for x, v in zip(t, _unflatten_dense_tensors(flat, t)):
                x.copy_(v)
    return sent
