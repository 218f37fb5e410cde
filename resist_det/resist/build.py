"""``resist_det.initialize``: a drop-in for ``deepspeed.initialize``.

An existing DeepSpeed project adopts ResIST by changing ``deepspeed.initialize`` to
``resist_det.initialize`` and adding a ``"resist"`` section to its config::

    engine, optimizer, loader, scheduler = resist_det.initialize(
        model=net, model_parameters=net.parameters(), config="ds_config.json")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import deepspeed
from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT
import torch
from torch import nn

from .config import ResISTConfig, split_config
from .engine import ResISTEngine
from .partition import partitionable_blocks
from .plan import check_plan_args, make_plan
from .subnet import make_sub_resnet

__all__ = ["initialize"]


def _check_same_config(rc: ResISTConfig) -> None:
    """All ranks must run with the same ``resist`` section (compared by hash, before training)."""
    import torch.distributed as tdist

    digests: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(digests, rc.digest())
    if len(set(digests)) > 1:
        raise ValueError(
            f"ranks were started with different 'resist' config sections (hashes by rank: {digests}); "
            "start every rank with the same config"
        )


def _check_deepspeed_config(ds: dict[str, Any], mode: str) -> None:
    if mode == "ddp":
        return
    zero = (ds.get("zero_optimization") or {}).get("stage", 0)
    if zero:
        raise ValueError(f"zero_optimization.stage must be 0 with resist.mode={mode!r} (got {zero}): ranks hold different blocks")
    for key in ("fp16", "bf16"):
        if (ds.get(key) or {}).get("enabled"):
            raise ValueError(
                f"{key}.enabled is not supported with resist.mode={mode!r}: DeepSpeed's {key} optimizer keeps master "
                "weights that in-place block routing would bypass; use torch.autocast in the forward pass instead"
            )


def initialize(
    model: nn.Module,
    model_parameters: Any = None,
    config: dict[str, Any] | str | Path | None = None,
    **kwargs: Any,
) -> tuple[ResISTEngine, Any, Any, Any]:
    """Like ``deepspeed.initialize``; returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    ``config`` is a DeepSpeed config (dict or JSON path) with an optional ``"resist"`` section
    (see :class:`resist_det.resist.config.ResISTConfig`).  In ``resist`` mode ``model`` is turned
    into this rank's sub-ResNet in place: blocks this rank does not hold are dropped (with
    ``resist.warmup_local_sgd_steps`` > 0 the rank first holds every block and drops the others
    when the warm-up ends).  A model built on the meta device (``preact_resnet(...,
    device="meta")``) is materialised only for the layers this rank holds, initialised per
    block from ``resist.seed``.
    Other keyword arguments go to ``deepspeed.initialize`` unchanged.
    """
    if "config_params" in kwargs and config is None:
        config = kwargs.pop("config_params")
    ds_config, rc = split_config(config)
    _check_deepspeed_config(ds_config, rc.mode)
    if torch.cuda.is_available():  # NCCL collectives (the config check below) use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _check_same_config(rc)

    grad_clip = 0.0
    if rc.mode != "ddp":
        # DeepSpeed clips by default and all-reduces the norm to do it; clip locally instead,
        # with the value DeepSpeed would have used.
        grad_clip = float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT) or 0.0)
        ds_config["gradient_clipping"] = 0.0
    extra: dict[str, Any] = {}
    stash: list[dict[str, torch.Tensor]] = []
    if rc.mode == "resist":
        names = partitionable_blocks(model, rc.block_pattern)
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no partitionable blocks (no non-strided blocks in a 'layer3' section"
                + (f" or matching {rc.block_pattern!r}" if rc.block_pattern else "")
                + "); use resist.mode 'local_sgd' for this model, or set resist.block_pattern"
            )
        check_plan_args(world, len(names), rc.min_blocks)
        plan = make_plan(rc.seed, 0, world, len(names), rc.min_blocks)
        given = None
        if model_parameters is not None:
            model_parameters = list(model_parameters)
            if model_parameters and isinstance(model_parameters[0], dict):
                raise ValueError("model_parameters as parameter groups is not supported in resist mode; pass net.parameters()")
            given = {id(p) for p in model_parameters}
        # The local-SGD warm-up (paper section 2.6) trains the whole network on every rank: all
        # blocks in slots.  The engine shrinks the section to this rank's first group at the switch.
        warmup = rc.warmup_local_sgd_steps > 0
        held = list(range(len(names))) if warmup else plan.groups[rank]
        model, section, section_name = make_sub_resnet(model, names, held, seed=rc.seed)
        slot_ids = {id(p) for p in section.slots.parameters()}
        model_parameters = [
            p for p in model.parameters() if p.requires_grad and (given is None or id(p) in given or id(p) in slot_ids)
        ]
        if not warmup:
            # deepspeed.initialize broadcasts every parameter from rank 0; keep this rank's blocks.
            # (Local SGD starts from rank 0's copy of everything, as in mode local_sgd.)
            stash = [{k: v.clone() for k, v in s.state_dict().items()} for s in section.slots]
        extra = dict(block_names=names, section=section, section_name=section_name)
    elif model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]

    engine, optimizer, loader, scheduler = deepspeed.initialize(
        model=model, model_parameters=model_parameters, config=ds_config, **kwargs
    )
    if stash:
        for s, st in zip(extra["section"].slots, stash):
            s.load_state_dict(st)
    if rc.mode != "ddp":
        engine.enable_backward_allreduce = False
    return ResISTEngine(engine, rc, grad_clip=grad_clip, **extra), optimizer, loader, scheduler
