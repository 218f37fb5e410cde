"""``resist_det.initialize``: a drop-in for ``deepspeed.initialize``.

An existing DeepSpeed project adopts ResIST by changing ``deepspeed.initialize`` to
``resist_det.initialize`` and adding a ``"resist"`` section to its config::

    engine, optimizer, loader, scheduler = resist_det.initialize(
        model=net, model_parameters=net.parameters(), config="ds_config.json")
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT
from deepspeed.utils import groups as ds_groups
from torch import nn

from .config import ResISTConfig, check_deepspeed_config, split_config
from .engine import ResISTEngine
from .partition import partitionable_blocks
from .partition import section_of
from .process_group import init_process_group
from .plan import blocks_per_worker, check_plan_args, degenerate_plan, make_plan, resolve_min_blocks
from .optimizer_state import adaptive_optimizer
from .strategies import make_strategy
from .seeding import init_network_
from .subnet import make_sub_resnet
from .topology import MachineGroups, Topology, build_topology

__all__ = ["initialize"]


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: dict[str, Any] | str | Path | None = None,
    mesh_param: Any = None,
    config_params: dict[str, Any] | str | None = None,
    *,
    resist: ResISTConfig | None = None,
) -> tuple[ResISTEngine, Any, Any, Any]:
    """``deepspeed.initialize`` with ResIST: same arguments, order and return value
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The DeepSpeed config comes from ``config``, ``config_params`` or ``args.deepspeed_config``, as
    in DeepSpeed; its optional ``"resist"`` section (:class:`~resist_det.resist.config.ResISTConfig`,
    or ``resist=``) is taken out before DeepSpeed sees it.  In mode ``resist`` the model becomes
    this rank's sub-ResNet in place (with ``resist.warmup_local_sgd_steps`` > 0 only when the
    warm-up ends): the blocks it does not hold are dropped, with their parameters from
    ``model_parameters`` (groups keep their options) and from a client ``optimizer`` (filtered in
    place, so a client ``lr_scheduler`` stays valid).  Any residual network with registered blocks
    works (:mod:`resist_det.resist.adapters`); a model on the meta device is materialised only for
    the layers this rank holds, each unit initialised from ``resist.seed``."""
    if model is None:
        raise TypeError("initialize() needs a model (positional after args, or model=...)")
    ds_config, rc, args = _resolve_config(args, config, config_params, resist)
    check_deepspeed_config(ds_config, rc.mode)
    init_process_group()
    check_same_config(rc)
    topology = build_topology(rc.topology, rc.mode)
    if topology.node and mpu is not None:
        raise ValueError("resist.topology 'node' makes each machine's ranks DeepSpeed's data-parallel group through its own "
                         "mpu, and cannot be combined with a model-parallel mpu; use resist.topology 'rank'")
    grad_clip = _take_over_clipping(ds_config, rc.mode)

    sub: dict[str, Any] = {}
    stash: list[dict[str, torch.Tensor]] = []
    if rc.mode == "resist":
        model, model_parameters, sub, stash = make_sub_network(model, model_parameters, optimizer, rc, topology)
    elif model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]

    if topology.node:
        mpu = MachineGroups(topology)
    elif isinstance(ds_groups.mpu, MachineGroups):  # DeepSpeed keeps an earlier engine's mpu in a global
        ds_groups.mpu = None
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=ds_config, mesh_param=mesh_param,
    )
    if topology.node:
        # Every machine's local rank 0 is a data-parallel rank 0 and would write DeepSpeed's one
        # model file; rank 0 writes it, the others their own rank files (engine.save_checkpoint).
        engine.save_non_zero_checkpoint = topology.rank == 0
    # deepspeed.initialize broadcast every parameter from rank 0 (the slots empty on every rank,
    # so the structures matched): give this rank's own blocks back.
    restore_blocks(stash)
    if rc.mode != "ddp":
        # DeepSpeed all-reduces gradients only inside a machine of several ranks (topology node)
        engine.enable_backward_allreduce = topology.node and topology.local_size > 1
    strategy = make_strategy(rc, engine.module, engine.optimizer, topology,
                             **({**sub, "deepspeed_engine": engine} if sub else {}))
    if rc.momentum == "restart" and strategy.has_rounds and adaptive_optimizer(engine.optimizer) and dist.get_rank() == 0:
        warnings.warn(
            f"resist.momentum 'restart' with {type(engine.optimizer).__name__}: every round wipes the optimizer's moment "
            "estimates, which slows an Adam-family optimizer badly; use 'auto' (average) or 'keep'", stacklevel=2)
    return ResISTEngine(engine, rc, strategy, grad_clip=grad_clip), optimizer, loader, scheduler


def _resolve_config(args: Any, config: Any, config_params: Any, resist: ResISTConfig | None):
    """The DeepSpeed config wherever DeepSpeed would look for it; returns (DeepSpeed's part, ResIST
    settings, ``args`` without its config path, which DeepSpeed would otherwise read again)."""
    given = {"config": config, "config_params": config_params}
    for attr in ("deepspeed_config", "deepscale_config"):
        if getattr(args, attr, None) is not None:
            given[f"args.{attr}"] = getattr(args, attr)
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"a DeepSpeed config was given {len(given)} times ({', '.join(given)}); give it once")
    if not given:
        raise ValueError("a DeepSpeed config is required: config=dict or JSON path, config_params=, or args.deepspeed_config")
    source = next(iter(given.values()))
    ds_config, rc = split_config(source)
    if resist is not None:
        if isinstance(source, dict) and "resist" in source:
            raise ValueError("give the resist settings once: either a 'resist' config section or resist=, not both")
        rc = resist
    if args is not None and any(hasattr(args, a) for a in ("deepspeed_config", "deepscale_config")):
        args = copy.copy(args)
        for attr in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, attr):
                setattr(args, attr, None)
    return ds_config, rc, args


def check_same_config(rc: ResISTConfig) -> None:
    """All ranks must run with the same ``resist`` section (compared by hash, before training)."""
    digests: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, rc.digest())
    if len(set(digests)) > 1:
        raise ValueError(
            f"ranks were started with different 'resist' config sections (hashes by rank: {digests}); "
            "start every rank with the same config"
        )


def _take_over_clipping(ds_config: dict[str, Any], mode: str) -> float:
    """DeepSpeed clips by default and all-reduces the norm to do it: outside ``ddp`` the engine
    clips locally instead, with the value DeepSpeed would have used."""
    if mode == "ddp":
        return 0.0
    grad_clip = float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT) or 0.0)
    ds_config["gradient_clipping"] = 0.0
    return grad_clip


@torch.no_grad()
def same_start(model: nn.Module) -> None:
    """Give every rank rank 0's weights before blocks are dropped (as DeepSpeed's broadcast does
    for the layers it sees), so a block held by several ranks starts from one copy."""
    if dist.get_world_size() > 1:
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            dist.broadcast(t.data, 0)


def _keep_params(groups: list[dict[str, Any]], keep: set[int]) -> list[dict[str, Any]]:
    """Parameter groups with only the parameters in ``keep`` (by id); options unchanged."""
    return [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups]


def _block_sizes(model: nn.Module, names: list[str]) -> list[int]:
    """Elements (parameters and floating buffers) of each block: what a block costs to hold and send."""
    modules = dict(model.named_modules())
    return [sum(t.numel() for t in (*modules[n].parameters(), *modules[n].buffers()) if t.is_floating_point())
            for n in names]


def restore_blocks(stash: list[Any]) -> None:
    """Put back the blocks :func:`make_sub_network` set aside (``((section, slot), state)`` pairs)."""
    for (sec, i), state in stash:
        sec.allocate(i)
        sec.slots[i].load_state_dict(state)


def _whole_network(model: nn.Module, model_parameters: Any, optimizer: Any, rc: ResISTConfig) -> tuple[nn.Module, Any]:
    """A degenerate plan: the whole network on every rank (materialised from ``resist.seed`` if
    it is on the meta device) and its trainable parameters."""
    if any(p.is_meta for p in model.parameters()):  # materialised whole, each unit from resist.seed
        if isinstance(optimizer, torch.optim.Optimizer) or (model_parameters is not None and any(
                isinstance(g, dict) for g in model_parameters)):
            raise ValueError("a client optimizer or parameter groups cannot refer to a model on the meta device; "
                             "build it on a real device")
        init_network_(model.to_empty(device="cpu"), rc.seed)
        model_parameters = None  # the meta parameters were replaced
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    return model, model_parameters


def _client_groups(model_parameters: Any, optimizer: Any, meta: bool) -> list[dict[str, Any]] | None:
    """The user's ``model_parameters`` as parameter groups (``None``: none given, or they name meta
    parameters that are about to be replaced)."""
    if isinstance(optimizer, torch.optim.Optimizer) and meta:
        raise ValueError("a client optimizer instance cannot hold the parameters of a model on the meta device; "
                         "pass a callable (params -> optimizer) or an optimizer section in the config")
    if model_parameters is None:
        return None
    grouped = bool(model_parameters) and isinstance(model_parameters[0], dict)
    if meta and grouped:
        raise ValueError("parameter groups cannot refer to a model on the meta device; build it on a real device")
    if meta:
        return None
    return [{**g, "params": list(g["params"])} for g in (model_parameters if grouped else [{"params": model_parameters}])]


def _held_parameters(model: nn.Module, model_parameters: Any, groups: list[dict[str, Any]] | None, optimizer: Any) -> Any:
    """What DeepSpeed trains on this rank: the given parameters (or groups) of the blocks held; a
    client optimizer is filtered in place, so a client scheduler keeps working."""
    held_ids = {id(p) for p in model.parameters()}
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.param_groups[:] = _keep_params(optimizer.param_groups, held_ids)
        for p in [p for p in optimizer.state if id(p) not in held_ids]:
            del optimizer.state[p]
    if groups is None:  # none given, or materialised from the meta device: new parameter objects
        return [p for p in model.parameters() if p.requires_grad]
    kept = _keep_params(groups, held_ids)
    return kept if isinstance(model_parameters[0], dict) else kept[0]["params"]


def _set_aside(sections: list[Any]) -> list[Any]:
    """Empty every slot, keeping a copy of this rank's blocks: deepspeed.initialize broadcasts every
    parameter from rank 0, so all ranks must show it the same (empty) slots."""
    stash = []
    for _, sec in sections:
        for i, b in enumerate(sec.slot_blocks):
            if b is not None:
                stash.append(((sec, i), {k: v.clone() for k, v in sec.slots[i].state_dict().items()}))
            sec.release(i)
    return stash


def make_sub_network(model: nn.Module, model_parameters: Any, optimizer: Any, rc: ResISTConfig, topology: Topology):
    """Mode ``resist``: this rank's sub-ResNet, its trainable parameters (or groups), the
    strategy's arguments (empty when the plan degenerates into local SGD), and a copy of its
    blocks to restore after DeepSpeed's broadcast (:func:`restore_blocks`)."""
    names = partitionable_blocks(model, rc.block_pattern, rc.sections)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no partitionable blocks (no ResNet 'layerN' or 'encoder.layers' section"
            + (f" or blocks matching {rc.block_pattern!r}" if rc.block_pattern else "")
            + "); use resist.mode 'local_sgd' for this model, or set resist.sections or resist.block_pattern"
        )
    world, rank = topology.workers, topology.worker  # the plan's workers: ranks, or machines
    min_blocks = resolve_min_blocks(rc.min_blocks, len(names))
    check_plan_args(world, len(names), min_blocks)
    reason = degenerate_plan(world, len(names), min_blocks)
    if reason:
        # Every sub-ResNet would hold every block: sync as local SGD does (one all-reduce, no
        # routing), never with more bytes.
        if topology.rank == 0:
            warnings.warn(f"ResIST plan degenerates: {reason}", stacklevel=3)
        return (*_whole_network(model, model_parameters, optimizer, rc), {}, [])
    meta = any(p.is_meta for p in model.parameters())
    if model_parameters is not None:
        model_parameters = list(model_parameters)
    groups = _client_groups(model_parameters, optimizer, meta)
    if not meta:
        same_start(model)
    sizes = _block_sizes(model, names)
    per_section = [section_of(names)[1].count(s) for s in range(len(section_of(names)[0]))]
    k = blocks_per_worker(world, len(names), min_blocks)
    # The local-SGD warm-up (paper section 2.6) trains the whole network on every rank: all
    # blocks in slots.  The strategy shrinks the sections to this rank's first group at the switch.
    warmup = rc.warmup_local_sgd_steps > 0
    held = list(range(len(names))) if warmup else make_plan(rc.seed, 0, world, len(names), min_blocks, sizes).groups[rank]
    # A worker holds at most min(k, n_s) blocks of section s in any round: that many slots.
    slots = [min(k, n) for n in per_section]
    model, sections = make_sub_resnet(model, names, held, seed=rc.seed, slots_per_section=per_section if warmup else slots)
    params = _held_parameters(model, model_parameters, groups, optimizer)
    # (During the warm-up every rank starts from rank 0's copy of everything, as in local_sgd.)
    stash = [] if warmup else _set_aside(sections)
    sub = dict(block_names=names, sections=sections, slots_per_section=slots, block_sizes=sizes)
    return model, params, sub, stash
