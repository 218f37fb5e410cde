#!/usr/bin/env python
"""GPU check: the CUDA / NCCL path end to end, and the sub-ResNet compute ratio on a GPU.

    python benchmarks/gpu_check.py [--out runs/gpu_check]

1. Compute per local step (forward + backward, batch 128 of 32x32) of the paper's CIFAR
   pre-activation ResNet101 and of one S = 4 sub-ResNet (6 of 22 blocks), fp32 and bf16
   autocast, median of timed steps with CUDA synchronisation; the ratio is printed beside
   the FLOP ratio.
2. The training tool on one GPU rank with NCCL: `resist-det train demo_shapes` for one short
   epoch on a small shapes set, then `--resume` for a second epoch, then `resist-det eval`.
Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from resist_det.record import host_line


def time_step(net: torch.nn.Module, dtype: torch.dtype | None, steps: int = 20) -> float:
    x = torch.randn(128, 3, 32, 32, device="cuda")
    y = torch.randint(0, 100, (128,), device="cuda")
    times = []
    for i in range(steps + 5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    return statistics.median(times)


def compute_ratio() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from resist_det.models import cifar_preact_resnet101
    from resist_det.resist.partition import partitionable_blocks
    from resist_det.resist.plan import make_plan
    from resist_det.resist.subnet import make_sub_resnet

    full = cifar_preact_resnet101(100).cuda()
    meta = cifar_preact_resnet101(100, device="meta")
    held = make_plan(0, 0, 4, 22, 5).groups[0]
    sub, _ = make_sub_resnet(meta, partitionable_blocks(meta), held)
    sub = sub.cuda()
    out = {"blocks": list(held)}
    for name, net in (("sub", sub), ("full", full)):
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(net(torch.randn(128, 3, 32, 32, device="cuda")), torch.zeros(128, dtype=torch.long, device="cuda")).backward()
        out[f"{name}_flops"] = fc.get_total_flops()
        net.zero_grad(set_to_none=True)
        out[f"{name}_fp32_s"] = time_step(net, None)
        out[f"{name}_bf16_s"] = time_step(net, torch.bfloat16)
    out["ratio_fp32"] = out["sub_fp32_s"] / out["full_fp32_s"]
    out["ratio_bf16"] = out["sub_bf16_s"] / out["full_bf16_s"]
    out["flop_ratio"] = out["sub_flops"] / out["full_flops"]
    return out


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    args = ap.parse_args()
    print(host_line(), flush=True)  # the machine the figures below come from
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, NCCL {torch.cuda.nccl.version()}", flush=True)

    res = compute_ratio()
    print(f"compute, batch 128 of 32x32, one GPU: sub-ResNet (blocks {res['blocks']}) / full ResNet101")
    print(f"  fp32: {res['sub_fp32_s'] * 1e3:.1f} ms / {res['full_fp32_s'] * 1e3:.1f} ms = {res['ratio_fp32']:.3f}")
    print(f"  bf16 autocast: {res['sub_bf16_s'] * 1e3:.1f} ms / {res['full_bf16_s'] * 1e3:.1f} ms = {res['ratio_bf16']:.3f}")
    print(f"  FLOP ratio (fwd+bwd): {res['flop_ratio']:.3f}", flush=True)

    out = Path(args.out)
    cli = [sys.executable, "-m", "resist_det.cli"]
    run(cli + ["data", "shapes", "--out", str(out / "data"), "--images", "400"])
    common = ["--set", f'data.root="{out}/data/VOCdevkit"', "--set", f'train.output_dir="{out}/resist"', "--no-progress"]
    run(cli + ["train", "demo_shapes", "--set", "train.epochs=1", *common])
    run(cli + ["train", "demo_shapes", "--set", "train.epochs=2", "--resume", *common])
    run(cli + ["eval", "--checkpoint", str(out / "resist")])
    summary = json.loads((out / "resist" / "summary.json").read_text())
    print(f"NCCL run: epochs {summary['epoch'] + 1}, VOC07 mAP {summary['metrics']['map_07']:.4f}, "
          f"wall {summary['wall']:.1f} s, rounds {summary['round']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
