"""The per-rank part of a ResIST checkpoint, and the check that a run may resume from it.

DeepSpeed saves rank 0's module and optimizer only; under ResIST each rank holds other blocks
(and, mid-round, other weights), so each rank also writes its own module, optimizer and ResIST
state, and rank 0 writes a small JSON record of the run that wrote the checkpoint::

    <save_dir>/<tag>/resist_rank00.pt  ...  resist_rank{S-1:02d}.pt
    <save_dir>/<tag>/resist.json        {"world_size": S, "resist": {...the resist section...}}

Rank files hold tensors and plain values only and load with ``weights_only=True``.
:func:`check_checkpoint` reads only the JSON record and file names, so a launcher can refuse an
incompatible resume before any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_torch_save, atomic_write_json
from .config import ResISTConfig

__all__ = ["rank_file", "save_rank_state", "load_rank_state", "write_record", "check_checkpoint", "latest_tag"]

RECORD_FILE = "resist.json"


def rank_file(checkpoint_dir: str | Path, tag: str, rank: int) -> Path:
    """Where a rank keeps what only it holds (its sub-ResNet and optimizer state)."""
    return Path(checkpoint_dir) / str(tag) / f"resist_rank{rank:02d}.pt"


def latest_tag(checkpoint_dir: str | Path) -> str:
    """The tag DeepSpeed's ``latest`` file names; a clear error when there is none."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} (no 'latest' file)")
    return latest.read_text().strip()


def save_rank_state(checkpoint_dir: str | Path, tag: str, rank: int, state: dict[str, Any]) -> Path:
    """Write this rank's file atomically."""
    return atomic_torch_save(state, rank_file(checkpoint_dir, tag, rank))


def write_record(checkpoint_dir: str | Path, tag: str, world_size: int, config: ResISTConfig) -> Path:
    """Rank 0: the JSON record of the run that wrote the checkpoint."""
    record = {"world_size": world_size, "resist": config.model_dump(mode="json")}
    return atomic_write_json(Path(checkpoint_dir) / str(tag) / RECORD_FILE, record)


def load_rank_state(checkpoint_dir: str | Path, tag: str, rank: int) -> dict[str, Any]:
    """This rank's file (tensors and plain values only: no code runs while it loads)."""
    path = rank_file(checkpoint_dir, tag, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged or foreign
        raise ValueError(f"cannot read the ResIST rank file {path}: {e}") from None


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"resist.{k} (saved {saved.get(k)!r}, now {current.get(k)!r})"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_checkpoint(checkpoint_dir: str | Path, tag: str, world_size: int, config: ResISTConfig) -> None:
    """Refuse a checkpoint written by another world size or ``resist`` section; changes nothing.

    Raises:
        FileNotFoundError: the tag or its record is missing.
        ValueError: world size, rank files or ``resist`` keys differ (the keys are named).
    """
    where = Path(checkpoint_dir) / str(tag)
    record_path = where / RECORD_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"checkpoint {where} has no {RECORD_FILE}: it is incomplete or not a ResIST checkpoint")
    try:
        record = json.loads(record_path.read_text())
        saved_world, saved_config = int(record["world_size"]), dict(record["resist"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record_path}: not a ResIST checkpoint record ({e})") from None
    if saved_world != world_size:
        raise ValueError(f"checkpoint {where} was written by {saved_world} ranks, but this run has {world_size}")
    # (Mode ddp keeps every rank identical: DeepSpeed's own files hold everything.)
    needed = range(world_size) if config.mode != "ddp" else ()
    missing = [r for r in needed if not rank_file(checkpoint_dir, tag, r).is_file()]
    if missing:
        raise ValueError(f"checkpoint {where} is incomplete: no rank file for ranks {missing}")
    diff = _differences(saved_config, config.model_dump(mode="json"))
    if diff:
        raise ValueError(f"checkpoint {where} was written with a different resist section: {'; '.join(diff)}")
