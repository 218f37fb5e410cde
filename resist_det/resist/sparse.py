"""Top-k sparsified averaging of replicated tensors (``resist.compression.topk``, paper A.5).

Weights cannot be sparsified themselves (a zeroed weight is a destroyed weight), so what travels
is each rank's *change* since the last sync, against a baseline every rank holds identically
(the result of that sync).  Per flat bucket of ``n`` values split into one shard per rank:

1. reduce-scatter: each rank sends, for every other rank's shard, the ``k = ceil(topk * shard)``
   largest-magnitude entries of its delta (int32 indices + values, the values quantised by the
   codec when ``bits`` < 32); the owner adds them to its own (dense) delta and divides by the
   world size;
2. all-gather: the owner sends the ``k`` largest entries of that mean to everyone, and every
   rank, the owner included, adds the same decoded sparse update to the same baseline, so the
   replicas stay bit-identical.

What a rank did not send (stage 1) and what an owner did not send (stage 2) is kept as an
error-feedback residual and added to the next round's delta, so no local progress is lost,
only delayed.  The first sync of a bucket is dense (through the codec) to set the baseline.
Bytes per rank: ``2 (g - 1) k (4 + value bytes)``; at ``topk`` 0.25 and fp32 values that is
half of a ring all-reduce's ``2 (g - 1) / g * 4 n``.

Only tensors every rank holds have a shared baseline; a ResIST block that moves to a new
holder has none there, so routed blocks travel dense (quantised when ``bits`` < 32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .transport import Codec, compressed_average

__all__ = ["SparseAverager", "sparse_message_size"]


def sparse_message_size(k: int, codec: Codec) -> int:
    """Bytes of one sparse message: ``k`` int32 indices and ``k`` encoded values."""
    return 4 * k + codec.encoded_size(k)


@dataclass
class _BucketState:
    baseline: Tensor  # the last sync's result, identical on every rank
    residual: Tensor  # this rank's unsent delta (stage 1), whole bucket
    owner_residual: Tensor  # unsent part of the mean of this rank's own shard (stage 2)


@dataclass
class SparseAverager:
    """Per-bucket baselines and residuals of one rank; call :meth:`average` at every sync."""

    topk: float
    codec: Codec = field(default_factory=Codec)
    states: dict[str, _BucketState] = field(default_factory=dict)

    def average(self, flat: Tensor, key: str, exchange: Callable, rank: int, world: int,
                generator: torch.Generator | None = None) -> int:
        """Replace ``flat`` by the (sparsified) mean over ranks; returns the bytes this rank sent.

        ``key`` names the bucket (the same tensors each round); a new key starts with a dense sync."""
        state = self.states.get(key)
        n = flat.numel()
        if n == 0:
            return 0
        shard = -(-n // world)
        if state is None:
            sent = compressed_average(flat, self.codec, exchange, rank, world, generator)
            self.states[key] = _BucketState(flat.clone(), torch.zeros_like(flat), flat.new_zeros(shard))
            return sent
        k = max(1, math.ceil(self.topk * shard))
        size = sparse_message_size(k, self.codec)
        delta = torch.nn.functional.pad(flat - state.baseline + state.residual, (0, shard * world - n)).view(world, shard)
        residual = delta.clone()
        residual[rank].zero_()  # my own shard enters my mean densely
        # stage 1: my top-k of shard j goes to rank j
        sends = []
        for j in range(world):
            if j != rank:
                idx, values, message = self._select(delta[j], k, generator)
                residual[j].index_add_(0, idx, -values)
                sends.append((message, j, j))
        recvs = [(torch.empty(size, dtype=torch.uint8, device=flat.device), j, rank) for j in range(world) if j != rank]
        sent = exchange(sends, recvs)
        total = delta[rank].clone()
        for buf, _, _ in recvs:
            total.index_add_(0, *self._decode(buf, k))
        mean = total / world + state.owner_residual
        idx, values, mine = self._select(mean, k, generator)
        state.owner_residual = mean.index_add_(0, idx, -values)
        # stage 2: everyone gets every owner's sparse mean
        sends = [(mine, j, world + rank) for j in range(world) if j != rank]
        recvs = [(torch.empty(size, dtype=torch.uint8, device=flat.device), j, world + j) for j in range(world) if j != rank]
        sent += exchange(sends, recvs)
        update = flat.new_zeros(world, shard)
        update[rank].index_add_(0, idx, values)
        for buf, j, _ in recvs:
            update[j].index_add_(0, *self._decode(buf, k))
        state.baseline += update.reshape(-1)[:n]
        state.residual = residual.reshape(-1)[:n].clone()
        flat.copy_(state.baseline)
        return sent

    def _select(self, x: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` largest-magnitude entries of ``x``: indices, the values as every receiver
        decodes them (so residuals account for the rounding too), and the message."""
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        encoded = self.codec.encode(x[idx], generator)
        return idx, self.codec.decode(encoded, k), torch.cat([idx.to(torch.int32).view(torch.uint8), encoded])

    def _decode(self, buf: Tensor, k: int) -> tuple[Tensor, Tensor]:
        idx = buf[: 4 * k].clone().view(torch.int32).long()
        return idx, self.codec.decode(buf[4 * k:], k)

    def keep_only(self, prefix: str) -> None:
        """Drop the states of buckets whose key does not start with ``prefix`` (no longer averaged)."""
        self.states = {k: v for k, v in self.states.items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, Tensor]:
        """Baselines and residuals, for a resume checkpoint (tensors only)."""
        return {f"{key}/{name}": getattr(s, name) for key, s in self.states.items()
                for name in ("baseline", "residual", "owner_residual")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.states = {}
        for name, t in state.items():
            key, field_name = name.rsplit("/", 1)
            self.states.setdefault(key, _BucketState(torch.empty(0), torch.empty(0), torch.empty(0)))
            setattr(self.states[key], field_name, t.clone())
