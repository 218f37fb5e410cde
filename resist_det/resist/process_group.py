"""The one process-group set-up: the training loop, ``resist_det.initialize`` and the plain-PyTorch
shell all join (or reuse) the launcher's group through :func:`init_process_group`."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

__all__ = ["init_process_group"]


def init_process_group(timeout_minutes: float | None = None) -> tuple[int, int]:
    """Join the launcher's group (NCCL with CUDA, else gloo), or wrap one the user made; make
    ``deepspeed.comm`` use it.  ``timeout_minutes`` bounds how long a collective waits for a
    lost peer (``None``: the backend's default).  Returns ``(rank, world size)``."""
    import deepspeed.comm

    if torch.cuda.is_available():  # NCCL collectives use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not tdist.is_initialized():
        kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        deepspeed.comm.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    else:  # the user's own group (plain PyTorch): deepspeed.comm wraps it
        deepspeed.comm.init_distributed(dist_backend=tdist.get_backend(), auto_mpi_discovery=False, verbose=False)
    return tdist.get_rank(), tdist.get_world_size()
