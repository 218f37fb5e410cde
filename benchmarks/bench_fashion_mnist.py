#!/usr/bin/env python
"""Real-data comparison: ResIST vs local SGD on Fashion-MNIST, 2 CPU ranks, 3 seeds each.

    python benchmarks/bench_fashion_mnist.py [--seeds 0 1 2] [--nproc 2] [--out runs/bench_fmnist]

Needs the four Fashion-MNIST IDX files (Debian: `apt-get install dataset-fashion-mnist`, which
puts them in /usr/share/datasets/fashion-mnist; or `--data DIR`). Both recipes are the shipped
`fashion_mnist_resist.json` / `fashion_mnist_localsgd.json` (same model, data, epochs and
optimizer; only `resist.mode` differs). Prints final test accuracy, training wall time and
bytes communicated per run, the means, and the accuracy gap (target: ResIST within 1.0 point
of local SGD, as the paper's Table 2). Exits 1 when the gap is larger.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from resist_det.train.launch import launch, recipe_path
from resist_det.record import host_line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: the recipe's)")
    ap.add_argument("--out", default="runs/bench_fmnist")
    ap.add_argument("--modes", nargs="+", default=["resist", "local_sgd"], choices=["resist", "local_sgd"])
    ap.add_argument("--bits", type=int, default=32, choices=[4, 5, 6, 7, 8, 32], help="resist.compression.bits of every run")
    ap.add_argument("--reuse-finished", action="store_true",
                    help="take runs whose summary.json already exists in --out instead of training them again")
    args = ap.parse_args()
    print(host_line(), flush=True)  # the machine the figures below come from

    rows = []
    t0 = time.time()
    for seed in args.seeds:
        for mode, recipe in (("resist", "fashion_mnist_resist"), ("local_sgd", "fashion_mnist_localsgd")):
            if mode not in args.modes:
                continue
            out = Path(args.out) / f"{mode}_seed{seed}"
            overrides = {"train.output_dir": str(out), "train.seed": seed, "model.seed": seed, "resist.seed": seed}
            if args.bits != 32:
                overrides["resist.compression"] = {"bits": args.bits}
            if args.data:
                overrides["data.root"] = args.data
            print(f"== {mode}, seed {seed}", flush=True)
            if args.reuse_finished and (out / "summary.json").is_file():
                print(f"(finished run reused: {out / 'summary.json'})", flush=True)
            elif launch(recipe_path(recipe), nproc=args.nproc, overrides=overrides, progress=True) != 0:
                print(f"training failed: {mode} seed {seed}", file=sys.stderr)
                return 2
            s = json.loads((out / "summary.json").read_text())
            rows.append({"mode": mode, "seed": seed, "accuracy": s["metrics"]["accuracy"], "wall": s["wall"], "bytes": s["bytes"]})

    print(f"\nFashion-MNIST, {args.nproc} CPU ranks, seeds {args.seeds} (total {time.time() - t0:.0f} s)")
    print(f"{'mode':<10} {'seed':>4} {'test acc':>9} {'wall (s)':>9} {'bytes (MiB)':>12}")
    for r in rows:
        print(f"{r['mode']:<10} {r['seed']:>4} {100 * r['accuracy']:>8.2f}% {r['wall']:>9.1f} {r['bytes'] / 2**20:>12.1f}")
    if len(args.modes) < 2:  # one mode: its figures only (compare with a recorded run of the other settings)
        return 0
    mean = {m: {k: statistics.mean(r[k] for r in rows if r["mode"] == m) for k in ("accuracy", "wall", "bytes")} for m in ("resist", "local_sgd")}
    for m, v in mean.items():
        print(f"{m:<10} {'mean':>4} {100 * v['accuracy']:>8.2f}% {v['wall']:>9.1f} {v['bytes'] / 2**20:>12.1f}")
    gap = 100 * (mean["local_sgd"]["accuracy"] - mean["resist"]["accuracy"])
    print(f"accuracy gap (local SGD - ResIST): {gap:+.2f} points (target: at most 1.00; paper Table 2: under 1 point)")
    print(f"ResIST / local SGD: wall {mean['resist']['wall'] / mean['local_sgd']['wall']:.3f}, "
          f"bytes {mean['resist']['bytes'] / mean['local_sgd']['bytes']:.3f}")
    ok = gap <= 1.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
