"""Predicted sizes of a ResIST run: parameters per sub-ResNet and bytes per sync round.

The prediction uses the costing of :mod:`resist_det.resist.sync` (ring all-reduce:
``2 (g - 1) / g`` of the message per rank; point-to-point: the message on the sender);
``resist-det bench`` measures the same quantities from DeepSpeed's comms logger.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .comm_cost import ring_share
from .partition import is_section_name, partitionable_blocks, section_of
from .plan import (Plan, blocks_per_worker, check_plan_args, degenerate_plan, inclusion_probability, iter_plans, p2p_bytes,
                   p2p_messages, resolve_min_blocks)
from .sparse import sparse_message_size
from .transport import Codec

__all__ = ["split_sizes", "plan_report", "PlanReport", "RoundCost", "link_seconds", "machine_report"]


@dataclass(frozen=True)
class RoundCost:
    """One round of a :class:`PlanReport`: its plan and the sync that leads into it."""

    round: int
    groups: tuple[tuple[int, ...], ...]  # the blocks of each worker
    bytes: float | None  # summed over ranks; None for round 0 (nothing to sync into)
    rank_bytes: list[float] | None  # each rank's share
    rank_params: list[int]  # parameters each worker's sub-network holds


@dataclass(frozen=True)
class PlanReport:
    """What :func:`plan_report` predicts for a model and a number of workers."""

    model: str
    num_blocks: int
    min_blocks: int
    sections: list[dict[str, Any]]  # name, blocks, params of each partitioned section
    block_params: list[int]
    partitioned_params: int
    total_params: int
    shared_params: int
    blocks_per_worker: int
    depth: int | None  # residual blocks of a sub-network (None: no ``layerN`` sections)
    full_depth: int | None
    scale: float  # the global network's residual scale (inclusion probability)
    local_sgd_bytes: float  # one local-SGD sync, summed over ranks
    local_sgd_rank_bytes: float
    ddp_rank_bytes_per_step: float  # fp32 gradients, each rank, every step
    fp32_local_sgd_bytes: float
    degenerate: str | None  # why every sub-network holds every block (it syncs as local SGD), or None
    rounds: list[RoundCost]


def _tensor_elems(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers() if b.is_floating_point())


def split_sizes(model: nn.Module, pattern: str | None = None, sections: list[str] | None = None) -> dict[str, Any]:
    """Sizes of the partitioned blocks, the shared part and the whole: elements (parameters +
    float buffers: what a sync sends) and parameters, per block and per section."""
    names = partitionable_blocks(model, pattern, sections)
    modules = dict(model.named_modules())
    block = [_tensor_elems(modules[n]) for n in names]
    block_params = [sum(p.numel() for p in modules[n].parameters()) for n in names]
    total = _tensor_elems(model)
    section_names, sec_of = section_of(names)
    return {"names": names, "num_blocks": len(names), "block": block, "block_params": block_params,
            "shared": total - sum(block), "total": total, "total_params": sum(p.numel() for p in model.parameters()),
            "sections": [{"name": sn, "blocks": [names[b] for b in range(len(names)) if sec_of[b] == s],
                          "params": sum(block_params[b] for b in range(len(names)) if sec_of[b] == s)}
                         for s, sn in enumerate(section_names)]}


def _average_cost(sizes: dict[str, Any], s: int, codec: Codec | None, topk: float | None,
                  bytes_per_elem: int) -> tuple[Any, list[float]]:
    """Bytes each rank sends to average ``elems`` elements over ``s`` ranks (a function of elems),
    and each routed block's message size, for the transport ``codec`` / ``topk`` describe."""
    if codec is None or codec.lossless:
        per_rank = lambda elems: ring_share(s) * elems * bytes_per_elem  # noqa: E731
        block_bytes = [b * bytes_per_elem for b in sizes["block"]]
    else:  # reduce-scatter + all-gather of quantised shards; blocks as one quantised message each
        per_rank = lambda elems: 2 * (s - 1) * codec.encoded_size(-(-elems // s))  # noqa: E731
        block_bytes = [codec.encoded_size(b) for b in sizes["block"]]
    if topk is None:
        return per_rank, block_bytes
    # weights as top-k deltas, float buffers (BN statistics) dense
    params_of = {sizes["shared"]: sizes["total_params"] - sum(sizes["block_params"]), sizes["total"]: sizes["total_params"]}
    dense_rank, value_codec = per_rank, codec or Codec()
    sparse_rank = lambda elems: 2 * (s - 1) * sparse_message_size(math.ceil(topk * -(-elems // s)), value_codec)  # noqa: E731
    return (lambda elems: sparse_rank(params_of[elems]) + dense_rank(elems - params_of[elems])), block_bytes


def plan_report(model: nn.Module, workers: int, *, model_name: str = "", min_blocks: int | None = None, seed: int = 0,
                rounds: int = 3, bytes_per_elem: int = 4, codec: Codec | None = None,
                topk: float | None = None, sections: list[str] | None = None, block_pattern: str | None = None) -> PlanReport:
    """Plans of the first ``rounds`` rounds with predicted bytes per sync (summed over ranks).

    Only shapes are read (``model`` may be on the meta device); ``min_blocks`` is checked as
    training checks it.  A lossy ``codec`` quantises ResIST's and local SGD's messages (the shared
    average in one bucket, as :func:`~resist_det.resist.transport.compressed_average`), not DDP's;
    with ``topk`` averaged tensors travel as top-k deltas (:mod:`resist_det.resist.sparse`) and
    routed blocks stay dense.  A degenerate plan is reported with local SGD's bytes (it syncs so)."""
    sizes = split_sizes(model, block_pattern, sections)
    n = sizes["num_blocks"]
    if n == 0:
        raise ValueError(f"{model_name or type(model).__name__} has no partitionable blocks; ResIST would be local SGD")
    min_blocks = resolve_min_blocks(min_blocks, n)
    check_plan_args(workers, n, min_blocks)
    degenerate = degenerate_plan(workers, n, min_blocks)
    k = n if degenerate else blocks_per_worker(workers, n, min_blocks)
    s = workers
    fp32_rank = lambda elems: ring_share(s) * elems * bytes_per_elem  # noqa: E731  (ring all-reduce, each rank)
    shared_params = sizes["total_params"] - sum(sizes["block_params"])
    per_rank, block_bytes = _average_cost(sizes, s, codec, topk, bytes_per_elem)
    allreduce = lambda elems: per_rank(elems) * s  # noqa: E731  (summed over ranks)
    if degenerate:
        plans = [Plan(round=t, groups=(tuple(range(n)),) * s) for t in range(rounds + 1)]
    else:
        plans = list(itertools.islice(iter_plans(seed, s, n, min_blocks, sizes=sizes["block"]), rounds + 1))
    out_rounds = []
    for t, p in enumerate(plans[:rounds]):
        if t == 0:
            rank_bytes = None
        elif degenerate:
            rank_bytes = [per_rank(sizes["total"])] * s
        else:
            rank_bytes = [per_rank(sizes["shared"]) + b for b in p2p_bytes(plans[t - 1], p, block_bytes)]
        out_rounds.append(RoundCost(round=t, groups=p.groups, bytes=None if rank_bytes is None else sum(rank_bytes),
                                    rank_bytes=rank_bytes,
                                    rank_params=[shared_params + sum(sizes["block_params"][b] for b in g) for g in p.groups]))
    full_depth = sum(len(m) for name, m in model.named_modules() if is_section_name(name)) or None
    return PlanReport(
        model=model_name or type(model).__name__,
        num_blocks=n,
        min_blocks=min_blocks,
        sections=sizes["sections"],
        block_params=sizes["block_params"],
        partitioned_params=sum(sizes["block_params"]),
        total_params=sizes["total_params"],
        shared_params=shared_params,
        blocks_per_worker=k,
        depth=(full_depth - n + k) if full_depth else None,
        full_depth=full_depth,
        scale=1.0 if degenerate else inclusion_probability(s, n, min_blocks),
        local_sgd_bytes=allreduce(sizes["total"]),
        local_sgd_rank_bytes=per_rank(sizes["total"]),
        ddp_rank_bytes_per_step=fp32_rank(sizes["total_params"]),  # DeepSpeed all-reduces gradients every step
        fp32_local_sgd_bytes=fp32_rank(sizes["total"]) * s,
        degenerate=degenerate,
        rounds=out_rounds,
    )


def link_seconds(report: PlanReport, rate_bits: float) -> dict[str, float]:
    """Predicted seconds on the wire when every rank's NIC sends at ``rate_bits`` per second.

    A sync lasts as long as its busiest sender needs: ring all-reduce ranks all send the same
    share in parallel; point-to-point block routing is bounded by the rank that sends most.
    ResIST is the mean over the reported rounds after the first; DDP is per step (gradients).
    Latency and protocol overhead are ignored (a lower bound)."""
    rounds = [max(r.rank_bytes) for r in report.rounds if r.rank_bytes]
    resist = sum(rounds) / len(rounds) if rounds else float("nan")
    return {"resist_round": resist * 8 / rate_bits, "local_sgd_round": report.local_sgd_rank_bytes * 8 / rate_bits,
            "ddp_step": report.ddp_rank_bytes_per_step * 8 / rate_bits}


def machine_report(model: nn.Module, nodes: int, gpus_per_node: int, *, min_blocks: int | None = None, seed: int = 0,
                   rounds: int = 3, codec: Codec | None = None, sections: list[str] | None = None,
                   block_pattern: str | None = None, bytes_per_elem: int = 4) -> dict[str, dict[str, Any]]:
    """Topologies ``rank`` and ``node`` side by side on ``nodes`` machines of ``gpus_per_node`` ranks.

    For each: S, blocks and depth per sub-network, bytes over each machine's NIC per sync
    (``nic_rounds[t][m]``, rounds 1..``rounds``), bytes each rank sends inside its machine per
    step (DeepSpeed's gradient all-reduce, topology ``node``), and hierarchical (``node``) or flat
    (``rank``) local SGD's NIC bytes per sync.  Costing as the engine counts it
    (:class:`~resist_det.resist.topology.Topology`): a ring over every rank crosses each machine's
    NIC once (ranks of a machine are neighbours); a message crosses when its ends are on
    different machines; with ``node`` each of a machine's ranks carries 1/g of every message."""
    codec = codec or Codec()
    sizes = split_sizes(model, block_pattern, sections)
    g, out = gpus_per_node, {}
    enc = lambda elems: elems * bytes_per_elem if codec.lossless else codec.encoded_size(elems)  # noqa: E731

    def average_nic(elems: int, kind: str) -> int:  # per machine
        if nodes == 1:
            return 0
        if kind == "rank":
            world = nodes * g
            if codec.lossless:
                return round(ring_share(world) * elems * bytes_per_elem)
            return g * 2 * (world - g) * enc(-(-elems // world))
        shard = -(-elems // g)
        if codec.lossless:
            return round(g * ring_share(nodes) * shard * bytes_per_elem)
        return g * 2 * (nodes - 1) * enc(-(-shard // nodes))

    for kind, workers in (("rank", nodes * g), ("node", nodes)):
        rep = plan_report(model, workers, min_blocks=min_blocks, seed=seed, rounds=rounds + 1, sections=sections,
                          block_pattern=block_pattern)
        machine = (lambda w: w // g) if kind == "rank" else (lambda w: w)  # noqa: E731
        per_message = [enc(b) if kind == "rank" else g * enc(-(-b // g)) for b in sizes["block"]]
        plans = [Plan(round=r.round, groups=r.groups) for r in rep.rounds]
        nic_rounds = []
        for old, new in zip(plans, plans[1:]):
            nic = [average_nic(sizes["total"] if rep.degenerate else sizes["shared"], kind)] * nodes
            if not rep.degenerate:
                for src, dst, b in p2p_messages(old, new):
                    if machine(src) != machine(dst):
                        nic[machine(src)] += per_message[b]
            nic_rounds.append(nic)
        grads = max(rep.rounds[0].rank_params) * bytes_per_elem
        out[kind] = {"workers": workers, "blocks_per_worker": rep.blocks_per_worker, "depth": rep.depth,
                     "full_depth": rep.full_depth, "degenerate": rep.degenerate, "nic_rounds": nic_rounds,
                     "nic_round": sum(max(n) for n in nic_rounds) / len(nic_rounds),
                     "local_sgd_nic_round": average_nic(sizes["total"], kind),
                     "inside_step": round(ring_share(g) * grads) if kind == "node" else 0}
    return out
