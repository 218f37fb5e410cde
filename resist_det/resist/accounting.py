"""Predicted sizes of a ResIST run: parameters per sub-ResNet and bytes per sync round.

The prediction uses the costing of :mod:`resist_det.resist.sync` (ring all-reduce:
``2 (g - 1) / g`` of the message per rank; point-to-point: the message on the sender);
``resist-det bench`` measures the same quantities from DeepSpeed's comms logger.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from torch import nn

from .partition import partitionable_blocks
from .plan import blocks_per_worker, degenerate_plan, inclusion_probability, iter_plans, p2p_sends
from .sparse import sparse_message_size
from .transport import Codec

__all__ = ["split_sizes", "plan_report", "link_seconds"]


def _tensor_elems(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers() if b.is_floating_point())


def split_sizes(model: nn.Module, pattern: str | None = None) -> dict[str, int]:
    """Elements (parameters + float buffers) of one partitioned block, the shared part, the whole."""
    names = partitionable_blocks(model, pattern)
    modules = dict(model.named_modules())
    block = _tensor_elems(modules[names[0]]) if names else 0
    total = _tensor_elems(model)
    return {"num_blocks": len(names), "block": block, "shared": total - len(names) * block, "total": total,
            "block_params": sum(p.numel() for p in modules[names[0]].parameters()) if names else 0,
            "total_params": sum(p.numel() for p in model.parameters())}


def plan_report(model: nn.Module, workers: int, *, model_name: str = "", min_blocks: int = 5, seed: int = 0,
                rounds: int = 3, bytes_per_elem: int = 4, codec: Codec | None = None,
                topk: float | None = None) -> dict[str, Any]:
    """Plans of the first ``rounds`` rounds with predicted bytes per sync (summed over ranks).

    ``model`` may live on the meta device: only shapes are read.  With a lossy ``codec``
    (``resist.compression``) the ResIST and local-SGD figures are for quantised messages
    (shared average in one bucket, as :func:`resist_det.resist.transport.compressed_average`
    sends it); DDP's stay fp32.  With ``topk`` (``resist.compression.topk``) averaged tensors
    travel as top-k deltas (:mod:`resist_det.resist.sparse`, after the first, dense, sync) and
    ResIST's routed blocks stay dense.
    """
    sizes = split_sizes(model)
    n = sizes["num_blocks"]
    k = blocks_per_worker(workers, n, min(min_blocks, n))
    s = workers
    fp32_rank = lambda elems: 2 * (s - 1) / s * elems * bytes_per_elem  # noqa: E731  (ring all-reduce, each rank)
    if codec is None or codec.lossless:
        per_rank, block_bytes = fp32_rank, sizes["block"] * bytes_per_elem
    else:  # reduce-scatter + all-gather of quantised shards; blocks as one quantised message each
        per_rank = lambda elems: 2 * (s - 1) * codec.encoded_size(-(-elems // s))  # noqa: E731
        block_bytes = codec.encoded_size(sizes["block"])
    shared_params = sizes["total_params"] - n * sizes["block_params"]
    params_of = {sizes["shared"]: shared_params, sizes["total"]: sizes["total_params"]}
    if topk is not None:  # weights as top-k deltas, float buffers (BN statistics) dense
        dense_rank, value_codec = per_rank, codec or Codec()
        sparse_rank = lambda elems: 2 * (s - 1) * sparse_message_size(math.ceil(topk * -(-elems // s)), value_codec)  # noqa: E731
        per_rank = lambda elems: sparse_rank(params_of[elems]) + dense_rank(elems - params_of[elems])  # noqa: E731
    allreduce = lambda elems: per_rank(elems) * s  # noqa: E731  (summed over ranks)
    plans = list(itertools.islice(iter_plans(seed, s, n, min(min_blocks, n)), rounds + 1))
    out_rounds = []
    for t, p in enumerate(plans[:rounds]):
        sends = p2p_sends(plans[t - 1], p) if t > 0 else None
        out_rounds.append({
            "round": t,
            "groups": p.groups,
            "bytes": None if sends is None else allreduce(sizes["shared"]) + sum(sends) * block_bytes,
            "rank_bytes": None if sends is None else [per_rank(sizes["shared"]) + n * block_bytes for n in sends],
        })
    full_depth = sum(len(m) for name, m in model.named_modules() if re.search(r"(^|\.)(layer\d+|encoder\.layers)$", name)) or None
    return {
        "model": model_name or type(model).__name__,
        "num_blocks": n,
        "block_params": sizes["block_params"],
        "total_params": sizes["total_params"],
        "shared_params": shared_params,
        "blocks_per_worker": k,
        "depth": (full_depth - n + k) if full_depth else None,
        "full_depth": full_depth,
        "scale": inclusion_probability(s, n, min(min_blocks, n)),
        "local_sgd_bytes": allreduce(sizes["total"]),
        "local_sgd_rank_bytes": per_rank(sizes["total"]),
        "ddp_rank_bytes_per_step": fp32_rank(sizes["total_params"]),  # DeepSpeed all-reduces gradients every step
        "fp32_local_sgd_bytes": fp32_rank(sizes["total"]) * s,
        "degenerate": degenerate_plan(s, n, min(min_blocks, n)),
        "rounds": out_rounds,
    }


def link_seconds(report: dict[str, Any], rate_bits: float) -> dict[str, float]:
    """Predicted seconds on the wire when every rank's NIC sends at ``rate_bits`` per second.

    A sync lasts as long as its busiest sender needs: ring all-reduce ranks all send the same
    share in parallel; point-to-point block routing is bounded by the rank that sends most.
    ResIST is the mean over the reported rounds after the first; DDP is per step (gradients).
    Latency and protocol overhead are ignored (a lower bound)."""
    rounds = [max(r["rank_bytes"]) for r in report["rounds"] if r["rank_bytes"]]
    resist = sum(rounds) / len(rounds) if rounds else float("nan")
    return {"resist_round": resist * 8 / rate_bits, "local_sgd_round": report["local_sgd_rank_bytes"] * 8 / rate_bits,
            "ddp_step": report["ddp_rank_bytes_per_step"] * 8 / rate_bits}
