"""The plain-PyTorch shell: a module wrapper (like ``DistributedDataParallel``) and an optimizer
wrapper (like ``PostLocalSGDOptimizer``) around the one ResIST core (:mod:`resist_det.resist.core`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ..io import atomic_torch_save
from ..resist.config import ResISTConfig, config_error
from ..resist.core import ResISTCore

__all__ = ["prepare", "ResISTModule", "ResISTOptimizer"]


class ResISTModule(nn.Module):
    """This rank's sub-network (``.module``), and the whole network when in eval mode.

    ``model.eval()`` (collective: every rank calls it) assembles the global network on every rank
    and ``model(x)`` runs it until ``model.train()``: evaluation through the model scores the
    whole network, never one rank's sub-network."""

    def __init__(self, module: nn.Module, core: ResISTCore) -> None:
        super().__init__()
        self.module = module
        self._resist = {"core": core, "whole": None}  # a dict: neither is a submodule of this wrapper

    @property
    def core(self) -> ResISTCore:
        return self._resist["core"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        whole = self._resist["whole"]
        return (whole if whole is not None else self.module)(*args, **kwargs)

    def train(self, mode: bool = True) -> ResISTModule:
        self._resist["whole"] = self.core.network_for(mode, self._resist["whole"])
        return super().train(mode)

    def global_model(self, dst: int = 0, *, fold: bool = True) -> nn.Module | None:
        """The whole network on rank ``dst`` (``None`` elsewhere); as ``ResISTEngine.global_model``.  Collective."""
        return self.core.global_model(dst, fold)

    def export_global_model(self, path: str | Path, dst: int = 0) -> Path | None:
        """The global network's ``state_dict`` (the user's keys, scales folded) written on rank ``dst``.  Collective."""
        net = self.global_model(dst)
        return None if net is None else atomic_torch_save(net.state_dict(), path)

    def synchronize(self) -> int:
        """End the current round now (e.g. at an epoch end).  Collective."""
        return self.core.synchronize()

    @property
    def bytes_sent(self) -> int:
        return self.core.bytes_sent


class ResISTOptimizer(torch.optim.Optimizer):
    """The user's optimizer; ``step()`` takes the local step, then the sync when the round ends.

    Groups and state are the wrapped optimizer's (a scheduler built on either works).  With
    ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` hands the inf check to this optimizer:
    the ranks agree on it (a tiny all-reduce), so a step skipped for an inf gradient on any rank
    is skipped on every rank and the round schedule stays aligned."""

    _step_supports_amp_scaling = True  # GradScaler sets found_inf / grad_scale and calls step()

    def __init__(self, optimizer: torch.optim.Optimizer, core: ResISTCore) -> None:  # noqa: D107 (no base init)
        self.optim = optimizer
        self.core = core

    param_groups = property(lambda self: self.optim.param_groups)
    state = property(lambda self: self.optim.state)
    defaults = property(lambda self: self.optim.defaults)

    def __repr__(self) -> str:
        return f"ResISTOptimizer({self.optim!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("ResISTOptimizer: parameter groups are fixed once prepared (blocks move between ranks); "
                         "add every group before resist_det.torch.prepare")

    @torch.no_grad()
    def _agree_on_inf(self) -> bool:
        """GradScaler's verdict, the same on every rank; unscales the gradients when it has not."""
        found = getattr(self, "found_inf", None)
        if found is None:
            return False
        flag = found.detach().float().reshape(1).cpu().clone()
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() > 0:
            return True
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # grads are still scaled: unscale them as GradScaler.unscale_ would
            inv = scale.double().reciprocal().float()
            groups: dict[tuple, list[torch.Tensor]] = {}
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            for (device, _), grads in groups.items():
                dummy = torch.zeros(1, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, dummy, inv.to(device))
        return False

    def step(self, closure: Any = None) -> Any:
        if self._agree_on_inf():
            return None  # skipped on every rank: no local step, the round goes on
        loss = self.optim.step() if closure is None else self.optim.step(closure)
        self.core.after_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and the ResIST state (plan position, slot layout, counters)."""
        return {"optimizer": self.optim.state_dict(), "resist": self.core.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`.  Load it before the model's ``state_dict``: the ResIST
        state sets which blocks this rank holds (and ends a warm-up), which the weights then fill."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "resist"}:
            raise ValueError("ResISTOptimizer.load_state_dict: expected what ResISTOptimizer.state_dict() returned "
                             "(keys 'optimizer' and 'resist')")
        self.core.load_state_dict(state_dict["resist"])
        self.optim.load_state_dict(state_dict["optimizer"])


def _config(resist: ResISTConfig | dict[str, Any] | None) -> ResISTConfig:
    if isinstance(resist, ResISTConfig):
        return resist
    if resist is not None and not isinstance(resist, dict):
        raise TypeError(f"resist=: expected a dict of resist settings or a ResISTConfig, got {type(resist).__name__}")
    from pydantic import ValidationError

    try:
        return ResISTConfig(**(resist or {}))
    except ValidationError as e:
        raise config_error(e) from None


def _check(model: nn.Module, optimizer: Any, rc: ResISTConfig) -> None:
    """What the plain shell cannot take: one line naming it, before anything is changed."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(f"prepare(model): got a {type(model).__name__}-wrapped model; pass the bare module "
                         "(model.module): ResIST replaces the data-parallel wrap")
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, ResISTOptimizer):
        raise TypeError(f"prepare(optimizer): expected a torch.optim optimizer built over model.parameters(), "
                        f"got {type(optimizer).__name__}")
    if rc.mode == "ddp":
        raise ValueError("resist.mode 'ddp': the plain-PyTorch shell has rounds (resist or local_sgd); for data "
                         "parallel training use torch.nn.parallel.DistributedDataParallel itself")
    if rc.topology == "node":
        raise ValueError("resist.topology 'node' needs DeepSpeed's data-parallel groups (resist_det.initialize); the "
                         "plain-PyTorch shell runs one sub-network per rank ('rank')")
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in owned)
    if foreign:
        raise ValueError(f"prepare(optimizer): {foreign} of its parameters are not the model's; build the optimizer "
                         "over model.parameters() (or groups of them)")
    if not tdist.is_initialized():
        raise ValueError("resist_det.torch.prepare needs the process group: call torch.distributed.init_process_group() "
                         "first (torchrun sets its variables)")


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, *,
            resist: ResISTConfig | dict[str, Any] | None = None) -> tuple[ResISTModule, ResISTOptimizer]:
    """ResIST around a plain-PyTorch model and optimizer; returns ``(model, optimizer)`` wrappers.

    Call it on every rank after ``torch.distributed.init_process_group``, with the bare module
    (not DDP-wrapped) and an optimizer over its parameters (any ``torch.optim`` optimizer,
    parameter groups kept; an LR scheduler built before or after keeps working).  In mode
    ``resist`` the module becomes this rank's sub-ResNet in place and the optimizer keeps only
    its parameters; ranks start from rank 0's weights, as with DDP.  ``resist``: the settings of
    a DeepSpeed config's ``"resist"`` section (mode ``resist`` or ``local_sgd``, topology ``rank``).
    ``model.module`` is the sub-network; ``model.global_model()``, ``model.export_global_model()``,
    ``optimizer.state_dict()`` / ``load_state_dict()`` (load it before the model's) as on the
    DeepSpeed engine.  Gradient clipping, accumulation and AMP stay in the user's loop.
    """
    from ..resist.build import check_same_config, make_sub_network, restore_blocks, same_start
    from ..resist.process_group import init_process_group
    from ..resist.strategies import make_strategy
    from ..resist.topology import build_topology

    rc = _config(resist)
    _check(model, optimizer, rc)
    init_process_group()  # deepspeed.comm wraps the user's group
    check_same_config(rc)
    topology = build_topology("rank", rc.mode)
    sub: dict[str, Any] = {}
    if rc.mode == "resist":
        model, _, sub, stash = make_sub_network(model, None, optimizer, rc, topology)
        restore_blocks(stash)  # nothing is broadcast over the slots here: give the blocks back now
    if not sub and not any(p.is_meta for p in model.parameters()):
        same_start(model)  # local SGD (or a degenerate plan): every rank from rank 0's weights, as DDP starts
    strategy = make_strategy(rc, model, optimizer, topology, **sub)
    core = ResISTCore(rc, strategy)
    return ResISTModule(model, core), ResISTOptimizer(optimizer, core)
