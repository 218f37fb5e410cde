"""The ResIST engine: a thin shell around DeepSpeed's engine.

The user's loop does not change::

    engine, optimizer, _, scheduler = resist_det.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    for x, y in loader:
        loss = criterion(engine(x), y)
        engine.backward(loss)
        engine.step()          # every `local_steps` optimizer steps: one synchronisation round

DeepSpeed's full-model gradient all-reduce is switched off (``enable_backward_allreduce``);
each rank trains its own sub-ResNet, and :meth:`ResISTEngine.synchronize` averages the shared
layers and routes the partitioned blocks (:mod:`resist_det.resist.sync`).  Everything the
engine does not define is DeepSpeed's (``engine.module``, ``engine.save_checkpoint`` ...).

With ``resist.warmup_local_sgd_steps`` = W > 0 (paper section 2.6) a ``resist`` run starts with
local SGD on the whole network: every rank holds every partitioned block, each block's
residual branch scaled by :meth:`ResISTEngine.residual_scale` (the paper's footnote 2), and a
sync averages every tensor.  The first sync at or after step W (one is forced at step W)
switches to ResIST: each rank keeps its group of plan round 0, drops the other
blocks (module, optimizer and DeepSpeed's name map: their memory is freed), unscales the kept
blocks, and the next round is ResIST round 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deepspeed.comm as dist

from ..io import atomic_torch_save
from .config import ResISTConfig
from .partition import set_residual_scales
from .plan import Plan, inclusion_probability, iter_plans
from .subnet import SlottedSection, get_submodule_parent
from .sync import average_tensors, gather_blocks, route_blocks

__all__ = ["ResISTEngine", "memory_footprint", "rank_file"]


class ResISTEngine:
    """Wraps a ``DeepSpeedEngine``; ``mode`` is ``resist``, ``local_sgd`` or ``ddp``.

    Built by :func:`resist_det.initialize`, not directly.
    """

    def __init__(
        self,
        engine: Any,
        config: ResISTConfig,
        *,
        block_names: list[str] | None = None,
        section: SlottedSection | None = None,
        section_name: str | None = None,
        grad_clip: float = 0.0,
    ) -> None:
        self.engine = engine
        self.config = config
        self.block_names = block_names or []
        self.section = section
        self.section_name = section_name
        self.grad_clip = grad_clip
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.round = 0  # index of the current round (its plan is self.plan), warm-up rounds included
        self.local_step = 0  # optimizer steps taken in the current round
        self.steps = 0  # optimizer steps taken, all rounds
        self.bytes_sent = 0  # by this rank, all rounds (costing of resist_det.resist.sync)
        # The round that is ResIST round 0 (plan round = round - resist_start); None during the warm-up.
        self.resist_start: int | None = None
        self._plans: Iterator[Plan] | None = None
        self.plan: Plan | None = None
        if config.mode == "resist":
            if config.warmup_local_sgd_steps > 0:
                self._begin_warmup()
            else:
                self.resist_start = 0
                self._restart_plans(0)

    # ---- the user's loop ---------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        return self.engine.backward(loss, **kwargs)

    def step(self, **kwargs: Any) -> None:
        """Optimizer step (at gradient-accumulation boundaries); a sync every ``local_steps`` steps."""
        if self.grad_clip > 0 and self.engine.is_gradient_accumulation_boundary():
            # Local clipping: DeepSpeed's own clipping all-reduces the norm every step.
            torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.grad_clip)
        before = self.engine.global_steps
        self.engine.step(**kwargs)
        if self.engine.global_steps == before:
            return
        self.steps += 1
        if self.config.mode == "ddp":
            # DeepSpeed all-reduced every gradient once for this step (ring costing).
            g = self.world_size
            grads = sum(p.numel() * p.element_size() for p in self.engine.module.parameters() if p.requires_grad)
            self.bytes_sent += round(2 * (g - 1) / g * grads)
            return
        self.local_step += 1
        if self.local_step >= self.config.local_steps or self._warmup_over():
            self.synchronize()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class does not define: defer to DeepSpeed's engine.
        return getattr(self.__dict__["engine"], name)

    # ---- the local-SGD warm-up ---------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        """True during the local-SGD warm-up of a ``resist`` run (every rank holds every block)."""
        return self.config.mode == "resist" and self.resist_start is None

    def _warmup_over(self) -> bool:
        return self.in_warmup and self.steps >= self.config.warmup_local_sgd_steps

    def _begin_warmup(self) -> None:
        n = len(self.block_names)
        if self.section.slot_blocks != list(range(n)):
            raise ValueError("the local-SGD warm-up needs every partitioned block in a slot (build the engine with resist_det.initialize)")
        self.plan = Plan(round=-1, groups=(tuple(range(n)),) * self.world_size)  # every rank holds every block
        for slot in self.section.slots:
            slot.residual_scale = self.residual_scale()  # paper footnote 2: scaled as in the global network

    def _end_warmup(self, blocks: list[int] | tuple[int, ...]) -> None:
        """Keep only ``blocks`` (in this slot order) and train them unscaled, as ResIST does.

        The other blocks leave the module, the optimizer (parameter groups and state) and
        DeepSpeed's parameter-name map, so nothing keeps their memory alive.
        """
        removed = self.section.keep(blocks)
        gone = {id(p) for m in removed for p in m.parameters()}
        opt = self.engine.optimizer
        # Keep the module's order (slot order), as at a switch in round 0: a checkpoint's optimizer
        # state, stored by position, then fits an engine that switches on resume.
        order = {id(p): i for i, p in enumerate(self.engine.module.parameters())}
        for group in opt.param_groups:
            kept = [p for p in group["params"] if id(p) not in gone]
            group["params"] = sorted(kept, key=lambda p: order.get(id(p), len(order)))
        for p in [p for p in opt.state if id(p) in gone]:
            del opt.state[p]
        if hasattr(self.engine, "param_names"):  # DeepSpeed's checkpoint name map, keyed by parameter
            self.engine.param_names = {p: n for n, p in self.engine.module.named_parameters()}
        for slot in self.section.slots:
            slot.residual_scale = 1.0

    # ---- synchronisation ---------------------------------------------------------------
    def _restart_plans(self, plan_round: int) -> None:
        """Walk the plans from ResIST round ``plan_round`` (the engine's round minus ``resist_start``)."""
        c = self.config
        self._plans = iter_plans(c.seed, self.world_size, len(self.block_names), c.min_blocks, start=plan_round)
        self.plan = next(self._plans)

    def shared_tensors(self, with_buffers: bool) -> list[torch.Tensor]:
        """Tensors every rank holds: all but the partitioned slots (all of them outside resist
        and during the warm-up)."""
        slots = self.section.slots if self.section is not None and not self.in_warmup else nn.ModuleList()
        skip = {id(p) for p in slots.parameters()} | {id(b) for b in slots.buffers()}
        out = [p.data for p in self.engine.module.parameters() if id(p) not in skip]
        if with_buffers:
            out += [b for b in self.engine.module.buffers() if b.is_floating_point() and id(b) not in skip]
        return out

    @torch.no_grad()
    def synchronize(self) -> int:
        """End the current round now: average shared layers, route blocks, start the next round.

        During the warm-up every tensor is averaged; the first sync after
        ``warmup_local_sgd_steps`` steps then switches to ResIST.  Collective (every rank must
        call it).  Returns the bytes this rank sent.
        """
        c = self.config
        if c.mode == "ddp":
            return 0
        with_bn = c.bn == "average" and (self.round + 1) % c.bn_sync_rounds == 0
        sent = average_tensors(self.shared_tensors(with_bn), bucket_bytes=int(c.bucket_mb * 2**20))
        changed: set[int] = set()
        if self.in_warmup:
            if self._warmup_over():
                self._restart_plans(0)
                self._end_warmup(self.plan.groups[self.rank])
                self.resist_start = self.round + 1
        elif c.mode == "resist":
            old = self.plan
            new = next(self._plans)
            before = list(self.section.slot_blocks)
            slot_blocks, p2p = route_blocks(self.section.slots, before, old, new, self.rank)
            self.section.assign(slot_blocks)
            sent += p2p
            changed = {i for i, (a, b) in enumerate(zip(before, slot_blocks)) if a != b}
            self.plan = new
        self.round += 1
        self.local_step = 0
        self._reset_optimizer_state(changed)
        self.bytes_sent += sent
        return sent

    def _reset_optimizer_state(self, changed_slots: set[int]) -> None:
        opt = self.engine.optimizer
        if self.config.momentum == "restart":
            opt.state.clear()  # paper: momentum restarts every round
            return
        # "keep": a block that arrived from another rank brings no optimizer state.
        for i in changed_slots:
            for p in self.section.slots[i].parameters():
                opt.state.pop(p, None)

    # ---- the global network ------------------------------------------------------------
    def residual_scale(self) -> float:
        """Scale of every partitioned block in the global network (paper section 2.6)."""
        c = self.config
        if c.mode != "resist":
            return 1.0
        if c.scale == "inverse_s":
            return 1.0 / self.world_size
        return inclusion_probability(self.world_size, len(self.block_names), c.min_blocks)

    @torch.no_grad()
    def global_model(self, dst: int = 0) -> nn.Module | None:
        """The whole network as an ordinary ``nn.Module`` on rank ``dst`` (``None`` elsewhere).

        Collective.  Each partitioned block comes from one holder; its residual branch is
        scaled by :meth:`residual_scale`.  Call it right after a synchronisation (e.g. after
        :meth:`synchronize`), when every copy of a tensor agrees.  (During the warm-up every
        rank holds every block: nothing is sent.)
        """
        module = self.engine.module
        if self.config.mode != "resist":
            return copy.deepcopy(module) if self.rank == dst else None
        section = self.section
        blocks: list[nn.Module] = []
        if self.rank == dst:
            blocks = [copy.deepcopy(section.slots[0]) for _ in self.block_names]
        self.bytes_sent += gather_blocks(section.slots, section.slot_blocks, self.plan, self.rank, dst, blocks)
        if self.rank != dst:
            return None
        # Rebuild the original section (an nn.Sequential) around a copy of the shared layers.
        parent, child = get_submodule_parent(module, self.section_name)
        placeholder = nn.Identity()
        setattr(parent, child, placeholder)
        try:
            net = copy.deepcopy(module)
        finally:
            setattr(parent, child, section)
        seq: list[tuple[int, nn.Module]] = [(p, copy.deepcopy(m)) for p, m in zip(section.fixed_positions, section.fixed)]
        seq += [(section.positions[b], blk) for b, blk in enumerate(blocks)]
        new_parent, _ = get_submodule_parent(net, self.section_name)
        setattr(new_parent, child, nn.Sequential(*[m for _, m in sorted(seq, key=lambda t: t[0])]))
        s = self.residual_scale()
        set_residual_scales(net, {n: s for n in self.block_names})
        return net

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """ResIST state for ``save_checkpoint(..., client_state={"resist": engine.state_dict()})``."""
        return {
            "round": self.round,
            "local_step": self.local_step,
            "steps": self.steps,
            "resist_start": self.resist_start,
            "bytes_sent": self.bytes_sent,
            "world_size": self.world_size,
            "config_digest": self.config.digest(),
            "slot_blocks": list(self.section.slot_blocks) if self.section is not None else None,
        }

    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None, **kwargs: Any) -> bool:
        """DeepSpeed's checkpoint (ResIST state in ``client_state["resist"]``) plus one file per rank.

        DeepSpeed saves rank 0's module and optimizer only; under ResIST each rank holds other
        blocks (and, mid-round, other weights), so each rank also writes its own module and
        optimizer state, atomically.  Collective.
        """
        tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
        client_state = {**(client_state or {}), "resist": self.state_dict()}
        ok = self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, **kwargs)
        if self.config.mode != "ddp":
            atomic_torch_save(
                {
                    "module": self.engine.module.state_dict(),
                    "optimizer": self.engine.optimizer.state_dict(),
                    "resist": self.state_dict(),
                },
                rank_file(save_dir, tag, self.rank),
            )
        dist.barrier()
        return ok

    def check_checkpoint(self, load_dir: str | Path, tag: str) -> dict[str, Any]:
        """Read this rank's ResIST state from a checkpoint, refusing a different world size or
        ``resist`` section; changes nothing."""
        if self.config.mode == "ddp":
            return {}
        path = rank_file(load_dir, tag, self.rank)
        saved = sorted(p.name for p in (Path(load_dir) / tag).glob("resist_rank*.pt"))
        if len(saved) != self.world_size or not path.is_file():
            raise ValueError(
                f"checkpoint {Path(load_dir) / tag} was written by {len(saved)} ranks, but this run has {self.world_size}"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        self._check_state(state["resist"])
        return state

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """Inverse of :meth:`save_checkpoint`; returns DeepSpeed's ``(path, client_state)``."""
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"no checkpoint in {load_dir} (no 'latest' file)")
            tag = latest.read_text().strip()
        own = self.check_checkpoint(load_dir, tag)  # before anything is loaded
        if own:
            # First the structure: a checkpoint taken after the warm-up holds only this rank's
            # blocks, so a run resumed in warm-up structure switches before the weights load.
            self.load_state_dict(own["resist"])
        path, client = self.engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {Path(load_dir) / tag}")
        if own:
            self.engine.module.load_state_dict(own["module"])
            self.engine.optimizer.load_state_dict(own["optimizer"])
        else:
            self.load_state_dict(client["resist"])
        return path, client

    def _check_state(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"ResIST state was saved with world size {state['world_size']}, but this run has {self.world_size}"
            )
        if state["config_digest"] != self.config.digest():
            raise ValueError("ResIST state was saved with a different 'resist' config section")
        if self.config.mode == "resist" and not self.in_warmup and state["resist_start"] is None:
            raise ValueError(
                "ResIST state was saved during the local-SGD warm-up, but this engine has already switched to "
                "ResIST; load it into a freshly initialized engine"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`.  State saved after the warm-up ends the warm-up of an
        engine still in it (its extra blocks are dropped); load the module's weights after."""
        self._check_state(state)
        self.local_step = state["local_step"]
        self.steps = state["steps"]
        self.bytes_sent = state["bytes_sent"]
        start = state["resist_start"]
        if self.config.mode == "resist" and start is not None:
            self._restart_plans(state["round"] - start)
            if self.in_warmup:
                self._end_warmup(state["slot_blocks"])
            else:
                self.section.assign(state["slot_blocks"])
            self.resist_start = start
        self.round = state["round"]


def rank_file(checkpoint_dir: str | Path, tag: str, rank: int) -> Path:
    """Where a rank keeps what only it holds (its sub-ResNet and optimizer state)."""
    return Path(checkpoint_dir) / str(tag) / f"resist_rank{rank:02d}.pt"


def memory_footprint(engine: ResISTEngine | Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank, counted from tensors."""
    inner = engine.engine if isinstance(engine, ResISTEngine) else engine
    params = list(inner.module.parameters())
    p = sum(t.numel() * t.element_size() for t in params)
    g = sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    o = 0
    for st in inner.optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                o += v.numel() * v.element_size()
    return {"parameters": p, "gradients": g, "optimizer_state": o, "total": p + g + o}
