"""The demo: ResIST against local SGD on a synthetic VOC-format shapes set, side by side.

Makes the shapes set, trains the detector with each mode on 2 CPU ranks, evaluates both,
prints a table (mAP, wall time, bytes communicated, per-rank memory) and writes a PNG of
mAP against bytes and against time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.shapes import write_shapes_dataset
from .launch import launch, recipe_path
from .plot import plot_runs

__all__ = ["run_demo"]

MODES = ("resist", "local_sgd")


def run_demo(out: str | Path = "runs/demo", *, nproc: int = 2, images: int = 1200, epochs: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    data = out / "data"
    if not (data / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        write_shapes_dataset(data, images, image_size=128, seed=0)
    results: dict[str, Any] = {}
    for mode in MODES:
        overrides: dict[str, Any] = {
            "resist.mode": mode,
            "data.root": str(data / "VOCdevkit"),
            "train.output_dir": str(out / mode),
        }
        if epochs is not None:
            overrides["train.epochs"] = epochs
        print(f"== training with {mode} on {nproc} ranks", flush=True)
        code = launch(recipe_path("demo_shapes"), nproc=nproc, overrides=overrides, progress=progress)
        if code != 0:
            raise RuntimeError(f"training with {mode} failed (exit code {code})")
        results[mode] = json.loads((out / mode / "summary.json").read_text())
    plot = plot_runs([out / m for m in MODES], out / "demo.png")
    return {"runs": results, "plot": str(plot)}
