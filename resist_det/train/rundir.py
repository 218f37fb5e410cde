"""The run directory, one owner for its layout: where checkpoints, the resolved recipe, the
metrics log, the summary and the global network live, and how the global network is saved.

::

    <train.output_dir>/checkpoints/<tag>/...   recipe.json   metrics.jsonl   summary.json   global_model.pt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Recipe
from ..io import atomic_torch_save, tensor_checksums

__all__ = ["RunDir", "GLOBAL_MODEL_FILE", "save_global_model", "check_same_recipe", "finished_message", "RESUMABLE_KEYS"]

GLOBAL_MODEL_FILE = "global_model.pt"


@dataclass(frozen=True)
class RunDir:
    """The files of one training run under ``root`` (``train.output_dir``)."""

    root: Path

    @classmethod
    def of(cls, recipe: Recipe) -> RunDir:
        return cls(Path(recipe.train.output_dir))

    checkpoints = property(lambda self: self.root / "checkpoints")
    recipe = property(lambda self: self.root / "recipe.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    global_model = property(lambda self: self.root / GLOBAL_MODEL_FILE)


def save_global_model(path: Path, net: torch.nn.Module, recipe: Recipe, epoch: int, metrics: dict[str, Any],
                      class_names: list[str] | None = None) -> None:
    """The global network (residual scales folded into its weights) with its recipe; ``resist-det eval`` reads it."""
    state = net.state_dict()
    record = recipe.model_dump(mode="json")
    if class_names is not None and record["data"].get("classes") == []:
        record["data"]["classes"] = list(class_names)  # the names resolved from the training data, not "[] = collect"
    atomic_torch_save({"model": state, "sha256": tensor_checksums(state), "recipe": record, "epoch": epoch,
                       "metrics": metrics, "class_names": list(class_names) if class_names is not None else None}, path)


# Keys a resume may change: more epochs, and where the run directory now lives.
# (and how the run is kept and watched: logging, checkpoint pruning, the communication timeout).
RESUMABLE_KEYS = {("train", "epochs"), ("train", "output_dir"), ("train", "log_every"), ("train", "keep_checkpoints"),
                  ("train", "comm_timeout_minutes")}


def check_same_recipe(recipe: Recipe) -> None:
    """Refuse to resume with a recipe whose keys differ from the run's ``recipe.json``, naming them."""
    saved = RunDir.of(recipe).recipe
    if not saved.is_file():
        return
    from ..io import read_json_file

    old = read_json_file(saved, "run's recipe")
    if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.values()):
        raise ValueError(f"{saved}: not a run's recipe (expected a JSON object of sections); restore it, or resume "
                         "into a new train.output_dir")
    new = recipe.model_dump(mode="json")
    changed = sorted(
        f"{sec}.{k}" for sec in new for k in (set(new[sec]) | set(old.get(sec, {})))
        if isinstance(new[sec], dict) and (sec, k) not in RESUMABLE_KEYS and new[sec].get(k) != old.get(sec, {}).get(k)
        and (k in old.get(sec, {}) or k not in getattr(type(getattr(recipe, sec)), "model_fields", {}))  # a key newer than the run: default
    )
    if changed:
        raise ValueError(f"the recipe differs from {saved}, the one the checkpoint was trained with ({', '.join(changed)})")


def finished_message(recipe: Recipe) -> str:
    return (f"the run in {recipe.train.output_dir} has finished (all {recipe.train.epochs} epochs trained); "
            "nothing to do, its files are left as they are (raise train.epochs to train it further)")
