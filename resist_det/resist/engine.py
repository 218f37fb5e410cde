"""The ResIST engine: DeepSpeed's engine + a round schedule + a strategy.

The user's loop does not change::

    engine, optimizer, _, scheduler = resist_det.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    for x, y in loader:
        loss = criterion(engine(x), y)
        engine.backward(loss)
        engine.step()          # every `local_steps` optimizer steps: one synchronisation round

DeepSpeed's full-model gradient all-reduce is switched off (``enable_backward_allreduce``) in
modes ``resist`` and ``local_sgd``; the :class:`~resist_det.resist.schedule.RoundSchedule` says
when a round ends and the mode's :mod:`~resist_det.resist.strategies` class does the sync.
The engine's own surface is listed in :attr:`ResISTEngine.OWN`; any other attribute, read or
written, is DeepSpeed's engine's (``engine.train()``, ``engine.gradient_accumulation_steps()``...).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
from torch import nn

from ..io import atomic_torch_save
from . import checkpoint as ckpt
from .config import ResISTConfig
from .core import ResISTCore
from .strategies import Strategy

__all__ = ["ResISTEngine", "memory_footprint"]


class ResISTEngine:
    """Wraps a ``DeepSpeedEngine``.  Built by :func:`resist_det.initialize`, not directly."""

    #: Attributes that live on this wrapper; everything else is forwarded to DeepSpeed's engine.
    OWN = frozenset({"deepspeed_engine", "config", "core", "grad_clip", "rank", "world_size", "whole"})

    def __init__(self, deepspeed_engine: Any, config: ResISTConfig, strategy: Strategy, *, grad_clip: float = 0.0) -> None:
        self.deepspeed_engine = deepspeed_engine
        self.config = config
        self.core = ResISTCore(config, strategy, on_round=self._monitor_round)
        self.grad_clip = grad_clip
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.whole = None  # the global network while in eval mode (mode resist)

    strategy = property(lambda self: self.core.strategy, doc="the mode's strategy (resist_det.resist.strategies)")
    schedule = property(lambda self: self.core.schedule, doc="the round schedule")
    bytes_sent = property(lambda self: self.core.bytes_sent, doc="bytes this rank sent, all rounds (sync costing)")
    sync_seconds = property(lambda self: self.core.sync_seconds, doc="wall time this rank spent in syncs")

    # ---- forwarding: symmetric, explicit ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Reached only for names not found on the wrapper.
        inner = self.__dict__.get("deepspeed_engine")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(inner, name)
        except AttributeError:
            raise AttributeError(f"neither ResISTEngine nor DeepSpeed's engine has an attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.deepspeed_engine, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.OWN:
            object.__delattr__(self, name)
        else:
            delattr(self.deepspeed_engine, name)

    # ---- what users reach through the engine --------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """This rank's network (its sub-ResNet in mode ``resist``)."""
        return self.deepspeed_engine.module

    @property
    def topology(self) -> Any:
        """Who the workers are (:class:`~resist_det.resist.topology.Topology`: ranks or machines)."""
        return self.strategy.topology

    @property
    def nic_bytes(self) -> int:
        """Of :attr:`bytes_sent`, what this rank sent to ranks on other machines (over its machine's NIC)."""
        return self.core.nic_bytes

    @property
    def optimizer(self) -> Any:
        return self.deepspeed_engine.optimizer

    @property
    def device(self) -> torch.device:
        return self.deepspeed_engine.device

    @property
    def global_steps(self) -> int:
        return self.deepspeed_engine.global_steps

    @property
    def round(self) -> int:
        """Rounds ended so far (warm-up rounds included)."""
        return self.schedule.rounds

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.schedule.steps

    @property
    def local_step(self) -> int:
        """Optimizer steps taken in the current round."""
        return self.schedule.local_step

    @property
    def in_warmup(self) -> bool:
        """True during the local-SGD warm-up of a ``resist`` run (every rank holds every block)."""
        return self.schedule.in_warmup

    # Mode resist only: the plan of the current round and this rank's sub-ResNet.
    plan = property(lambda self: getattr(self.strategy, "plan", None), doc="the current round's plan (mode resist)")
    section = property(lambda self: getattr(self.strategy, "section", None), doc="the slotted section, when one is partitioned")
    sections = property(lambda self: getattr(self.strategy, "sections", []), doc="the slotted sections (mode resist)")
    block_names = property(lambda self: getattr(self.strategy, "block_names", []), doc="partitioned blocks (mode resist)")
    resist_start = property(lambda self: getattr(self.strategy, "resist_start", None), doc="round of ResIST round 0")

    # ---- the user's loop ----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.whole is not None:  # eval mode: the whole network answers
            return self.whole(*args, **kwargs)
        return self.deepspeed_engine(*args, **kwargs)

    def train(self, mode: bool = True) -> ResISTEngine:
        """As ``nn.Module.train``.  In mode ``resist``, ``eval()`` (``train(False)``) assembles the
        global network on every rank, and the engine's forward runs it until ``train()``: a script
        that evaluates through the engine scores the whole network, never one rank's sub-network.
        Collective when it switches to eval (every rank must call it)."""
        self.whole = self.core.network_for(mode, self.whole)
        self.deepspeed_engine.train(mode)
        return self

    def eval(self) -> ResISTEngine:
        return self.train(False)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        return self.deepspeed_engine.backward(loss, **kwargs)

    def step(self, **kwargs: Any) -> None:
        """Optimizer step (at gradient-accumulation boundaries); a sync when the round ends."""
        inner = self.deepspeed_engine
        if self.grad_clip > 0 and inner.is_gradient_accumulation_boundary():
            # Local clipping: DeepSpeed's own clipping all-reduces the norm every step.
            torch.nn.utils.clip_grad_norm_(inner.module.parameters(), self.grad_clip)
        before = inner.global_steps
        inner.step(**kwargs)
        if inner.global_steps != before:
            self.core.after_step()

    def synchronize(self) -> int:
        """End the current round now (e.g. at an epoch end); returns the bytes this rank sent.

        Collective (every rank must call it).  A no-op when no local step was taken since the
        last sync, and in mode ``ddp``.
        """
        return self.core.synchronize()

    def _monitor_round(self, sent: int, seconds: float) -> None:
        """ResIST's figures of the round to DeepSpeed's monitor (TensorBoard, W&B, CSV), when the
        config enables one; DeepSpeed writes on rank 0, so the bytes are rank 0's."""
        monitor = getattr(self.deepspeed_engine, "monitor", None)
        if monitor is None or not monitor.enabled:
            return
        step = self.deepspeed_engine.global_samples
        monitor.write_events([
            ("ResIST/round", self.schedule.rounds, step),
            ("ResIST/bytes_sent_round", sent, step),
            ("ResIST/bytes_sent_total", self.bytes_sent, step),
            ("ResIST/nic_bytes_total", self.nic_bytes, step),  # of those, sent to other machines
            ("ResIST/subnet_parameters", sum(p.numel() for p in self.module.parameters()), step),
            ("ResIST/sync_seconds", seconds, step),
        ])

    # ---- the global network -------------------------------------------------------------------
    def residual_scale(self) -> float:
        """Scale of every partitioned block in the global network (paper section 2.6)."""
        return self.strategy.residual_scale()

    def global_model(self, dst: int = 0, *, fold: bool = True) -> nn.Module | None:
        """The whole network, an ordinary module of the user's class, on rank ``dst`` (``None`` elsewhere).

        Collective.  Each partitioned block comes from one holder; its residual branch is
        scaled by :meth:`residual_scale`, folded into its weights (``fold=True``: the result
        loads into a fresh instance of the user's model with the original ``state_dict`` keys)
        or kept as a forward hook (``fold=False``).  Called mid-round, it first ends the round
        (:meth:`synchronize`), so the copies it stitches together agree.
        """
        return self.core.global_model(dst, fold)

    def export_global_model(self, path: str | Path, dst: int = 0) -> Path | None:
        """Write the global network's ``state_dict`` (the user's own keys, scales folded; tensors
        only, so ``torch.load(path, weights_only=True)`` reads it) on rank ``dst``.  Collective."""
        net = self.global_model(dst)
        if net is None:
            return None
        return atomic_torch_save(net.state_dict(), path)

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """ResIST state for ``save_checkpoint(..., client_state={"resist": engine.state_dict()})``."""
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; load the module's weights after it (the structure may change)."""
        self.core.load_state_dict(state)

    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None, **kwargs: Any) -> bool:
        """DeepSpeed's checkpoint (ResIST state in ``client_state["resist"]``) plus one file per
        rank and a JSON record with every file's checksum (:mod:`resist_det.resist.checkpoint`).
        ``latest`` moves only once all of it is on disk.  Collective."""
        inner = self.deepspeed_engine
        tag = str(tag) if tag is not None else f"global_step{inner.global_steps}"
        client_state = {**(client_state or {}), "resist": self.state_dict()}
        mark_latest = kwargs.pop("save_latest", True)
        ok = inner.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False, **kwargs)
        if self.config.mode != "ddp":
            own: dict[str, Any] = {"resist": self.state_dict()}
            if self.rank != 0:  # rank 0's sub-network and optimizer are in DeepSpeed's own files already
                own.update(module=inner.module.state_dict(), optimizer=inner.optimizer.state_dict())
            ckpt.save_rank_state(save_dir, tag, self.rank, own)
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            ckpt.write_record(save_dir, tag, self.world_size, self.config, mark_latest=mark_latest, step=inner.global_steps)
        dist.barrier()
        return ok

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """Inverse of :meth:`save_checkpoint`; returns DeepSpeed's ``(path, client_state)``.

        Without ``tag``: the newest complete checkpoint.  Every file is checked against its
        recorded checksum, and DeepSpeed's files must load as tensors and plain values
        (``weights_only=True``) before DeepSpeed's own loader, which would run code, reads them."""
        if tag is None:
            tag, note = ckpt.resume_tag(load_dir)
            if note and self.rank == 0:
                print(f"resist_det: {note}", file=sys.stderr, flush=True)
        ckpt.check_checkpoint(load_dir, tag, self.world_size, self.config)  # before anything is loaded
        ckpt.verify_files(load_dir, tag)
        ckpt.check_plain_tensors(Path(load_dir) / str(tag))
        own = ckpt.load_rank_state(load_dir, tag, self.rank) if self.config.mode != "ddp" else None
        if own is not None:
            # First the structure: a checkpoint taken after the warm-up holds only this rank's
            # blocks, so a run resumed in warm-up structure switches before the weights load.
            self.load_state_dict(own["resist"])
        if own is not None and "module" in own:
            # DeepSpeed loads rank 0's module on every rank; this rank's blocks (its slots may be
            # empty where rank 0's are not) come from its own file, just below.
            kwargs.setdefault("custom_load_fn", lambda src, dst: None)
        path, client = self.deepspeed_engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {Path(load_dir) / tag}")
        if own is not None:
            if "module" in own:  # (rank 0's come from DeepSpeed's files)
                self.module.load_state_dict(own["module"])
                self.optimizer.load_state_dict(own["optimizer"])
        else:
            self.load_state_dict(client["resist"])
        return path, client


def memory_footprint(engine: ResISTEngine | Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank, counted from tensors."""
    params = list(engine.module.parameters())
    p = sum(t.numel() * t.element_size() for t in params)
    g = sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    o = 0
    for st in engine.optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                o += v.numel() * v.element_size()
    return {"parameters": p, "gradients": g, "optimizer_state": o, "total": p + g + o}
