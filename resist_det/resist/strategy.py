"""What every mode's strategy shares: the module, optimizer and topology, the transport built
once from ``resist.compression``, and the averaging of shared tensors.

The modes themselves are in :mod:`resist_det.resist.strategies`; the engine's core
(:mod:`resist_det.resist.core`) owns the schedule and calls :meth:`Strategy.sync`.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import nn

from .comm_cost import allreduce_cost
from .config import ResISTConfig
from .optimizer_state import moments, policy, reset_state
from .seeding import mix_seed
from .sparse import SparseAverager
from .sync import average_tensors
from .topology import Topology
from .transport import Codec

__all__ = ["Strategy"]


class Strategy:
    """The base: what every mode shares (module, optimizer, rank, settings)."""

    mode = ""
    #: Whether this mode has rounds (a schedule of local steps and syncs).
    has_rounds = True

    def __init__(self, config: ResISTConfig, module: nn.Module, optimizer: Any, topology: Topology) -> None:
        self.config = config
        self.module = module
        self.optimizer = optimizer
        self.topology = topology
        self.rank = topology.rank
        self.world_size = topology.world
        c = config.compression
        #: How this strategy's sync messages travel (``resist.compression``), built once here.
        self.codec = Codec.from_config(c)
        if (not self.codec.lossless or c.topk is not None) and any(p.is_cuda for p in module.parameters()):
            raise ValueError("resist.compression: compressed transport runs on CPU tensors (gloo) only so far; "
                             "remove the compression section to train on GPUs")
        #: Baselines and error-feedback residuals of top-k averaging (``resist.compression.topk``).
        self.sparse = SparseAverager(c.topk, self.codec) if c.topk is not None else None
        #: This rank's own generator for stochastic rounding (the training RNG stays untouched).
        self.rounding = torch.Generator().manual_seed(mix_seed(config.seed, self.rank)) if c.stochastic else None

    @property
    def workers(self) -> int:
        """S: ranks, or machines with topology ``node``."""
        return self.topology.workers

    def bytes_per_step(self) -> int:
        """Bytes this rank sends inside one optimizer step (not at a sync): with topology ``node``,
        DeepSpeed's gradient all-reduce over the machine's ranks."""
        if self.topology.local_size == 1 or not self.topology.node:
            return 0
        grads = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)
        return allreduce_cost(grads, self.topology.local_size)

    def sync(self, round_index: int, switch: bool) -> int:
        """End round ``round_index``; returns the bytes this rank sent.  Collective."""
        raise NotImplementedError

    def residual_scale(self) -> float:
        """Scale of every partitioned block in the global network."""
        return 1.0

    def global_model(self, dst: int | None, fold: bool) -> tuple[nn.Module | None, int]:
        """The whole network on rank ``dst`` (every rank: ``None``; ``None`` elsewhere), and the bytes this rank sent."""
        return (copy.deepcopy(self.module) if dst in (None, self.rank) else None), 0

    def shared_tensors(self, with_buffers: bool) -> list[torch.Tensor]:
        """The tensors every rank holds and a sync averages over all ranks."""
        return self._tensors(with_buffers)

    def _shared_params(self, skip: list[nn.Module] | None = None) -> list[nn.Parameter]:
        held = set() if skip is None else {id(p) for m in skip for p in m.parameters()}
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in held]

    def state_dict(self) -> dict[str, Any]:
        return {"sparse": self.sparse.state_dict()} if self.sparse is not None else {}

    def load_state_dict(self, state: dict[str, Any], round_index: int) -> None:
        if self.sparse is not None:
            self.sparse.load_state_dict(state.get("sparse", {}))

    # ---- shared by the averaging modes ---------------------------------------------------
    def _with_bn(self, round_index: int) -> bool:
        c = self.config
        return c.bn == "average" and (round_index + 1) % c.bn_sync_rounds == 0

    def _tensors(self, with_buffers: bool, skip: list[nn.Module] | None = None) -> list[torch.Tensor]:
        """The module's trainable parameters (and floating buffers), except those of ``skip``.

        Frozen parameters (a detector's frozen stem) start equal on every rank and never
        change: averaging them would send bytes for nothing."""
        held = set() if skip is None else {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
        out = [p.data for p in self.module.parameters() if p.requires_grad and id(p) not in held]
        if with_buffers:
            out += [b for b in self.module.buffers() if b.is_floating_point() and id(b) not in held]
        return out

    def _agree_inside(self) -> int:
        """Topology ``node``: a machine's replicas hold equal weights and moments (DeepSpeed
        all-reduced every gradient inside it) but their own BN statistics; average those inside
        the machine first, so the sync starts from one copy per machine."""
        if not self.topology.node:
            return 0
        return self.topology.inner_mean([b for b in self.module.buffers() if b.is_floating_point()])

    def _average(self, tensors: list[torch.Tensor]) -> int:
        bucket = int(self.config.bucket_mb * 2**20)
        sparse, top = self.sparse, self.topology
        if sparse is None:
            return average_tensors(tensors, bucket_bytes=bucket, codec=self.codec, generator=self.rounding, topology=top)
        # Top-k with error feedback suits trainable weights, whose changes add up over rounds.  BN
        # statistics and optimizer moments move towards a target within each round (residuals of
        # those would pile up and overshoot), so they travel dense (quantised with ``bits``).
        names = {p.data_ptr(): n for n, p in self.module.named_parameters() if p.requires_grad}
        weights = [t for t in tensors if names.get(t.data_ptr()) is not None]
        rest = [t for t in tensors if names.get(t.data_ptr()) is None]
        key = hashlib.sha256("\0".join(names[t.data_ptr()] for t in weights).encode()).hexdigest()[:16]
        sent = average_tensors(weights, bucket_bytes=1 << 62, codec=self.codec, generator=self.rounding,
                               sparse=sparse, sparse_key=key, topology=top)
        sparse.keep_only(key)  # the set of averaged weights changed (warm-up ended): older states are void
        return sent + average_tensors(rest, bucket_bytes=bucket, codec=self.codec, generator=self.rounding, topology=top)

    def _with_state(self, tensors: list[torch.Tensor], params: list[nn.Parameter]) -> list[torch.Tensor]:
        """``tensors`` plus the optimizer moments of ``params`` when they travel with the weights."""
        return tensors + (moments(self.optimizer, params) if policy(self.config.momentum, self.optimizer) == "average" else [])

    def _reset_optimizer_state(self, arrived: list[nn.Module]) -> None:
        reset_state(self.optimizer, self.config.momentum, [p for m in arrived for p in m.parameters()])
