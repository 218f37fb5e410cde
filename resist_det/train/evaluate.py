"""``resist-det eval``: evaluate a saved global network (from ResIST, local SGD or DDP training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import load_recipe
from ..io import tensor_checksums
from .rundir import GLOBAL_MODEL_FILE
from .tasks import build_task

__all__ = ["load_global_model", "evaluate_checkpoint"]


def _checkpoint_file(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        p = p / GLOBAL_MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no global model there (training writes {GLOBAL_MODEL_FILE} in its output_dir)")
    return p


def load_global_model(checkpoint: str | Path) -> tuple[dict[str, Any], Any]:
    """The saved record of a global network (weights with the residual scales folded in, recipe) and its recipe."""
    path = _checkpoint_file(checkpoint)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: runs no code
    except Exception as e:  # a truncated, foreign or code-carrying file; torch's advice (to unpickle it) is not repeated
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e):
            first = "it holds objects other than tensors and plain values, which would run code if loaded"
        raise ValueError(f"{path} is not a resist_det global model ({first})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or "recipe" not in saved:
        raise ValueError(f"{path} is not a resist_det global model (expected a dict with 'model' tensors, "
                         "'sha256' and 'recipe')")
    sums = saved.get("sha256")
    if not isinstance(sums, dict):  # the checksums are required: a file cannot switch its own check off
        raise ValueError(f"{path} has no per-tensor checksums ('sha256'); not a resist_det global model")
    if not all(torch.is_tensor(v) for v in saved["model"].values()):
        raise ValueError(f"{path}: 'model' holds something other than tensors; not a resist_det global model")
    bad = sorted(k for k, h in tensor_checksums(saved["model"]).items() if sums.get(k) != h)
    if bad or sums.keys() != saved["model"].keys():
        raise ValueError(f"{path} is damaged: tensors {', '.join(bad[:5]) or '(missing)'} differ from "
                         "their checksums recorded when it was saved")
    return saved, load_recipe(saved["recipe"])


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_root: str | None = None,
    year: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    metric: str = "voc",
) -> dict[str, Any]:
    """Metrics of a saved global network on a test set (default: the recipe's own); ``metric``
    ``"coco"`` adds a detector's COCO AP (pycocotools) to its VOC AP."""
    if metric not in ("voc", "coco"):
        raise ValueError(f"metric: expected 'voc' or 'coco', got {metric!r}")
    saved, recipe = load_global_model(checkpoint)
    overrides: dict[str, Any] = {}
    if data_root is not None:
        overrides["root"] = data_root
    if year is not None or split is not None:
        if recipe.data.kind != "voc":
            raise ValueError("a VOC year and split apply to VOC detection checkpoints only")
        y0, s0 = recipe.data.test_sets[0]
        overrides["test_sets"] = [(year or y0, split or s0)]
    overrides["limit_test"] = limit
    overrides["skip_bad"] = False  # a score over part of a test set is not comparable: every image must be usable
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update=overrides)})
    task = build_task(recipe, with_train=False)
    trained = saved.get("class_names")
    if trained is not None and list(task.class_names) != list(trained):
        raise ValueError(f"data root {recipe.data.root}: the test set's classes {list(task.class_names)} differ from the {len(trained)} classes "
                         f"the network was trained on {list(trained)}; scoring one class's output as another would be wrong")
    net = task.make_model(None)
    net.load_state_dict(saved["model"])
    if metric == "coco" and recipe.data.kind != "voc":
        raise ValueError(f"COCO AP applies to detection checkpoints; {checkpoint} is a {recipe.data.kind} classifier")
    metrics = task.evaluate(net, batch_size=batch_size, conf_threshold=recipe.train.conf_threshold, metric=metric)
    return {
        "checkpoint": str(_checkpoint_file(checkpoint)),
        "mode": recipe.resist.mode,
        "epoch": saved.get("epoch"),
        "data": {"root": recipe.data.root, "test_sets": recipe.data.test_sets if recipe.data.kind == "voc" else "test"},
        "class_names": task.class_names,
        "main_metric": task.main_metric,
        "metrics": metrics,
    }
