#!/usr/bin/env python
"""A recipe trained by PyTorch's own communication-saving tools: the peers ResIST is measured beside.

    torchrun --nproc_per_node 2 benchmarks/peer_train.py RECIPE --peer powersgd --powersgd-rank 1 [--set key=value ...]
    torchrun --nproc_per_node 2 benchmarks/peer_train.py RECIPE --peer post_local_sgd [--set ...]

Same model, data, batch, optimizer (SGD from the recipe's ``deepspeed.optimizer``), learning-rate
schedule, seeds and epoch records (``metrics.jsonl`` in ``train.output_dir``, read by
``bench_cluster.py``) as ``resist-det train``; instead of the ResIST engine:

* ``powersgd``: ``DistributedDataParallel`` with PyTorch's PowerSGD communication hook
  (``powerSGD_hook``, rank ``--powersgd-rank``, error feedback and warm start as by default,
  compression from the 2nd step: PowerSGD's own default would all-reduce uncompressed for
  the first 1,000 steps);
* ``post_local_sgd``: PyTorch's post-local SGD (``post_localSGD_hook`` +
  ``PostLocalSGDOptimizer`` with a ``PeriodicModelAverager`` of period ``resist.local_steps``,
  local steps from the 2nd step on): the same algorithm as the project's ``local_sgd`` mode,
  written independently.

Evaluated every ``train.eval_every`` epochs on rank 0 with the model every rank agrees on
(post-local SGD: parameters averaged first, as a user would before evaluating), BN statistics
recalibrated as the recipe says, like ``resist-det train``'s global network.  Wall time counts
training and communication, not evaluation.  Not part of the package: a benchmark's peer.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from resist_det.config import load_recipe, parse_overrides
from resist_det.io import atomic_write_json
from resist_det.train.world import nic_tx_bytes
from resist_det.train.metrics import MetricsLog
from resist_det.train.schedule import learning_rate
from resist_det.train.tasks import build_task


def wrap(model, args, recipe):
    """DDP with the peer's communication hook; the optimizer it steps with."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post_local
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    # One gradient bucket: PowerSGD chains collectives from the callbacks of each bucket, which gloo must see
    # in the same order on every rank (several buckets in flight mismatched: "Received data size doesn't match").
    ddp = DistributedDataParallel(model, bucket_cap_mb=1024)
    params = recipe.deepspeed["optimizer"]["params"]
    sgd = torch.optim.SGD(ddp.parameters(), lr=params["lr"], momentum=params.get("momentum", 0.0),
                          weight_decay=params.get("weight_decay", 0.0))
    if args.peer == "powersgd":
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
        return ddp, sgd
    # PyTorch's default subgroup is a machine's ranks (CUDA only): the same made explicitly for gloo, so
    # the local steps all-reduce inside a machine only (nothing, with one rank per machine).
    subgroup, _ = dist.new_subgroups(group_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    state = post_local.PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=1)
    ddp.register_comm_hook(state, post_local.post_localSGD_hook)
    averager = PeriodicModelAverager(period=recipe.resist.local_steps, warmup_steps=1)
    return ddp, PostLocalSGDOptimizer(optim=sgd, averager=averager)


def agreed_model(ddp, args):
    """The model every rank agrees on (post-local SGD mid-period: the ranks' parameters averaged)."""
    if args.peer == "post_local_sgd":
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        average_parameters(ddp.module.parameters(), dist.group.WORLD)
    return ddp.module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--peer", choices=["powersgd", "post_local_sgd"], required=True)
    ap.add_argument("--powersgd-rank", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true", help="(accepted for the same command line as resist-det train)")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(recipe.train.seed)
    task = build_task(recipe)
    ddp, optimizer = wrap(task.make_model(None), args, recipe)
    batch = recipe.batch_size
    sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True, seed=recipe.train.seed, drop_last=True)
    loader = DataLoader(task.train_set, batch_size=batch, sampler=sampler, collate_fn=task.collate, drop_last=True,
                        num_workers=recipe.data.num_workers)
    steps = min(len(loader), recipe.train.max_steps_per_epoch or len(loader))
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    if rank == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        log.write(event="start", mode=args.peer, world_size=world, steps_per_epoch=steps, batch_per_rank=batch,
                  epochs=recipe.train.epochs)
    tx0, train_seconds = nic_tx_bytes(), 0.0
    for epoch in range(recipe.train.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        start, loss_sum = time.perf_counter(), 0.0
        for i, data in enumerate(loader):
            if i >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe.train.lr_schedule, recipe.base_lr, epoch + i / steps)
            x, y = task.batch(data)
            loss = task.loss_fn(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            if (i + 1) % recipe.train.log_every == 0:  # progress between epochs: bench_cluster's caps read it
                log.write(event="step", epoch=epoch, step=i + 1, loss=loss.item())
        net = agreed_model(ddp, args)
        dist.barrier()
        train_seconds += time.perf_counter() - start
        wire = torch.tensor([float(nic_tx_bytes() - tx0) if tx0 is not None else 0.0], dtype=torch.float64)
        dist.all_reduce(wire)
        record = dict(event="epoch", epoch=epoch, train_loss=loss_sum / steps, wall=train_seconds)
        if tx0 is not None:
            record["wire_bytes"] = wire.item()
        if rank == 0:
            if epoch == recipe.train.epochs - 1 or (epoch + 1) % recipe.train.eval_every == 0:
                t_eval = time.perf_counter()
                whole = copy.deepcopy(net)  # recalibration must not touch the training copy
                task.recalibrate_bn(whole, recipe.train.bn_recalibration_batches, batch, seed=recipe.train.seed + epoch)
                record["metrics"] = task.evaluate(whole, batch_size=batch, conf_threshold=recipe.train.conf_threshold)
                record["eval_seconds"] = time.perf_counter() - t_eval
            log.write(**record)
            print(f"epoch {epoch + 1}/{recipe.train.epochs}  loss {record['train_loss']:.4f}  wall {train_seconds:.1f}s  "
                  f"accuracy {record.get('metrics', {}).get('accuracy', float('nan')):.4f}", flush=True)
        dist.barrier()  # the others wait while rank 0 evaluates (not counted in the wall time)
    if rank == 0:
        atomic_write_json(out / "summary.json", {"peer": args.peer, "epochs": recipe.train.epochs})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
