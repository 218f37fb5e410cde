"""The training loop shared by ``tools/train.py`` and ``resist-det train``.

Runs under ``deepspeed --num_gpus N``, ``torchrun --nproc_per_node N``, DeepSpeed hostfiles,
or as a single process; gloo on CPU, NCCL on GPU.  Every epoch ends at a round boundary (a
sync), so evaluation of the assembled global network and checkpoints see agreeing copies.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..config import Recipe
from ..io import atomic_write_json
from ..resist.checkpoint import prune
from .run_lock import RunLock
from .metrics import MetricsLog, Progress
from .schedule import learning_rate
from .rundir import RunDir, check_same_recipe, finished_message, save_global_model
from .tasks import build_task
from .world import (broadcast_from_0, init_distributed, leave_world_of_one, max_over_ranks,
                    nic_tx_bytes, peak_rss_bytes, sum_over_ranks)

__all__ = ["train", "checkpoint_dir"]


def checkpoint_dir(recipe: Recipe) -> Path:
    return RunDir.of(recipe).checkpoints


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
        if max_over_ranks(refused is not None):  # collective: every rank stops together
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
    atomic_write_json(RunDir(run.out).summary, summary)
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
    check_same_recipe(run.recipe)
    _, client = run.engine.load_checkpoint(checkpoint_dir(run.recipe))
    return client["epoch"] + 1, client["wall"]


def open_log(run: Run, start_epoch: int) -> None:
    """Rank 0: the resolved recipe and the metrics log (a fresh one unless resuming)."""
    run.log = MetricsLog(RunDir(run.out).metrics, enabled=run.rank == 0)
    if run.rank != 0:
        return
    if start_epoch == 0:
        RunDir(run.out).metrics.unlink(missing_ok=True)
    else:  # drop what was logged after the checkpoint resumed from: those epochs are trained again
        run.log.truncate_after(start_epoch)
    atomic_write_json(RunDir(run.out).recipe, run.recipe.model_dump(mode="json"))
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
    mean_loss = sum_over_ranks(train_loss) / run.world  # collective: every rank sees the same value
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"the training loss is {mean_loss} in epoch {epoch + 1}: the run diverged, and this epoch is not "
            "checkpointed; lower the learning rate (deepspeed.optimizer.params.lr) or set deepspeed.gradient_clipping")
    record = dict(event="epoch", epoch=epoch, train_loss=mean_loss,
                  round=run.engine.round, bytes=sum_over_ranks(run.engine.bytes_sent), wall=wall,
                  sync_seconds=max_over_ranks(run.engine.sync_seconds),
                  memory=max_over_ranks(run.memory.get("total", 0)), peak_rss=max_over_ranks(peak_rss_bytes()))
    wire = nic_tx_bytes() - run.nic_tx_start if run.nic_tx_start is not None else 0
    # per machine: what the engines counted as crossing its NIC, and (named NIC) what the NIC sent
    machines: list[Any] = [None] * run.world
    tdist.all_gather_object(machines, (run.engine.topology.machine, run.engine.nic_bytes, wire))  # monitoring only
    count = max(m for m, _, _ in machines) + 1
    record["nic_bytes"] = [sum(n for m, n, _ in machines if m == i) for i in range(count)]
    if max_over_ranks(run.nic_tx_start is not None):  # collective on every rank
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
    save_global_model(RunDir(run.out).global_model, net, recipe, epoch, metrics, run.task.class_names)
    return dict(metrics=metrics, eval_seconds=time.perf_counter() - t_eval)


def _eval_time(record: dict[str, Any]) -> float:
    # Wall time counts training and communication, not evaluation (like the paper's timings).
    return broadcast_from_0(record.get("eval_seconds", 0.0))
