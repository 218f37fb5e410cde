"""Bytes sent, from DeepSpeed's comms-logger records, under the project's costing.

The engine sends everything through ``deepspeed.comm`` with ``prof=True``
(:mod:`resist_det.resist.sync`), so with ``"comms_logger": {"enabled": true}`` in the DeepSpeed
config every message is recorded in ``deepspeed.comm.comms_logger.comms_dict``::

    {log_name: {msg_size_bytes: [count, [latencies], [algbw], [busbw]]}}

Costing (the same as the engine's own counter ``ResISTEngine.bytes_sent``):

* a ring all-reduce of an ``m``-byte message costs ``2 (g - 1) / g * m`` on every rank of a
  group of ``g`` ranks;
* a point-to-point message costs its size on the sender.  DeepSpeed records a
  ``batch_isend_irecv`` with the summed size of *all* its ops, sends and receives, so a rank's
  record mixes both; over all ranks every byte sent is received once, hence the bytes sent by
  all ranks together are half the summed records.  Per-rank sends cannot be recovered, so the
  functions here return totals over ranks.

Typical use, inside a run of ``S`` ranks::

    cfg["comms_logger"] = {"enabled": True, "prof_all": False}
    engine, *_ = resist_det.initialize(model=net, config=cfg)
    reset_comms_log()                        # drop what initialize logged
    ...train a round...
    cost = bytes_sent(gather_comms_logs())   # collective; same answer on every rank
    cost.total                               # bytes sent this round, summed over ranks
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


__all__ = [
    "Kind",
    "DEFAULT_KINDS",
    "DDP_ALLREDUCE_LOG",
    "CommBytes",
    "counts",
    "logged_bytes",
    "allreduce_cost",
    "ring_share",
    "ALLREDUCE_LOG",
    "P2P_LOG",
    "bytes_sent",
    "local_comms_log",
    "gather_comms_logs",
    "reset_comms_log",
    "with_comms_logger",
]

Kind = Literal["all_reduce", "p2p"]

#: The log names of the engine's own messages (:mod:`resist_det.resist.sync`).
ALLREDUCE_LOG = "resist_all_reduce"
P2P_LOG = "resist_p2p"

#: The log name of DeepSpeed's own gradient all-reduce (``dist.all_reduce``'s default), used by mode ``ddp``.
DDP_ALLREDUCE_LOG = "all_reduce"

#: How each log name is costed.
DEFAULT_KINDS: Mapping[str, Kind] = {ALLREDUCE_LOG: "all_reduce", P2P_LOG: "p2p", DDP_ALLREDUCE_LOG: "all_reduce"}

#: ``{log_name: {msg_size: count}}``: what the costing needs of a comms-logger record.
Counts = dict[str, dict[int, int]]


@dataclass(frozen=True)
class CommBytes:
    """Bytes sent by all ranks together, by log name and by kind."""

    by_log: dict[str, int] = field(default_factory=dict)
    all_reduce: int = 0
    p2p: int = 0

    @property
    def total(self) -> int:
        return self.all_reduce + self.p2p


def counts(comms_dict: Mapping[str, Mapping[int, Any]]) -> Counts:
    """``{log_name: {msg_size: count}}`` of a comms-logger dict (DeepSpeed's form or already counts)."""
    out: Counts = {}
    for name, sizes in comms_dict.items():
        out[name] = {int(size): int(rec[0] if isinstance(rec, (list, tuple)) else rec) for size, rec in sizes.items()}
    return out


def logged_bytes(comms_dict: Mapping[str, Mapping[int, Any]]) -> dict[str, int]:
    """Raw logged bytes (``count * msg_size``) per log name, no costing applied."""
    return {name: sum(size * n for size, n in sizes.items()) for name, sizes in counts(comms_dict).items()}


def ring_share(group_size: int) -> float:
    """The share of a message each rank sends in a ring all-reduce over ``group_size`` ranks:
    ``2 (g - 1) / g`` (a reduce-scatter and an all-gather of ``g`` shards).  The one definition
    of the ring cost: the engine's counters, the planner and the benchmarks all use it."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, but got {group_size}")
    return 2 * (group_size - 1) / group_size


def allreduce_cost(msg_bytes: int, group_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``msg_bytes`` over ``group_size`` ranks,
    rounded per message as the engine counts it."""
    return round(ring_share(group_size) * msg_bytes)


def bytes_sent(
    logs: Sequence[Mapping[str, Mapping[int, Any]]],
    *,
    group_size: int | None = None,
    kinds: Mapping[str, Kind] = DEFAULT_KINDS,
) -> CommBytes:
    """Bytes sent by all ranks together, from one comms-logger dict per rank.

    Args:
        logs: every rank's comms-logger dict (e.g. from :func:`gather_comms_logs`), for the
            same span of time.
        group_size: ranks in each all-reduce (default: ``len(logs)``, the world group).
        kinds: costing of each log name.  A log name that is not listed and carries bytes is
            an error (nothing is dropped silently); zero-byte records (barriers) are ignored.
    """
    if not logs:
        raise ValueError("need the comms log of at least one rank")
    g = len(logs) if group_size is None else group_size
    by_log: dict[str, int] = {}
    p2p_logged: dict[str, int] = {}
    unknown: set[str] = set()
    for log in logs:
        for name, sizes in counts(log).items():
            kind = kinds.get(name)
            if kind is None:
                if any(size for size in sizes):
                    unknown.add(name)
                continue
            if kind == "all_reduce":
                by_log[name] = by_log.get(name, 0) + sum(allreduce_cost(size, g) * n for size, n in sizes.items())
            elif kind == "p2p":
                p2p_logged[name] = p2p_logged.get(name, 0) + sum(size * n for size, n in sizes.items())
            else:
                raise ValueError(f"unknown costing kind {kind!r} for log name {name!r}")
    if unknown:
        raise ValueError(
            f"comms log has records with no costing: {sorted(unknown)}; pass kinds= naming them, "
            "or reset the log after deepspeed/resist_det.initialize"
        )
    for name, logged in p2p_logged.items():
        if logged % 2:
            raise ValueError(
                f"{name!r}: {logged} logged point-to-point bytes is odd; each byte is logged by its sender and "
                "its receiver, so the logs must come from every rank of the exchange"
            )
        by_log[name] = logged // 2
    ar = sum(v for n, v in by_log.items() if kinds[n] == "all_reduce")
    return CommBytes(by_log=by_log, all_reduce=ar, p2p=sum(v for n, v in by_log.items() if kinds[n] == "p2p"))


def local_comms_log() -> Counts:
    """This rank's comms-logger records so far, as counts."""
    from deepspeed.comm import comms_logger

    return counts(comms_logger.comms_dict)


def gather_comms_logs(group: Any = None) -> list[Counts]:
    """Every rank's comms-logger records, indexed by rank.  Collective.

    Uses ``torch.distributed.all_gather_object``, which does not pass through the logger.
    """
    import torch.distributed as tdist

    mine = local_comms_log()
    if not tdist.is_initialized():
        return [mine]
    out: list[Any] = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(out, mine, group=group)
    return out


def reset_comms_log() -> None:
    """Forget every record of this rank's comms logger."""
    from deepspeed.comm import comms_logger

    comms_logger.reset_data()


def with_comms_logger(ds_config: Mapping[str, Any], *, prof_all: bool = False) -> dict[str, Any]:
    """A copy of ``ds_config`` with DeepSpeed's comms logger enabled.

    ``prof_all=True`` also records DeepSpeed's own collectives (mode ``ddp``'s gradient
    all-reduce, logged as :data:`DDP_ALLREDUCE_LOG`); the ResIST engine's messages are recorded
    either way.
    """
    cfg = dict(ds_config)
    cfg["comms_logger"] = {"enabled": True, "prof_all": prof_all, "verbose": False, "debug": False}
    return cfg
