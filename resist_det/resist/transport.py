"""How a sync's tensors travel: fp32, or quantised to 4-8 bits with one scale per chunk (paper A.5).

A quantised message is one ``uint8`` tensor: the chunk scales (fp32, as bytes) followed by the
codes bit-packed at ``bits`` bits each, so the bytes on the wire are exactly ``numel`` of it.
Quantisation is symmetric: ``q = round(x / s)`` in ``[-L, L]`` with ``L = 2**(bits-1) - 1`` and
``s = max|x| / L`` per chunk, so a value is off by at most ``s / 2`` (nearest rounding) or ``s``
(stochastic rounding, unbiased).

The compressed average never sums codes: each rank owns one shard of the flat bucket; every
rank sends its quantised copy of shard ``j`` to rank ``j`` (reduce-scatter), which dequantises,
averages, re-quantises, and sends the result back to everyone (all-gather).  Every rank, the
owner included, then holds the decoded result, so replicas stay bit-identical.  All messages
are point-to-point through ``deepspeed.comm`` (the comms logger sees them under ``resist_p2p``),
``2 (g - 1) / g`` of the compressed bucket per rank, as a ring all-reduce of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Codec", "compressed_average", "error_bound"]


@dataclass(frozen=True)
class Codec:
    """``bits`` in 4..8 (32: no compression), ``chunk`` elements per scale, nearest or stochastic rounding."""

    bits: int = 32
    chunk: int = 1024
    stochastic: bool = False

    @classmethod
    def from_config(cls, compression) -> Codec:
        """The codec of a ``resist.compression`` section (:class:`~resist_det.resist.config.CompressionConfig`)."""
        return cls(compression.bits, compression.chunk, compression.stochastic)

    @property
    def lossless(self) -> bool:
        return self.bits == 32

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encoded_size(self, numel: int) -> int:
        """Bytes of the message for ``numel`` values."""
        if self.lossless:
            return numel * 4
        chunks = -(-numel // self.chunk)
        return chunks * 4 + -(-numel * self.bits // 8)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A flat fp32 tensor -> one uint8 message (scales, then packed codes)."""
        x = x.detach().reshape(-1).float()
        if self.lossless:
            return x.clone().view(torch.uint8)
        n, c = x.numel(), self.chunk
        padded = torch.nn.functional.pad(x, (0, (-n) % c)).view(-1, c)
        scales = padded.abs().amax(dim=1) / self.levels
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        y = padded / safe[:, None]
        if self.stochastic:
            y = torch.floor(y + torch.rand(y.shape, generator=generator))
        else:
            y = torch.round(y)
        codes = (y.clamp_(-self.levels, self.levels) + self.levels).to(torch.uint8).reshape(-1)[:n]
        return torch.cat([scales.contiguous().view(torch.uint8), _pack(codes, self.bits)])

    def decode(self, message: Tensor, numel: int) -> Tensor:
        """The inverse of :meth:`encode` (up to the quantisation error)."""
        if self.lossless:
            return message.view(torch.float32)[:numel].clone()
        chunks = -(-numel // self.chunk)
        scales = message[: chunks * 4].clone().view(torch.float32)
        codes = _unpack(message[chunks * 4:], self.bits, numel).float() - self.levels
        codes = torch.nn.functional.pad(codes, (0, chunks * self.chunk - numel)).view(chunks, self.chunk)
        return (codes * scales[:, None]).reshape(-1)[:numel]

    def roundtrip(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What a receiver of ``x`` gets."""
        return x if self.lossless else self.decode(self.encode(x, generator), x.numel())


def error_bound(codec: Codec, x: Tensor) -> Tensor:
    """Per-element bound on ``|roundtrip(x) - x|``: half a step (nearest) or a step (stochastic)."""
    if codec.lossless:
        return torch.zeros_like(x)
    n, c = x.numel(), codec.chunk
    step = torch.nn.functional.pad(x.reshape(-1).abs(), (0, (-n) % c)).view(-1, c).amax(1) / codec.levels
    per = step.repeat_interleave(c)[:n].view_as(x)
    return per * (1.0 if codec.stochastic else 0.5) * (1 + 1e-5)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes < 2**bits -> a dense bit stream, ``bits`` bits each, little-endian."""
    if bits == 8:
        return codes
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack(stream: Tensor, bits: int, n: int) -> Tensor:
    if bits == 8:
        return stream[:n]
    bitstream = ((stream[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits].view(n, bits)
    return (bitstream << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def compressed_average(flat: Tensor, codec: Codec, exchange: Callable, rank: int, world: int,
                       generator: torch.Generator | None = None) -> int:
    """Replace ``flat`` by the mean over all ranks through quantised shards; returns bytes sent.

    ``exchange(sends, recvs)`` posts ``(tensor, peer, tag)`` point-to-point messages and waits."""
    n = flat.numel()
    shard = -(-n // world)
    padded = torch.nn.functional.pad(flat, (0, shard * world - n))
    shards = padded.view(world, shard)
    size = codec.encoded_size(shard)
    # reduce-scatter: my copy of shard j goes to rank j
    sends = [(codec.encode(shards[j], generator), j, j) for j in range(world) if j != rank]
    recvs = [(torch.empty(size, dtype=torch.uint8), j, rank) for j in range(world) if j != rank]
    sent = exchange(sends, recvs)
    total = shards[rank].clone()  # my own copy of my shard needs no compression
    for buf, _, _ in recvs:
        total += codec.decode(buf, shard)
    mine = codec.encode(total / world, generator)
    # all-gather: everyone receives every owner's averaged shard
    sends = [(mine, j, world + rank) for j in range(world) if j != rank]
    recvs = [(torch.empty(size, dtype=torch.uint8), j, world + j) for j in range(world) if j != rank]
    sent += exchange(sends, recvs)
    out = torch.empty(world, shard)
    out[rank] = codec.decode(mine, shard)
    for buf, j, _ in recvs:
        out[j] = codec.decode(buf, shard)
    flat.copy_(out.reshape(-1)[:n])
    return sent

