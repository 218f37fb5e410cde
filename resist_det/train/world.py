"""The training job's world: joining the process group (or making a world of one), scalar
reductions over the ranks for monitoring, and the machine's NIC counter."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch
import torch.distributed as tdist

from ..resist.process_group import init_process_group

__all__ = ["init_distributed", "leave_world_of_one", "sum_over_ranks", "max_over_ranks", "broadcast_from_0",
           "nic_tx_bytes", "peak_rss_bytes", "WORLD_OF_ONE_ENV"]

WORLD_OF_ONE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the launcher's process group, or make a one-process group when run alone.

    ``timeout_minutes`` bounds how long a collective waits for a lost peer (``train.comm_timeout_minutes``)."""
    if "RANK" not in os.environ:  # plain `python tools/train.py`: a world of one
        # port 0: its store binds one the OS hands it (a port picked here could be taken first)
        os.environ.update(dict(zip(WORLD_OF_ONE_ENV, ("0", "0", "1", "127.0.0.1", "0"))))
    return init_process_group(timeout_minutes)


def leave_world_of_one() -> None:
    """Undo what :func:`init_distributed` did for a process run alone: its group and variables."""
    import deepspeed.comm

    if tdist.is_initialized():
        # through deepspeed.comm, which also drops the groups DeepSpeed cached (its world clone):
        # a later engine in this process would otherwise be handed a group of the destroyed world
        deepspeed.comm.destroy_process_group()
    for key in WORLD_OF_ONE_ENV:
        os.environ.pop(key, None)


def reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=reduce_device())
    tdist.all_reduce(t)  # monitoring only: not part of the algorithm's traffic
    return float(t.item())


def max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=reduce_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def nic_tx_bytes() -> int | None:
    """Bytes the NIC named by ``GLOO_SOCKET_IFNAME`` has sent (sysfs), read once per machine
    (local rank 0); ``None`` without such a NIC.  Lets a run put wire bytes beside accounted ones."""
    nic = os.environ.get("GLOO_SOCKET_IFNAME")
    stat = Path(f"/sys/class/net/{nic}/statistics/tx_bytes")
    if not nic or not stat.is_file():
        return None
    return int(stat.read_text()) if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def broadcast_from_0(value: float) -> float:
    """Rank 0's ``value`` on every rank (monitoring only)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=reduce_device())
    tdist.broadcast(t, src=0)
    return float(t.item())
