#!/usr/bin/env python
"""The drop-in contract on a DeepSpeed user's script: two changed lines plus a ``resist`` section.

    python benchmarks/bench_deepspeed_example.py [--images 4096] [--nproc 2] [--record benchmarks/results/deepspeed_example.txt]

Takes ``benchmarks/deepspeed_example/cifar10_deepspeed.py`` (the shape of DeepSpeedExamples'
CIFAR script: Adam + WarmupLR in a config written in the script, or ``--deepspeed_config
ds.json``; Fashion-MNIST padded to 3x32x32; torchvision's stock ResNet50), writes its ResIST
version by changing ``import deepspeed`` -> ``import deepspeed, resist_det`` and
``deepspeed.initialize`` -> ``resist_det.initialize`` and adding the ``resist`` section, prints
the diff, and runs on ``--nproc`` CPU ranks: plain DeepSpeed data parallel, ResIST with the
config in the script, and ResIST with ``--deepspeed --deepspeed_config ds.json``.  Target:
ResIST's test accuracy within 2 points of DeepSpeed's after the same steps.  Needs the
Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from resist_det.record import host_line, write_record

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "deepspeed_example" / "cifar10_deepspeed.py"
DEFAULT_SECTION = '{"local_steps": 5, "min_blocks": 2}'


def resist_version(text: str, section: str) -> str:
    """The user's script with ``resist_det.initialize`` in place of ``deepspeed.initialize``."""
    text = text.replace("import deepspeed\n", "import deepspeed, resist_det\n", 1)
    text = text.replace("= deepspeed.initialize(", "= resist_det.initialize(")
    added = f'        "resist": {section},  # the added section\n'
    return text.replace('        "gradient_clipping": 1.0,\n', '        "gradient_clipping": 1.0,\n' + added, 1)


def run(script: Path, nproc: int, images: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script),
           "--images", str(images), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--resist", default=DEFAULT_SECTION, help="the added resist section (JSON)")
    ap.add_argument("--record", type=Path, default=None, help="also write the output to this file")
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    original = SCRIPT.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        derived = Path(tmp) / "cifar10_resist.py"
        derived.write_text(resist_version(original, json.dumps(json.loads(args.resist))))
        diff = [d for d in difflib.unified_diff(original.splitlines(), derived.read_text().splitlines(), lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        say(f"the ResIST version differs from {SCRIPT.relative_to(HERE.parent)} in {len(diff)} diff lines:")
        for d in diff:
            say("  " + d.strip()[:150])
        ds_json = Path(tmp) / "ds.json"
        import importlib.util

        spec = importlib.util.spec_from_file_location("derived", derived)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ds_json.write_text(json.dumps(module.get_ds_config(None)))
        runs = {
            "deepspeed (data parallel)": run(SCRIPT, args.nproc, args.images, []),
            "resist, config in the script": run(derived, args.nproc, args.images, []),
            "resist, --deepspeed_config ds.json": run(derived, args.nproc, args.images, ["--deepspeed", "--deepspeed_config", str(ds_json)]),
        }
    say(f"\n{'run':38s} {'steps':>6s} {'accuracy':>9s} {'first loss':>11s} {'last loss':>10s} {'wall s':>8s}")
    for name, r in runs.items():
        say(f"{name:38s} {r['steps']:6d} {100 * r['accuracy']:8.2f}% {r['first_loss']:11.3f} {r['last_loss']:10.3f} {r['wall']:8.1f}")
    base = runs["deepspeed (data parallel)"]["accuracy"]
    gaps = [100 * (base - r["accuracy"]) for n, r in runs.items() if n.startswith("resist")]
    ok = all(g <= 2.0 for g in gaps) and len({r["steps"] for r in runs.values()}) == 1
    say(f"\naccuracy gap to DeepSpeed: {', '.join(f'{g:.2f}' for g in gaps)} points (target <= 2.0): {'PASS' if ok else 'FAIL'}")
    if args.record:
        write_record(args.record, out, host=host)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
