#!/usr/bin/env python
"""Optimizer state at a sync: restart (the paper's rule for SGD momentum), keep, average.

    python benchmarks/bench_adam_state.py [--epochs 2] [--seed 0] [--optimizer adam|sgd]
        [--record benchmarks/results/adam_state.txt]

The shipped ``fashion_mnist_resist.json`` recipe (2 CPU ranks, ``local_steps`` 50) with its SGD
replaced by Adam (lr 1e-3), or with ``--optimizer sgd`` its own SGD (lr 0.05, momentum 0.9), run
with ``resist.momentum`` = ``restart`` (moments cleared every round), ``keep`` (kept for the
shared layers and the blocks that stay on a rank, fresh for blocks that arrive) and ``average``
(moments averaged and routed with the weights), and the same with mode ``local_sgd`` as the
reference. Prints the final test accuracy of each. Needs the Fashion-MNIST IDX files (``apt-get
install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from resist_det.train.launch import launch, recipe_path
from resist_det.record import host_line, write_record

ADAM = {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.0005, "torch_adam": True}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="sgd: the recipe's own")
    ap.add_argument("--out", default=None, help="default runs/bench_adam_state (adam), runs/bench_sgd_state (sgd)")
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    rows = []
    for mode, momentum in [(m, mo) for m in ("resist", "local_sgd") for mo in ("restart", "keep", "average")]:
        out = Path(args.out or f"runs/bench_{args.optimizer}_state") / f"{mode}_{momentum}"
        overrides = {"train.output_dir": str(out), "train.epochs": args.epochs, "train.lr_schedule": {},
                     "train.seed": args.seed, "model.seed": args.seed, "resist.seed": args.seed,
                     "resist.mode": mode, "resist.momentum": momentum}
        if args.optimizer == "adam":
            overrides["deepspeed.optimizer"] = ADAM
        print(f"== {mode}, momentum {momentum}", flush=True)
        if launch(recipe_path("fashion_mnist_resist"), nproc=args.nproc, overrides=overrides, progress=False) != 0:
            return 2
        s = json.loads((out / "summary.json").read_text())
        rows.append((mode, momentum, s["metrics"]["accuracy"], s["round"]))
    optimizer = "Adam lr 1e-3" if args.optimizer == "adam" else "SGD lr 0.05 momentum 0.9 weight decay 5e-4 (the recipe's)"
    lines = [f"Fashion-MNIST, {optimizer}, {args.nproc} CPU ranks, {args.epochs} epochs, seed {args.seed}",
             f"{'mode':<10} {'momentum':<8} {'rounds':>6} {'test acc':>9}"]
    lines += [f"{m:<10} {mo:<8} {r:>6} {100 * a:>8.2f}%" for m, mo, a, r in rows]
    acc = {(m, mo): a for m, mo, a, _ in rows}
    for m in ("resist", "local_sgd"):
        lines.append(f"{m}: keep - restart {100 * (acc[m, 'keep'] - acc[m, 'restart']):+.2f} points, "
                     f"average - restart {100 * (acc[m, 'average'] - acc[m, 'restart']):+.2f} points")
    print("\n".join(lines))
    if args.record:
        write_record(args.record, lines, host=host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
