"""What both shells share: the round schedule, the mode's strategy and the byte counters.

The DeepSpeed shell (:class:`~resist_det.resist.engine.ResISTEngine`) and the plain-PyTorch
shell (:mod:`resist_det.torch`) only forward to a :class:`ResISTCore`: after every optimizer
step it counts the step's bytes and ends the round when the schedule says so; it assembles the
global network (on one rank, or on every rank for evaluation) and holds the ResIST state a
checkpoint needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import ResISTConfig
from .schedule import RoundSchedule
from .strategies import Strategy

__all__ = ["ResISTCore"]


class ResISTCore:
    """Schedule + strategy + counters of one rank."""

    def __init__(self, config: ResISTConfig, strategy: Strategy,
                 on_round: Callable[[int, float], None] | None = None) -> None:
        self.config = config
        self.strategy = strategy
        warmup = config.warmup_local_sgd_steps if config.mode == "resist" else 0
        self.schedule = RoundSchedule(config.local_steps, warmup)
        self.bytes_sent = 0  # by this rank, all rounds (costing of resist_det.resist.sync)
        self.sync_seconds = 0.0  # wall time this rank spent in syncs (communication and the copies around it)
        self.on_round = on_round  # (bytes sent, seconds) after each round: the DeepSpeed shell's monitor

    @property
    def topology(self) -> Any:
        return self.strategy.topology

    @property
    def nic_bytes(self) -> int:
        return self.strategy.topology.nic_sent

    def after_step(self) -> None:
        """One optimizer step was taken: count its bytes, end the round when it is due."""
        self.bytes_sent += self.strategy.bytes_per_step()
        if self.strategy.has_rounds and self.schedule.step():
            self.end_round()

    def synchronize(self) -> int:
        """End the current round now, if a local step was taken since the last sync.  Collective."""
        if not (self.strategy.has_rounds and self.schedule.pending):
            return 0
        return self.end_round()

    @torch.inference_mode(False)  # a caller's (torchvision's evaluate()): slots given storage here must stay trainable
    @torch.no_grad()  # inside: inference_mode(False) turns gradients back on
    def end_round(self) -> int:
        index, switch = self.schedule.rounds, self.schedule.switch_due
        start = time.perf_counter()
        sent = self.strategy.sync(index, switch)
        seconds = time.perf_counter() - start
        self.schedule.end_round()
        self.bytes_sent += sent
        self.sync_seconds += seconds
        if self.on_round is not None:
            self.on_round(sent, seconds)
        return sent

    def global_model(self, dst: int | None = 0, fold: bool = True) -> nn.Module | None:
        """The whole network on rank ``dst`` (every rank with ``dst=None``).  Collective; ends the round first."""
        # Mid-round the ranks' copies of the shared layers differ: a network stitched from them
        # would be a silent mix, so the round ends here first (every rank is in this call).
        self.synchronize()
        net, sent = self.strategy.global_model(dst, fold)
        self.bytes_sent += sent
        return net

    def network_for(self, training: bool, whole: nn.Module | None) -> nn.Module | None:
        """What a shell's forward runs besides its own module: the global network, assembled on
        every rank (collective) when switching to evaluation in mode ``resist``; ``None`` in
        training, and in modes whose module is already the whole network."""
        if training or not hasattr(self.strategy, "slots"):
            return None
        if whole is None:
            whole = self.global_model(None)
            whole.eval()
        return whole

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "strategy": self.strategy.state_dict(),
                "bytes_sent": self.bytes_sent, "nic_bytes": self.nic_bytes, "world_size": self.strategy.world_size,
                "topology": {"kind": self.topology.kind, "machine_of": list(self.topology.machine_of)},
                "resist": self.config.model_dump(mode="json")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; load the module's weights after it (the structure may change)."""
        if state["world_size"] != self.strategy.world_size:
            raise ValueError(f"ResIST state was saved with world size {state['world_size']}, but this run has "
                             f"{self.strategy.world_size}")
        if state["resist"] != self.config.model_dump(mode="json"):
            raise ValueError("ResIST state was saved with a different 'resist' config section")
        saved, top = state.get("topology", {"kind": "rank"}), self.topology
        if saved["kind"] != top.kind or saved.get("machine_of", list(top.machine_of)) != list(top.machine_of):
            raise ValueError(f"ResIST state was saved with resist.topology {saved['kind']!r} on machines "
                             f"{saved.get('machine_of')}, but this run is {top.kind!r} on {list(top.machine_of)}: "
                             "resume on the same machines")
        self.strategy.load_state_dict(state["strategy"], state["schedule"]["rounds"])
        self.schedule.load_state_dict(state["schedule"])
        self.bytes_sent = state["bytes_sent"]
        top.nic_sent = state.get("nic_bytes", 0)
