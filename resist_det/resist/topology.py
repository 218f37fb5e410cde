"""Who is a ResIST worker: every rank, or every machine (``resist.topology``).

* ``rank``: every rank trains its own sub-network; a sync runs between all ranks.
* ``node``: every machine trains one sub-network; its ranks are data-parallel replicas of it
  (DeepSpeed's gradient all-reduce runs inside the machine every step, through an ``mpu``
  whose data-parallel group is the machine's ranks).  A sync runs between machines: plans are
  made over machines, and every cross-machine message is split over the machine's ranks
  (local rank ``j`` carries shard ``j``; the machine's ranks then all-gather the shards over
  their fast links), so every byte crosses the slow link once per machine.
* ``auto``: ``node`` when the job spans at least two machines of more than one rank each, else
  ``rank`` (a single multi-GPU box keeps one sub-network per rank).

Machines are read from the launcher: torchrun's ``GROUP_RANK`` / DeepSpeed's ``CROSS_RANK``
(the node rank) on every rank.  Without them the job is one machine.

A :class:`Topology` is also the one place that knows which sends cross a machine's NIC: it
counts them (:attr:`Topology.nic_sent`), next to the bytes every rank sends in all.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import deepspeed.comm as dist
import torch
import torch.distributed as tdist
from torch import Tensor

from .comm_cost import ALLREDUCE_LOG, P2P_LOG, allreduce_cost

__all__ = ["Topology", "MachineGroups", "build_topology", "choose_topology", "machines_from_env", "NODE_RANK_ENV"]

#: The launchers' name for the node rank of a process: torchrun's, then DeepSpeed's.
NODE_RANK_ENV = ("GROUP_RANK", "CROSS_RANK")


def machines_from_env() -> str | None:
    """This process's node rank as its launcher set it (``None``: not launched across machines)."""
    return next((os.environ[k] for k in NODE_RANK_ENV if os.environ.get(k)), None)


def choose_topology(setting: str, machine_of: Sequence[int], mode: str) -> str:
    """``rank`` or ``node`` for ``setting`` on machines ``machine_of`` (machine index by rank).

    Mode ``ddp`` is flat.  ``node`` on machines of unequal rank counts is refused (the plan's
    workers must be equal replicas groups), ``auto`` then picks ``rank``."""
    if mode == "ddp":
        return "rank"
    counts = [list(machine_of).count(m) for m in range(max(machine_of) + 1)]
    equal = len(set(counts)) == 1
    if setting == "auto":
        return "node" if len(counts) >= 2 and equal and counts[0] > 1 else "rank"
    if setting == "node":
        if not equal:
            raise ValueError(f"resist.topology 'node' needs the same number of ranks on every machine; the launcher "
                             f"reports {counts} ranks on machines 0..{len(counts) - 1}; use resist.topology 'rank'")
        if len(counts) == 1 and counts[0] > 1 and tdist.get_rank() == 0:
            warnings.warn("resist.topology 'node' on one machine: its ranks are data-parallel replicas of one network "
                          "(no ResIST); use 'rank' for one sub-network per rank", stacklevel=3)
    return setting


class MachineGroups:
    """DeepSpeed's ``mpu`` interface: data parallel over this machine's ranks, no model parallelism."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def get_data_parallel_group(self) -> Any:
        return self.topology.inner_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.local_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.local_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.members(self.topology.machine)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


class Topology:
    """The workers of a sync and the messages between them.

    ``machine_of[r]`` is the machine of global rank ``r``.  Workers are ranks (``rank``) or
    machines (``node``); :attr:`worker` / :attr:`workers` are this rank's plan index and the
    plan's S.  Messages name workers; :meth:`peer` turns a worker into the global rank this rank
    talks to (the rank of the same local index on that machine)."""

    def __init__(self, kind: str, rank: int, machine_of: Sequence[int]) -> None:
        if kind not in ("rank", "node"):
            raise ValueError(f"topology kind {kind!r}: expected 'rank' or 'node'")
        self.kind = kind
        self.rank = rank
        self.machine_of = tuple(machine_of)
        self.world = len(self.machine_of)
        self.machines = max(self.machine_of) + 1
        self.machine = self.machine_of[rank]
        self._members = [[r for r in range(self.world) if self.machine_of[r] == m] for m in range(self.machines)]
        self.local_rank = self._members[self.machine].index(rank)
        self.local_size = len(self._members[self.machine])
        self.inner_group: Any = None  # this machine's ranks (node)
        self.cross_group: Any = None  # the ranks of this local index on every machine (node)
        self.nic_sent = 0  # bytes this rank sent to ranks on other machines

    @property
    def node(self) -> bool:
        return self.kind == "node"

    @property
    def workers(self) -> int:
        """S: the plan's number of workers."""
        return self.machines if self.node else self.world

    @property
    def worker(self) -> int:
        """This rank's worker index (its sub-network in the plan)."""
        return self.machine if self.node else self.rank

    def members(self, machine: int) -> list[int]:
        return list(self._members[machine])

    def peer(self, worker: int) -> int:
        """The global rank this rank exchanges with for ``worker``."""
        return self._members[worker][self.local_rank] if self.node else worker

    def first_rank(self, worker: int) -> int:
        """A global rank that holds ``worker``'s sub-network."""
        return self._members[worker][0] if self.node else worker

    def worker_of(self, rank: int) -> int:
        return self.machine_of[rank] if self.node else rank

    def make_groups(self) -> None:
        """Create the machine groups and the cross-machine groups.  Collective on every rank."""
        if not self.node:
            return
        g = self.local_size
        for m in range(self.machines):
            group = tdist.new_group(self._members[m])
            if m == self.machine:
                self.inner_group = group
        for j in range(g):
            group = tdist.new_group([self._members[m][j] for m in range(self.machines)])
            if j == self.local_rank:
                self.cross_group = group

    # ---- messages ---------------------------------------------------------------------------
    def exchange(self, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]) -> int:
        """Post ``(tensor, worker, tag)`` sends and receives as one batch and wait; returns bytes sent."""
        return self.send_to_rank([(t, self.peer(w), tag) for t, w, tag in sends],
                                 [(t, self.peer(w), tag) for t, w, tag in recvs])

    def send_to_rank(self, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]) -> int:
        """:meth:`exchange` with global ranks as peers; counts what goes to other machines."""
        ops = [dist.P2POp(dist.isend, t, r, tag=tag) for t, r, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, r, tag=tag) for t, r, tag in recvs]
        if ops:
            for req in dist.batch_isend_irecv(ops, prof=True, log_name=P2P_LOG):
                req.wait()
        sent = 0
        for t, r, _ in sends:
            n = t.numel() * t.element_size()
            sent += n
            self.nic_sent += n if self.machine_of[r] != self.machine else 0
        return sent

    def ring_cost(self, nbytes: int) -> int:
        """Cost of a ring all-reduce of ``nbytes`` over every rank (gloo's ring: rank ``r`` sends to
        ``r + 1``), counted on this rank; its NIC share when the next rank is on another machine."""
        sent = allreduce_cost(nbytes, self.world)
        if self.machine_of[(self.rank + 1) % self.world] != self.machine:
            self.nic_sent += sent
        return sent

    def all_reduce_mean(self, flat: Tensor, log_name: str = ALLREDUCE_LOG) -> int:
        """``flat`` <- its mean over the workers (over the cross group: one rank per machine)."""
        if self.workers == 1:
            return 0
        if not self.node:
            dist.all_reduce(flat, prof=True, log_name=log_name)
            flat.div_(self.world)
            return self.ring_cost(flat.numel() * flat.element_size())
        dist.all_reduce(flat, group=self.cross_group, prof=True, log_name=log_name)
        flat.div_(self.machines)
        sent = allreduce_cost(flat.numel() * flat.element_size(), self.machines)
        self.nic_sent += sent  # every member of the cross group is on another machine
        return sent

    # ---- a machine's shards -----------------------------------------------------------------
    def shard(self, flat: Tensor) -> Tensor:
        """This rank's part of ``flat`` for a cross-machine message (all of it with ``rank``)."""
        if not self.node or self.local_size == 1:
            return flat
        size = -(-flat.numel() // self.local_size)
        part = flat[self.local_rank * size: (self.local_rank + 1) * size]
        return torch.nn.functional.pad(part, (0, size - part.numel())).contiguous()

    def assemble(self, part: Tensor, numel: int) -> tuple[Tensor, int]:
        """Every rank's :meth:`shard` of a flat of ``numel`` elements, joined inside the machine
        (all-gather over its fast links); returns (the flat, bytes this rank sent)."""
        if not self.node or self.local_size == 1:
            return part, 0
        parts = [torch.empty_like(part) for _ in range(self.local_size)]
        dist.all_gather(parts, part.contiguous(), group=self.inner_group, prof=True, log_name="resist_all_gather")
        return torch.cat(parts)[:numel], (self.local_size - 1) * part.numel() * part.element_size()

    def inner_mean(self, tensors: Sequence[Tensor]) -> int:
        """Average ``tensors`` over this machine's ranks (their own copies differ: BN statistics)."""
        if not self.node or self.local_size == 1 or not tensors:
            return 0
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        sent = 0
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat, group=self.inner_group, prof=True, log_name=ALLREDUCE_LOG)
            flat.div_(self.local_size)
            for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(v)
            sent += allreduce_cost(flat.numel() * flat.element_size(), self.local_size)
        return sent

    def describe(self) -> str:
        if not self.node:
            return f"rank topology: {self.world} workers (one sub-network per rank)"
        return f"node topology: {self.machines} machines x {self.local_size} ranks (one sub-network per machine)"


def gather_machines(world: int) -> list[int]:
    """Machine index of every rank, from each rank's launcher variables.  Collective."""
    keys: list[Any] = [None] * world
    tdist.all_gather_object(keys, machines_from_env())
    if all(k is None for k in keys):
        return [0] * world
    if any(k is None for k in keys):
        raise ValueError("some ranks were started without a node rank (GROUP_RANK / CROSS_RANK) and some with one: "
                         "start every rank through one launcher")
    order = sorted(set(keys), key=lambda k: (len(k), k))
    return [order.index(k) for k in keys]


def build_topology(setting: str, mode: str) -> Topology:
    """The run's topology for ``resist.topology`` = ``setting``.  Collective on every rank."""
    world, rank = tdist.get_world_size(), tdist.get_rank()
    machine_of = gather_machines(world) if world > 1 else [0]
    topology = Topology(choose_topology(setting, machine_of, mode), rank, machine_of)
    topology.make_groups()
    return topology
