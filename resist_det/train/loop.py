"""The training loop shared by ``tools/train.py`` and ``resist-det train``.

Runs under ``deepspeed --num_gpus N``, ``torchrun --nproc_per_node N``, DeepSpeed hostfiles,
or as a single process; gloo on CPU, NCCL on GPU.  Every epoch ends at a round boundary (a
sync), so evaluation of the assembled global network and checkpoints see agreeing copies.
"""

from __future__ import annotations

import datetime
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..config import Recipe, parse_overrides
from ..io import atomic_torch_save, atomic_write_json, tensor_checksums
from ..resist.checkpoint import prune
from .run_lock import RunLock
from .metrics import MetricsLog, Progress
from .schedule import learning_rate
from .tasks import build_task

__all__ = ["train", "init_distributed", "checkpoint_dir", "GLOBAL_MODEL_FILE"]

GLOBAL_MODEL_FILE = "global_model.pt"


def checkpoint_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.output_dir) / "checkpoints"


_WORLD_OF_ONE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the launcher's process group, or make a one-process group when run alone.

    ``timeout_minutes`` bounds how long a collective waits for a lost peer (``train.comm_timeout_minutes``)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python tools/train.py`: a world of one
        # port 0: its store binds one the OS hands it (a port picked here could be taken first)
        os.environ.update(dict(zip(_WORLD_OF_ONE_ENV, ("0", "0", "1", "127.0.0.1", "0"))))
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    return tdist.get_rank(), tdist.get_world_size()


def leave_world_of_one() -> None:
    """Undo what :func:`init_distributed` did for a process run alone: its group and variables."""
    import deepspeed.comm

    if tdist.is_initialized():
        # through deepspeed.comm, which also drops the groups DeepSpeed cached (its world clone):
        # a later engine in this process would otherwise be handed a group of the destroyed world
        deepspeed.comm.destroy_process_group()
    for key in _WORLD_OF_ONE_ENV:
        os.environ.pop(key, None)


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def _sum_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)  # monitoring only: not part of the algorithm's traffic
    return float(t.item())


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
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


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Run:
    """What one rank trains with: the recipe's task, the engine, the data and the run's files."""

    recipe: Recipe
    rank: int
    world: int
    task: Any
    engine: Any
    sampler: DistributedSampler
    loader: DataLoader
    steps_per_epoch: int
    out: Path
    nic_tx_start: int | None = None  # this machine's NIC counter when training began (see nic_tx_bytes)
    log: MetricsLog | None = None
    memory: dict[str, int] = field(default_factory=dict)


def train(recipe: Recipe, *, resume: bool | str = False, progress: bool = True) -> dict[str, Any] | None:
    """Train ``recipe`` on this process's rank; returns the final summary on rank 0.

    ``resume``: ``True`` continues from the newest complete checkpoint (an error if there is
    none); ``"auto"`` does so when one exists and starts afresh otherwise (what an elastic
    restart under ``torchrun --max-restarts`` needs)."""
    if resume == "auto":
        from ..resist.checkpoint import resume_tag

        try:
            resume_tag(checkpoint_dir(recipe))
            resume = True
        except FileNotFoundError:
            resume = False
    alone = "RANK" not in os.environ
    try:
        run = setup(recipe)
        lock, refused = RunLock(run.out), None
        if run.rank == 0:
            try:
                lock.acquire()
            except (ValueError, OSError) as e:
                refused = e if isinstance(e, ValueError) else ValueError(f"cannot lock train.output_dir {run.out}: {e}")
        if _max_over_ranks(refused is not None):  # collective: every rank stops together
            raise refused or ValueError(f"rank 0 could not lock train.output_dir {run.out}")
        try:
            return _train(run, resume, progress)
        finally:
            lock.release()
    finally:
        if alone:  # leave the process as found: a later launch must not think a launcher started it
            leave_world_of_one()


def _train(run: Run, resume: bool, progress: bool) -> dict[str, Any] | None:
    recipe = run.recipe
    start_epoch, wall_before = resume_from_checkpoint(run) if resume else (0, 0.0)
    if start_epoch >= recipe.train.epochs:  # a finished run: its summary, log and files stay as they are
        from .launch import finished_message

        if run.rank == 0:
            print(finished_message(recipe), file=sys.stderr, flush=True)
        return None
    open_log(run, start_epoch)
    bar = Progress(recipe.train.epochs, run.steps_per_epoch, enabled=run.rank == 0, start_epoch=start_epoch,
                   bar=progress)
    summary: dict[str, Any] = {}
    t_start = time.perf_counter() - wall_before
    for epoch in range(start_epoch, recipe.train.epochs):
        train_loss = train_one_epoch(run, epoch, bar)
        wall = time.perf_counter() - t_start
        record = epoch_record(run, epoch, train_loss, wall)
        if epoch == recipe.train.epochs - 1 or (epoch + 1) % recipe.train.eval_every == 0:
            record.update(evaluate_global_model(run, epoch))
        if run.rank == 0:
            run.log.write(**record)
            bar.epoch_done(epoch, record)
            summary = record
        if epoch == recipe.train.epochs - 1 or (epoch + 1) % recipe.train.checkpoint_every == 0:
            run.engine.save_checkpoint(checkpoint_dir(recipe), tag=f"epoch{epoch:04d}", client_state={"epoch": epoch, "wall": wall})
            if run.rank == 0:
                prune(checkpoint_dir(recipe), recipe.train.keep_checkpoints)
        tdist.barrier()
        t_start += _eval_time(record)
    bar.close()
    if run.rank != 0:
        return None
    summary = {**summary, "mode": recipe.resist.mode, "world_size": run.world, "main_metric": run.task.main_metric}
    atomic_write_json(run.out / "summary.json", summary)
    return summary


def setup(recipe: Recipe) -> Run:
    """Join the process group; build the task, the engine (``resist_det.initialize``) and the loader."""
    import resist_det

    rank, world = init_distributed(recipe.train.comm_timeout_minutes)
    torch.manual_seed(recipe.train.seed)
    task = build_task(recipe)
    model = task.make_model("meta" if recipe.resist.mode == "resist" else None)
    engine, _, _, _ = resist_det.initialize(model=model, config=recipe.deepspeed, resist=recipe.resist)
    batch = recipe.batch_size
    sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True, seed=recipe.train.seed, drop_last=True)
    loader = DataLoader(task.train_set, batch_size=batch, sampler=sampler, collate_fn=task.collate,
                        num_workers=recipe.data.num_workers, drop_last=True)
    steps = min(len(loader), recipe.train.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise ValueError(
            f"the training set ({len(task.train_set)} images) is smaller than one batch per rank ({batch} x {world} ranks)"
        )
    return Run(recipe, rank, world, task, engine, sampler, loader, steps, Path(recipe.train.output_dir),
               nic_tx_start=nic_tx_bytes())


def resume_from_checkpoint(run: Run) -> tuple[int, float]:
    """Load the latest complete checkpoint; returns (first epoch to train, wall time already spent).

    The recipe check runs here too, so torchrun and deepspeed launches refuse a changed recipe
    exactly as ``resist-det train --resume`` does (before ``recipe.json`` is rewritten)."""
    from .launch import check_same_recipe

    check_same_recipe(run.recipe)
    _, client = run.engine.load_checkpoint(checkpoint_dir(run.recipe))
    return client["epoch"] + 1, client["wall"]


def open_log(run: Run, start_epoch: int) -> None:
    """Rank 0: the resolved recipe and the metrics log (a fresh one unless resuming)."""
    run.log = MetricsLog(run.out / "metrics.jsonl", enabled=run.rank == 0)
    if run.rank != 0:
        return
    if start_epoch == 0:
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
    else:  # drop what was logged after the checkpoint resumed from: those epochs are trained again
        run.log.truncate_after(start_epoch)
    atomic_write_json(run.out / "recipe.json", run.recipe.model_dump(mode="json"))
    if start_epoch == 0:
        run.log.write(event="start", mode=run.recipe.resist.mode, world_size=run.world, steps_per_epoch=run.steps_per_epoch,
                      batch_per_rank=run.recipe.batch_size, epochs=run.recipe.train.epochs)


def train_one_epoch(run: Run, epoch: int, bar: Progress) -> float:
    """Local steps over one epoch, then end the epoch on a round boundary; returns the mean loss."""
    from ..resist.engine import memory_footprint

    recipe, engine = run.recipe, run.engine
    own_schedule = "scheduler" not in recipe.deepspeed  # else DeepSpeed's scheduler sets the lr
    run.sampler.set_epoch(epoch)
    engine.train()
    loss_sum, seen = 0.0, 0
    for i, data in enumerate(run.loader):
        if i >= run.steps_per_epoch:
            break
        if own_schedule:
            lr = learning_rate(recipe.train.lr_schedule, recipe.base_lr, epoch + i / run.steps_per_epoch)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
        x, y = run.task.batch(data, engine.device)
        loss = run.task.loss_fn(engine(x), y)
        engine.backward(loss)
        if i == 1 or not run.memory:  # gradients (and, after step 1, momentum) are present here
            run.memory = max(run.memory, memory_footprint(engine), key=lambda m: m.get("total", 0))
        engine.step()
        value = loss.item()
        loss_sum, seen = loss_sum + value, seen + 1
        bar.update(epoch, i + 1, loss=value, round=engine.round, bytes_sent=engine.bytes_sent * run.world)
        if (i + 1) % recipe.train.log_every == 0:
            run.log.write(event="step", epoch=epoch, step=i + 1, loss=value,
                          lr=engine.optimizer.param_groups[0]["lr"], round=engine.round)
    engine.synchronize()  # end the epoch on a round boundary (a no-op if the last step ended one)
    return loss_sum / max(seen, 1)


def epoch_record(run: Run, epoch: int, train_loss: float, wall: float) -> dict[str, Any]:
    """The epoch's log record: loss, rounds, bytes, wall, memory (reduced over ranks for display).

    ``bytes``: what the engines accounted, summed over ranks; ``nic_bytes``: of those, what crossed
    each machine's NIC (one entry per machine); ``wire_bytes`` / ``machine_wire_bytes`` (when the
    ranks talk over a named NIC, ``GLOO_SOCKET_IFNAME``): what those NICs sent since training began,
    headers, acknowledgements and this loop's own monitoring reductions included."""
    mean_loss = _sum_over_ranks(train_loss) / run.world  # collective: every rank sees the same value
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"the training loss is {mean_loss} in epoch {epoch + 1}: the run diverged, and this epoch is not "
            "checkpointed; lower the learning rate (deepspeed.optimizer.params.lr) or set deepspeed.gradient_clipping")
    record = dict(event="epoch", epoch=epoch, train_loss=mean_loss,
                  round=run.engine.round, bytes=_sum_over_ranks(run.engine.bytes_sent), wall=wall,
                  sync_seconds=_max_over_ranks(run.engine.sync_seconds),
                  memory=_max_over_ranks(run.memory.get("total", 0)), peak_rss=_max_over_ranks(_peak_rss_bytes()))
    wire = nic_tx_bytes() - run.nic_tx_start if run.nic_tx_start is not None else 0
    # per machine: what the engines counted as crossing its NIC, and (named NIC) what the NIC sent
    machines: list[Any] = [None] * run.world
    tdist.all_gather_object(machines, (run.engine.topology.machine, run.engine.nic_bytes, wire))  # monitoring only
    count = max(m for m, _, _ in machines) + 1
    record["nic_bytes"] = [sum(n for m, n, _ in machines if m == i) for i in range(count)]
    if _max_over_ranks(run.nic_tx_start is not None):  # collective on every rank
        record["wire_bytes"] = sum(w for _, _, w in machines)
        record["machine_wire_bytes"] = [sum(w for m, _, w in machines if m == i) for i in range(count)]
    return record


def evaluate_global_model(run: Run, epoch: int) -> dict[str, Any]:
    """Assemble the global network (collective), evaluate and save it on rank 0."""
    net = run.engine.global_model(dst=0)
    if run.rank != 0:
        return {}
    recipe, batch = run.recipe, run.recipe.batch_size
    t_eval = time.perf_counter()
    threads = torch.get_num_threads()
    if next(net.parameters()).device.type == "cpu":  # the other ranks wait in a collective: use their cores
        torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
    try:
        run.task.recalibrate_bn(net, recipe.train.bn_recalibration_batches, batch, seed=recipe.train.seed + epoch)
        metrics = run.task.evaluate(net, batch_size=batch, conf_threshold=recipe.train.conf_threshold)
    finally:
        torch.set_num_threads(threads)
    save_global_model(run.out / GLOBAL_MODEL_FILE, net, recipe, epoch, metrics, run.task.class_names)
    return dict(metrics=metrics, eval_seconds=time.perf_counter() - t_eval)


def _eval_time(record: dict[str, Any]) -> float:
    # Wall time counts training and communication, not evaluation (like the paper's timings).
    t = torch.tensor([float(record.get("eval_seconds", 0.0))], dtype=torch.float64, device=_reduce_device())
    tdist.broadcast(t, src=0)
    return float(t.item())


def save_global_model(path: Path, net: torch.nn.Module, recipe: Recipe, epoch: int, metrics: dict[str, Any],
                      class_names: list[str] | None = None) -> None:
    """The global network (residual scales folded into its weights) with its recipe; ``resist-det eval`` reads it."""
    state = net.state_dict()
    record = recipe.model_dump(mode="json")
    if class_names is not None and record["data"].get("classes") == []:
        record["data"]["classes"] = list(class_names)  # the names resolved from the training data, not "[] = collect"
    atomic_torch_save({"model": state, "sha256": tensor_checksums(state), "recipe": record, "epoch": epoch,
                       "metrics": metrics, "class_names": list(class_names) if class_names is not None else None}, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m resist_det.train RECIPE [--resume] [--set key=value ...]`` (also under launchers)."""
    import argparse

    from ..config import load_recipe

    p = argparse.ArgumentParser(prog="tools/train.py", description="Train a resist_det recipe on this rank.")
    p.add_argument("recipe", help="recipe JSON (deepspeed / resist / model / data / train sections)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"], metavar="auto",
                   help="continue from the newest complete checkpoint; '--resume auto': only if there is one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (JSON value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.local_rank is not None:  # (under torchrun and resist-det, python -m resist_det.train bound it already)
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from .lifetime import bind_rank_to_launcher

    bind_rank_to_launcher()  # a rank of a launcher that died would train on as an orphan, holding the run's lock
    try:
        recipe = load_recipe(args.recipe, parse_overrides(args.set))
    except (FileNotFoundError, ValueError) as e:
        report_failure(str(e))
        return 2
    try:
        train(recipe, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:  # bad input or a diverged run: one line, not a traceback per rank
        report_failure(str(e))
        return 2
    except (RuntimeError, OSError) as e:
        full = out_of_space(e, recipe.train.output_dir)
        if full is not None:  # checked first: rank 0 stopped writing, so the others lost their peer
            report_failure(full, every_rank=True)
            return 4
        lost = lost_peer(e) if isinstance(e, RuntimeError) else None
        if lost is None:
            raise
        # every rank that noticed says so: on a cluster, its own machine's log is what its owner reads
        report_failure(f"{lost}; a rank died, hangs or cannot be reached (a collective waits at most "
                       f"train.comm_timeout_minutes = {recipe.train.comm_timeout_minutes:g})", every_rank=True)
        return 3
    return 0


def report_failure(message: str, *, every_rank: bool = False) -> None:
    """Say why this rank stops, in one line: on stderr from rank 0 (every rank fails the same
    way), or from each rank (``every_rank``: what each saw for itself); and in the error file
    torchrun gives each rank (``TORCHELASTIC_ERROR_FILE``), where its failure summary and
    ``resist-det train``'s find it, so a failure only one other rank met is reported too."""
    rank = os.environ.get("RANK", "0")
    printed = every_rank or rank == "0"
    if printed:
        print(f"error: {f'rank {rank}: ' if every_rank else ''}{message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # the layout torchrun's error handler writes (no call stack: the message is the reason); "printed" is ours
        atomic_write_json(error_file, {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}},
                                       "printed": printed})


def out_of_space(error: BaseException, output_dir: str | Path) -> str | None:
    """``"train.output_dir ...: no space left on device"`` when writing there failed for want of
    space (an ``ENOSPC``, or torch's writer giving up on a filesystem that is now full), else None."""
    import errno
    import shutil

    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full:
        try:  # torch.save reports a short write without the errno ("file write failed", "unexpected pos")
            full = shutil.disk_usage(output_dir).free < (1 << 20) and any(
                m in str(error) for m in ("write failed", "unexpected pos", "No space left"))
        except OSError:
            return None
    return f"train.output_dir {output_dir}: no space left on device; free space there and resume (--resume)" if full else None


# What gloo and NCCL say when a peer stopped answering or went away (torch's DistBackendError is a RuntimeError).
_LOST_PEER = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")


def lost_peer(error: BaseException) -> str | None:
    """``"communication timed out (...)"`` when ``error`` is a collective losing its peer, else None."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = first.lower()
    from_comm = isinstance(error, getattr(tdist, "DistError", ())) or any(m in text for m in ("gloo", "nccl", "c10d"))
    if not from_comm or not any(k in text for k in _LOST_PEER):  # e.g. a DataLoader timeout is not a lost peer
        return None
    kind = "timed out" if "time" in text else "lost its connection"
    return f"communication with the other ranks {kind} ({first.split('] ', 1)[-1]})"
