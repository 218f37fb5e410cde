#!/usr/bin/env python
"""Compressed transport on real data: ResIST on Fashion-MNIST at fp32, 8/6/5/4 bits and top-k.

    python benchmarks/bench_compression.py [--settings fp32,8bit,6bit,5bit,4bit,topk25]
        [--seeds 0,1,2] [--table-seeds 0] [--nproc 2] [--out runs/bench_compression] [--record FILE]

Every run is the shipped ``fashion_mnist_resist`` recipe (2 CPU ranks) with only
``resist.compression`` changed.  ``fp32`` and ``8bit`` run with every seed in ``--seeds`` (the
acceptance check: 8-bit within 0.5 point of fp32, mean of the seeds); the other settings with
``--table-seeds``.  Prints final test accuracy and bytes sent per run and per setting, beside the
paper's Table 9 (CIFAR-10 / CIFAR-100 with ResNet101, 4 GPUs; top-k 25 %: CIFAR-100 only).
Needs the Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist`` or ``--data DIR``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from resist_det.train.launch import launch, recipe_path
from resist_det.record import host_line, write_record

SETTINGS = {
    "fp32": {"bits": 32}, "8bit": {"bits": 8}, "7bit": {"bits": 7}, "6bit": {"bits": 6}, "5bit": {"bits": 5},
    "4bit": {"bits": 4}, "topk25": {"topk": 0.25}, "topk25_8bit": {"topk": 0.25, "bits": 8},
}
# Paper Table 9 (and A.5's text for top-k 25 %): (CIFAR-10, CIFAR-100) test accuracy, %.
PAPER = {"8bit": (92.14, 71.38), "7bit": (92.26, 72.15), "6bit": (91.91, 71.37), "5bit": (91.35, 68.29),
         "4bit": (76.33, 40.48), "topk25": (None, 71.25)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="fp32,8bit,6bit,5bit,4bit,topk25", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of fp32 and 8bit")
    ap.add_argument("--table-seeds", default="0", help="seeds of the other settings")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: the recipe's)")
    ap.add_argument("--out", default="runs/bench_compression")
    ap.add_argument("--record", type=Path, default=None, help="also write the summary (with the command) to this file")
    ap.add_argument("--reuse-finished", action="store_true", help="take runs whose summary.json exists in --out")
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        print(f"error: --settings: unknown {', '.join(unknown)} (expected some of {', '.join(SETTINGS)})", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    table_seeds = [int(s) for s in args.table_seeds.split(",")]

    rows = []
    t0 = time.time()
    for setting in settings:
        for seed in (seeds if setting in ("fp32", "8bit") else table_seeds):
            out = Path(args.out) / f"{setting}_seed{seed}"
            overrides = {"train.output_dir": str(out), "train.seed": seed, "model.seed": seed, "resist.seed": seed,
                         "resist.compression": SETTINGS[setting]}
            if args.data:
                overrides["data.root"] = args.data
            print(f"== {setting}, seed {seed}", flush=True)
            if args.reuse_finished and (out / "summary.json").is_file():
                print(f"(finished run reused: {out / 'summary.json'})", flush=True)
            elif launch(recipe_path("fashion_mnist_resist"), nproc=args.nproc, overrides=overrides, progress=True) != 0:
                print(f"training failed: {setting} seed {seed}", file=sys.stderr)
                return 2
            s = json.loads((out / "summary.json").read_text())
            rows.append({"setting": setting, "seed": seed, "accuracy": 100 * s["metrics"]["accuracy"], "bytes": s["bytes"]})

    lines = [f"ResIST on Fashion-MNIST (shipped recipe), {args.nproc} CPU ranks, resist.compression varied "
             f"(total {time.time() - t0:.0f} s)",
             f"{'setting':<12} {'seed':>4} {'test acc':>9} {'MiB sent':>9}"]
    lines += [f"{r['setting']:<12} {r['seed']:>4} {r['accuracy']:>8.2f}% {r['bytes'] / 2**20:>9.1f}" for r in rows]
    lines.append("")
    lines.append(f"{'setting':<12} {'seeds':>5} {'mean acc':>9} {'bytes / fp32':>12}   paper Table 9:  CIFAR-10  CIFAR-100")
    mean = {}
    for setting in settings:
        rs = [r for r in rows if r["setting"] == setting]
        mean[setting] = (statistics.mean(r["accuracy"] for r in rs), statistics.mean(r["bytes"] for r in rs))
    fp32_bytes = mean.get("fp32", (None, None))[1]
    for setting, (acc, b) in mean.items():
        c10, c100 = PAPER.get(setting, (None, None))
        paper = f"{_pct(c10):>22}  {_pct(c100):>9}" if setting in PAPER else ""
        ratio = f"{b / fp32_bytes:.3f}" if fp32_bytes else "-"
        lines.append(f"{setting:<12} {len([r for r in rows if r['setting'] == setting]):>5} {acc:>8.2f}% {ratio:>12}   {paper}")
    ok = True
    if "fp32" in mean and "8bit" in mean:
        gap = mean["fp32"][0] - mean["8bit"][0]
        ok = gap <= 0.5
        lines.append(f"8-bit vs fp32 ResIST (mean of seeds {seeds}): {gap:+.2f} points (target: at most 0.50) "
                     f"{'PASS' if ok else 'FAIL'}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.record:
        write_record(args.record, text, host=host)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
