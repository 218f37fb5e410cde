#!/usr/bin/env python
"""torchvision's detection reference adopting ResIST: its own ``train.py``, DDP against ResIST.

    python benchmarks/bench_tv_detection.py --vision PATH/TO/vision [--images 300] [--size 128]
        [--epochs 6] [--nproc 2] [--resist '{"local_steps": 10}'] [--runs ddp,resist]
        [--record benchmarks/results/tv_detection.txt]

``--vision`` is a checkout of pytorch/vision (its ``references/detection``: ``train.py``,
``engine.py``, ``utils.py``, ``coco_utils.py``, ``coco_eval.py``, ``presets.py``,
``transforms.py``, ``group_by_aspect_ratio.py``); nothing of it is kept in this repository.
The benchmark copies that folder twice, applies this project's patch to each at run time, and
runs both with ``torchrun`` on ``--nproc`` gloo CPU ranks on the same COCO-format shapes set
(``resist-det data shapes --format coco``):

* ``ddp``: the script unchanged except what a CPU needs (gloo instead of NCCL, no
  ``torch.cuda.set_device``, ``device_ids=None`` for a CPU module, a CPU tensor where it
  reduces its meters) and the set-up both runs share (a seed, so both start from the same
  weights; ``min_size`` / ``max_size`` for small images);
* ``resist``: the same, with the ``DistributedDataParallel`` wrap replaced by
  ``resist_det.torch.prepare`` after the optimizer.

Both are scored by the script's own ``evaluate()`` (COCO AP through pycocotools, on every rank:
ResIST's model scores the whole network in eval mode).  Printed: the patch and its size, COCO
AP and AP50 after each epoch and at the end, and the wall time.  Target: ResIST's final AP
within 0.02 of DDP's.  ``fasterrcnn_resnet50_fpn`` with ``weights=None, weights_backbone=None``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from resist_det.record import host_line, write_record

FILES = ("train.py", "engine.py", "utils.py", "coco_utils.py", "coco_eval.py", "presets.py", "transforms.py",
         "group_by_aspect_ratio.py")

#: (file, upstream text, replacement): what a CPU needs, and the set-up both runs share.
CPU = [
    ("utils.py", '    torch.cuda.set_device(args.gpu)\n    args.dist_backend = "nccl"\n',
     '    args.dist_backend = "gloo"\n'),
    ("utils.py", 'dtype=torch.float64, device="cuda")', 'dtype=torch.float64, device="cpu")'),
    ("train.py", "DistributedDataParallel(model, device_ids=[args.gpu])", "DistributedDataParallel(model, device_ids=None)"),
]
SETUP = [
    ("train.py", '    kwargs = {"trainable_backbone_layers": args.trainable_backbone_layers}\n',
     '    torch.manual_seed(0)  # both runs start from the same weights\n'
     '    kwargs = {"trainable_backbone_layers": args.trainable_backbone_layers, "min_size": {size}, "max_size": {size}}\n'),
]
#: ResIST in place of the DDP wrap (applied after CPU and SETUP).
RESIST = [
    ("train.py", "    if args.distributed:\n        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)\n"
                 "        model_without_ddp = model.module\n", ""),
    ("train.py", '        raise RuntimeError(f"Invalid optimizer {args.opt}. Only SGD and AdamW are supported.")\n',
     '        raise RuntimeError(f"Invalid optimizer {args.opt}. Only SGD and AdamW are supported.")\n'
     '    import resist_det.torch\n'
     '    model, optimizer = resist_det.torch.prepare(model, optimizer, resist={resist})\n'
     '    model_without_ddp = model.module\n'),
]
AP_LINE = re.compile(r"Average Precision\s+\(AP\) @\[ IoU=(0\.50:0\.95|0\.50)\s+\| area=\s+all \| maxDets=100 \] = ([-\d.]+)")


def patched(src: Path, dst: Path, patches: list[tuple[str, str, str]], fill: dict[str, str]) -> None:
    """Copy the reference's files from ``src`` to ``dst`` and apply ``patches`` (each must match once)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(src / name, dst / name)
    for name, old, new in patches:
        text = (dst / name).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"error: --vision: {src / name} does not contain exactly once:\n{old}\n(this patch was written "
                             f"for pytorch/vision's references of torchvision 0.25-0.29)")
        for key, value in fill.items():
            new = new.replace("{" + key + "}", value)
        (dst / name).write_text(text.replace(old, new))


def diff(a: Path, b: Path) -> tuple[list[str], int]:
    """Unified diff of the reference's files between two folders, and its changed lines (+ and -)."""
    lines = []
    for name in FILES:
        lines += difflib.unified_diff((a / name).read_text().splitlines(), (b / name).read_text().splitlines(),
                                      f"{a.name}/{name}", f"{b.name}/{name}", n=0, lineterm="")
    changed = sum(1 for x in lines if x[:1] in "+-" and not x.startswith(("+++", "---")))
    return lines, changed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(folder: Path, args, coco: Path) -> dict:
    """``torchrun`` the patched reference; its per-epoch COCO AP and the wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", str(free_port()),
           "train.py", "--data-path", str(coco), "--dataset", "coco", "--model", "fasterrcnn_resnet50_fpn", "--device", "cpu",
           "--epochs", str(args.epochs), "-b", str(args.batch), "--lr", str(args.lr), "--lr-steps", *args.lr_steps.split(","),
           "-j", "0", "--output-dir", "", "--print-freq", "25", "--aspect-ratio-group-factor", "-1"]
    t0 = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    wall = time.monotonic() - t0
    text = (folder / "log.txt").read_text()
    if code != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"error: the {folder.name} run failed (exit {code}); log: {folder / 'log.txt'}")
    found = AP_LINE.findall(text)
    ap = [float(v) for k, v in found if k == "0.50:0.95"]
    ap50 = [float(v) for k, v in found if k == "0.50"]
    return {"ap": ap, "ap50": ap50, "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", type=Path, required=True, help="a checkout of pytorch/vision")
    ap.add_argument("--images", type=int, default=300, help="shapes images (VOC trainval -> train2017, test -> val2017)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.005, help="0.02 (the reference's) turns the loss NaN here")
    ap.add_argument("--lr-steps", default="4,5", help="epochs at which the reference's MultiStepLR divides by 10")
    ap.add_argument("--batch", type=int, default=2, help="images per rank")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--resist", default='{"local_steps": 10}', help="the resist settings passed to prepare() (JSON)")
    ap.add_argument("--runs", default="ddp,resist", help="which runs (a diagnostic may leave DDP out)")
    ap.add_argument("--max-gap", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_tv_detection"))
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args()
    ref = args.vision / "references" / "detection"
    missing = [n for n in FILES if not (ref / n).is_file()]
    if missing:
        print(f"error: --vision: {ref} lacks {', '.join(missing)} (expected a checkout of pytorch/vision)", file=sys.stderr)
        return 1
    host = host_line()
    print(host, flush=True)
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "resist_det.cli", "data", "shapes", "--out", str(work / "shapes"), "--images",
                    str(args.images), "--size", str(args.size), "--format", "coco"], check=True, stdout=subprocess.DEVNULL)
    coco = work / "shapes" / "coco"
    try:
        resist = json.loads(args.resist)
    except json.JSONDecodeError as e:
        print(f"error: --resist: not JSON ({e})", file=sys.stderr)
        return 1
    runs = args.runs.split(",")
    if not runs or set(runs) - {"ddp", "resist"}:
        print(f"error: --runs: expected ddp, resist or both, comma-separated; got {args.runs!r}", file=sys.stderr)
        return 1
    fill = {"size": str(args.size), "resist": repr(resist)}
    patched(ref, work / "upstream", [], fill)
    patched(ref, work / "ddp", CPU + SETUP, fill)
    patched(work / "ddp", work / "resist", RESIST, fill)
    cpu_diff, cpu_lines = diff(work / "upstream", work / "ddp")
    resist_diff, resist_lines = diff(work / "ddp", work / "resist")
    results = {}
    for name in runs:
        print(f"== {name}", flush=True)
        results[name] = run(work / name, args, coco)
        print(f"  AP per epoch {results[name]['ap']}  wall {results[name]['wall']:.0f} s", flush=True)
    lines = [f"torchvision's references/detection/train.py from {args.vision} (torchvision {_tv_version()} installed), "
             f"fasterrcnn_resnet50_fpn (no pretrained weights), shapes {args.images} images {args.size}px (COCO layout), "
             f"{args.nproc} gloo CPU ranks x {args.batch} images, {args.epochs} epochs, lr {args.lr}, lr steps {args.lr_steps}; "
             f"ResIST settings {json.dumps(resist)}",
             f"patch for a CPU and the shared set-up ({cpu_lines} changed lines):", *cpu_diff,
             f"patch for ResIST beyond that ({resist_lines} changed lines):", *resist_diff,
             "run      COCO AP per epoch (the script's evaluate(), pycocotools)                    final AP  AP50   wall (s)"]
    for name, res in results.items():
        lines.append(f"{name:8s} {' '.join(f'{a:.3f}' for a in res['ap']):60s}  {res['ap'][-1]:.3f}    "
                     f"{res['ap50'][-1]:.3f}  {res['wall']:8.0f}")
    checks = [(f"ResIST patch at most 6 changed lines beyond what a CPU needs: {resist_lines}", resist_lines <= 6)]
    if len(results) == 2:
        d, r = results["ddp"]["ap"][-1], results["resist"]["ap"][-1]
        checks.append((f"ResIST final COCO AP within {args.max_gap} of DDP's: {r:.3f} vs {d:.3f} (gap {r - d:+.3f})",
                       abs(r - d) <= args.max_gap))
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_record(args.record, text, host=host)
    return 0 if all(ok for _, ok in checks) else 1


def _tv_version() -> str:
    import torchvision

    return torchvision.__version__


if __name__ == "__main__":
    sys.exit(main())
