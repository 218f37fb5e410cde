"""Run a test function on N real gloo ranks (CPU processes) with a hard timeout.

``run_on_ranks(fn, world_size, tmp_path, *args)`` spawns ``world_size`` processes, joins them
into one gloo process group through a file store under ``tmp_path``, and calls
``fn(rank, world_size, *args)`` on each.  ``fn`` must be importable (module level).  A worker's
exception is re-raised in pytest with the worker's traceback; a hang fails loudly after
``timeout`` seconds and every worker is killed.  Values returned by ``fn`` are pickled back
and returned as a list indexed by rank.

Workers are forked from one forkserver that imported torch, DeepSpeed, torchvision and the
project once per pytest session: importing them costs ~9 s of CPU per process, which a fresh
``spawn`` per rank and per test paid again (most of the suite's time).  The server only imports modules and computes
nothing, so a fork starts with the state a spawned process would have after the same imports.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


# torchvision too: most ranks build a network or read data through it, and its import (which
# pulls in torch._dynamo) costs another ~3.5 s of CPU per process.
_PRELOAD = ["torch", "torch.distributed", "deepspeed", "torchvision", "resist_det.resist.engine", "resist_det.models",
            "resist_det.train.loop", "resist_det.train.tasks", "helpers"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, workdir: str, port: int, args: tuple, nodes: int = 1) -> None:
    per_node = world_size // nodes
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank % per_node),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(per_node),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    if nodes > 1:  # as torchrun sets it on each machine of a multi-node job
        os.environ["GROUP_RANK"] = str(rank // per_node)
    out = Path(workdir) / f"rank{rank}"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        out.with_suffix(".ok").write_bytes(pickle.dumps(result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out.with_suffix(".err").write_text(traceback.format_exc())
        raise SystemExit(1)


def run_on_ranks(fn: Callable, world_size: int, tmp_path: Path, *args: Any, timeout: float = 240.0, nodes: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    With ``nodes`` > 1 the ranks are told (as torchrun tells them) that they run on ``nodes``
    machines of equal size, ranks in order: ``GROUP_RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``."""
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in 1..8, but got {world_size}")
    if world_size % nodes:
        raise ValueError(f"{world_size} ranks do not split into {nodes} machines of equal size")
    workdir = Path(tmp_path) / f"dist-{fn.__name__}-{world_size}"
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    ctx = _context()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, str(workdir), port, args, nodes), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world_size):
        err = workdir / f"rank{r}.err"
        if err.exists():
            errors.append(f"--- rank {r} ---\n{err.read_text()}")
    if hung:  # reported first: killing a hung rank makes its peers fail too
        raise TimeoutError(
            f"{fn.__name__} did not finish within {timeout:.0f} s on ranks {hung} (killed)"
            + ("\nother ranks then failed:\n" + "\n".join(errors) if errors else "")
        )
    if errors:
        raise AssertionError(f"{fn.__name__} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors))
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"{fn.__name__}: ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
    return [pickle.loads((workdir / f"rank{r}.ok").read_bytes()) for r in range(world_size)]
