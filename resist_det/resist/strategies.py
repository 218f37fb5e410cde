"""What each mode does at a synchronisation: one small class per mode.

* :class:`DataParallel` (``ddp``): DeepSpeed's own gradient all-reduce every step; no rounds.
* :class:`LocalSGD` (``local_sgd``): every rank trains the whole network; a sync averages
  every tensor (the paper's baseline).
* :class:`ResIST` (``resist``): every rank trains its sub-ResNet; a sync averages the shared
  tensors and routes the partitioned blocks (:mod:`resist_det.resist.sync`).  An optional
  local-SGD warm-up (paper section 2.6) trains the whole network, its partitioned blocks
  scaled as in the global network (footnote 2), until the schedule's switch.

A strategy sees the module and optimizer of either shell; what every mode shares is
:class:`~resist_det.resist.strategy.Strategy`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import fold_branch_scale, set_branch_scale
from .config import ResISTConfig
from .optimizer_state import policy
from .partition import section_of
from .plan import Plan, inclusion_probability, iter_plans, resolve_min_blocks
from .subnet import SlottedSection, block_tensors, get_submodule_parent
from .topology import Topology
from .strategy import Strategy
from .sync import gather_blocks, route_blocks

__all__ = ["Strategy", "DataParallel", "LocalSGD", "ResIST", "make_strategy"]


class DataParallel(Strategy):
    """Plain DeepSpeed data parallel: DeepSpeed all-reduces every gradient in every step."""

    mode = "ddp"
    has_rounds = False

    def bytes_per_step(self) -> int:
        grads = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)
        return self.topology.ring_cost(grads)  # DeepSpeed's gradient all-reduce over every rank, ring costing

    def sync(self, round_index: int, switch: bool) -> int:
        return 0


class LocalSGD(Strategy):
    """Every rank trains the whole network; a sync averages all of it."""

    mode = "local_sgd"

    def sync(self, round_index: int, switch: bool) -> int:
        sent = self._agree_inside()
        sent += self._average(self._with_state(self.shared_tensors(self._with_bn(round_index)), self._shared_params()))
        self._reset_optimizer_state([])
        return sent


class ResIST(Strategy):
    """Sub-ResNets: shared layers averaged over all ranks, partitioned blocks routed between them.

    ``sections`` are the slotted sections of the sub-ResNet (one per partitioned section);
    blocks are numbered over all of them in network order (``block_names``)."""

    mode = "resist"

    def __init__(self, config: ResISTConfig, module: nn.Module, optimizer: Any, topology: Topology, *,
                 block_names: list[str], sections: list[tuple[str, SlottedSection]], slots_per_section: list[int],
                 block_sizes: list[int], deepspeed_engine: Any = None) -> None:
        super().__init__(config, module, optimizer, topology)
        self.block_names = block_names
        self.section_names = [n for n, _ in sections]
        self.sections = [s for _, s in sections]
        self.slots_per_section = list(slots_per_section)
        self.block_sizes = list(block_sizes)  # elements per block: the plan balances them
        self.block_section = section_of(block_names)[1]
        self.min_blocks = resolve_min_blocks(config.min_blocks, len(block_names))
        self._deepspeed_engine = deepspeed_engine  # its parameter-name map follows the blocks at the switch
        # The round that is ResIST round 0 (plan round = round - resist_start); None in the warm-up.
        self.resist_start: int | None = None
        self._plans: Iterator[Plan] | None = None
        self.plan: Plan | None = None
        if config.warmup_local_sgd_steps > 0:
            self._begin_warmup()
        else:
            self.resist_start = 0
            self._restart_plans(0)

    @property
    def in_warmup(self) -> bool:
        return self.resist_start is None

    # ---- the slots of every section, as one list -------------------------------------------
    @property
    def section(self) -> SlottedSection:
        """The slotted section, when one section is partitioned."""
        if len(self.sections) != 1:
            raise AttributeError(f"{len(self.sections)} sections are partitioned ({self.section_names}); use .sections")
        return self.sections[0]

    @property
    def slots(self) -> list[nn.Module]:
        return [m for sec in self.sections for m in sec.slots]

    @property
    def slot_blocks(self) -> list[int | None]:
        """The block each slot holds (``None``: empty), sections one after another."""
        return [b for sec in self.sections for b in sec.slot_blocks]

    def _slot_index(self, i: int) -> tuple[SlottedSection, int]:
        for sec in self.sections:
            if i < len(sec.slots):
                return sec, i
            i -= len(sec.slots)
        raise IndexError(i)

    def _set_layout(self, layout: list[int | None]) -> None:
        """Slot ``i`` holds ``layout[i]``: storage given to full slots and dropped from empty ones."""
        if len(layout) != len(self.slots):
            raise ValueError(f"a slot layout of {len(layout)} entries does not fit {len(self.slots)} slots")
        for i, b in enumerate(layout):
            sec, j = self._slot_index(i)
            if b is None:
                self._release_slot(i)
            else:
                sec.allocate(j)
        self._assign(layout)

    def _assign(self, layout: list[int | None]) -> None:
        """Record the flat slot layout in each section (storage already as it should be)."""
        at = 0
        for sec in self.sections:
            sec.assign(layout[at: at + len(sec.slots)])
            at += len(sec.slots)

    def _prepare_slot(self, i: int) -> None:
        """Storage for a block arriving in empty slot ``i`` (and optimizer state, when moments travel)."""
        sec, j = self._slot_index(i)
        sec.allocate(j)
        if policy(self.config.momentum, self.optimizer) == "average":
            template = next((st for st in self.optimizer.state.values() if st), None)
            for p in sec.slots[j].parameters():
                if template is not None and p not in self.optimizer.state:
                    self.optimizer.state[p] = {k: torch.zeros_like(p) if torch.is_tensor(v) and v.dim() > 0 else copy.deepcopy(v)
                                               for k, v in template.items()}

    def _release_slot(self, i: int) -> None:
        sec, j = self._slot_index(i)
        for p in sec.slots[j].parameters():
            self.optimizer.state.pop(p, None)
        sec.release(j)

    def residual_scale(self) -> float:
        c = self.config
        if c.scale == "inverse_s":
            return 1.0 / self.workers
        return inclusion_probability(self.workers, len(self.block_names), self.min_blocks)

    # ---- rounds --------------------------------------------------------------------------
    def _restart_plans(self, plan_round: int) -> None:
        c = self.config
        self._plans = iter_plans(c.seed, self.workers, len(self.block_names), self.min_blocks, start=plan_round,
                                 sizes=self.block_sizes)
        self.plan = next(self._plans)

    def shared_tensors(self, with_buffers: bool) -> list[torch.Tensor]:
        """All but the partitioned slots (everything during the warm-up)."""
        return self._tensors(with_buffers, skip=None if self.in_warmup else self.slots)

    @torch.no_grad()
    def sync(self, round_index: int, switch: bool) -> int:
        with_bn = self._with_bn(round_index)
        sent = self._agree_inside()
        if self.in_warmup:  # local SGD on the whole network
            sent += self._average(self._with_state(self.shared_tensors(with_bn), self._shared_params()))
            if switch:
                self._restart_plans(0)
                self._end_warmup(list(self.plan.groups[self.topology.worker]))
                self.resist_start = round_index + 1
            self._reset_optimizer_state([])
            return sent
        sent += self._average(self._with_state(self.shared_tensors(with_bn), self._shared_params(skip=self.slots)))
        new = next(self._plans)
        before = self.slot_blocks
        slots = self.slots
        slot_section = [s for s, sec in enumerate(self.sections) for _ in sec.slots]
        slot_blocks, p2p = route_blocks(slots, before, self.plan, new, self.topology,
                                        tensors=lambda m: self._with_state(block_tensors(m), list(m.parameters())),
                                        codec=self.codec, generator=self.rounding, slot_section=slot_section,
                                        section_of=self.block_section, prepare=self._prepare_slot, release=self._release_slot)
        self._assign(slot_blocks)  # (route_blocks gave and dropped the storage)
        self.plan = new
        arrived = [slots[i] for i, (a, b) in enumerate(zip(before, slot_blocks)) if b is not None and a != b]
        self._reset_optimizer_state(arrived)
        return sent + p2p

    # ---- the local-SGD warm-up -----------------------------------------------------------
    def _begin_warmup(self) -> None:
        if any(sec.slot_blocks != list(sec.blocks) for sec in self.sections):
            raise ValueError("the local-SGD warm-up needs every partitioned block in a slot (build the engine with resist_det.initialize)")
        n = len(self.block_names)
        self.plan = Plan(round=-1, groups=(tuple(range(n)),) * self.workers)  # every rank holds every block
        for slot in self.slots:
            set_branch_scale(slot, self.residual_scale())  # paper footnote 2: scaled as in the global network

    def _end_warmup(self, layout: list[int | None]) -> None:
        """Keep only the blocks of ``layout`` (a slot layout of this rank's group, or the group
        itself), unscaled; the other blocks leave the module, the optimizer (groups and state)
        and DeepSpeed's name map, freeing their memory."""
        removed = []
        for s, sec in enumerate(self.sections):
            mine = [b for b in layout if b is not None and self.block_section[b] == s]
            removed += sec.keep(mine, self.slots_per_section[s])
        gone = {id(p) for m in removed for p in m.parameters()}
        # Keep the module's order (slot order), as at a switch in round 0: a checkpoint's optimizer
        # state, stored by position, then fits an engine that switches on resume.
        order = {id(p): i for i, p in enumerate(self.module.parameters())}
        for group in self.optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in gone]
            group["params"] = sorted(kept, key=lambda p: order.get(id(p), len(order)))
        for p in [p for p in self.optimizer.state if id(p) in gone]:
            del self.optimizer.state[p]
        if hasattr(self._deepspeed_engine, "param_names"):  # DeepSpeed's checkpoint name map
            self._deepspeed_engine.param_names = {p: n for n, p in self.module.named_parameters()}
        for slot in self.slots:
            set_branch_scale(slot, 1.0)
        if len(layout) == len(self.slots):
            self._set_layout(layout)

    # ---- the global network --------------------------------------------------------------
    @torch.no_grad()
    def global_model(self, dst: int | None, fold: bool) -> tuple[nn.Module | None, int]:
        blocks: list[nn.Module] = []
        here = dst in (None, self.rank)
        if here:
            blocks = [self.sections[s].new_block() for s in self.block_section]
        sent = gather_blocks(self.slots, self.slot_blocks, self.plan, self.topology, dst, blocks)
        if not here:
            return None, sent
        # A copy of the user's network around the original sections (each an nn.Sequential).
        places = [get_submodule_parent(self.module, name) for name in self.section_names]
        for parent, child in places:
            setattr(parent, child, nn.Identity())
        try:
            net = copy.deepcopy(self.module)
        finally:
            for (parent, child), sec in zip(places, self.sections):
                setattr(parent, child, sec)
        by_index = dict(enumerate(blocks))
        for name, sec in zip(self.section_names, self.sections):
            new_parent, child = get_submodule_parent(net, name)
            setattr(new_parent, child, sec.as_sequential(by_index))
        s = self.residual_scale()
        for block in blocks:
            if fold:
                fold_branch_scale(block, s)
            else:
                set_branch_scale(block, s)
        return net, sent

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resist_start": self.resist_start, "slot_blocks": self.slot_blocks}

    def load_state_dict(self, state: dict[str, Any], round_index: int) -> None:
        """Restore the plan position and slot contents; a state saved after the warm-up ends the
        warm-up of a strategy still in it (its extra blocks are dropped)."""
        super().load_state_dict(state, round_index)
        start = state["resist_start"]
        if start is None:
            if not self.in_warmup:
                raise ValueError(
                    "ResIST state was saved during the local-SGD warm-up, but this engine has already switched to "
                    "ResIST; load it into a freshly initialized engine"
                )
            return
        self._restart_plans(round_index - start)
        if self.in_warmup:
            self._end_warmup(state["slot_blocks"])
        else:
            self._set_layout(state["slot_blocks"])
        self.resist_start = start


def make_strategy(config: ResISTConfig, module: nn.Module, optimizer: Any, topology: Topology, **resist: Any) -> Strategy:
    """The strategy of ``config.mode``; ``resist`` holds the sub-ResNet's sections for mode ``resist``
    (none when its plan degenerates: every rank holds every block, which is local SGD)."""
    if config.mode == "resist" and resist:
        return ResIST(config, module, optimizer, topology, **resist)
    mode = "local_sgd" if config.mode == "resist" else config.mode
    return {"local_sgd": LocalSGD, "ddp": DataParallel}[mode](config, module, optimizer, topology)
