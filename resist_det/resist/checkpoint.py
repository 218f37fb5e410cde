"""The per-rank part of a ResIST checkpoint, and the check that a run may resume from it.

DeepSpeed saves rank 0's module and optimizer only; under ResIST each rank holds other blocks
(and, mid-round, other weights), so each rank also writes its own module, optimizer and ResIST
state, and rank 0 writes a small JSON record of the run that wrote the checkpoint::

    <save_dir>/<tag>/resist_rank00.pt  ...  resist_rank{S-1:02d}.pt
    <save_dir>/<tag>/resist.json        {"world_size": S, "resist": {...the resist section...}}

Rank files hold tensors and plain values only and load with ``weights_only=True``.
:func:`check_checkpoint` reads only the JSON record and file names, so a launcher can refuse an
incompatible resume before any rank starts.

A checkpoint is *complete* once its record lists every file of the tag with its size and
SHA-256 (written by rank 0 after every rank's and DeepSpeed's files are on disk and fsynced);
only then does ``latest`` move to it.  A tag without that manifest is an interrupted save and is
never resumed from (:func:`resume_tag` falls back to the newest complete one); a file whose
checksum differs is refused by name (:func:`verify_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_torch_save, atomic_write_json, atomic_write_text
from .config import ResISTConfig

__all__ = ["rank_file", "save_rank_state", "load_rank_state", "write_record", "check_checkpoint", "latest_tag",
           "resume_tag", "verify_files", "prune", "is_complete", "check_plain_tensors"]

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())  # DeepSpeed's own writes are not fsynced: make them durable before `latest` moves
    return h.hexdigest()


def write_record(checkpoint_dir: str | Path, tag: str, world_size: int, config: ResISTConfig, *,
                 mark_latest: bool = True, step: int | None = None) -> Path:
    """Rank 0, after every rank has written its files: the JSON record of the run with the
    manifest of the tag's files (size, SHA-256), then ``latest`` (both atomic)."""
    where = Path(checkpoint_dir) / str(tag)
    for stale in where.glob(".*.tmp"):  # a rank killed while writing this tag in an earlier attempt; none is writing now
        stale.unlink(missing_ok=True)
    files = {p.relative_to(where).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(where.rglob("*")) if p.is_file() and p.name != RECORD_FILE and not p.name.endswith(".tmp")}
    record = {"world_size": world_size, "resist": config.model_dump(mode="json"), "step": step, "files": files}
    path = atomic_write_json(where / RECORD_FILE, record)
    if mark_latest:
        for stale in Path(checkpoint_dir).glob(".latest.*.tmp"):  # rank 0 killed while moving `latest`; only it writes it
            stale.unlink(missing_ok=True)
        atomic_write_text(Path(checkpoint_dir) / "latest", str(tag))
    return path


def _record(checkpoint_dir: str | Path, tag: str) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(checkpoint_dir) / str(tag) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "world_size" not in record:
        return None
    if not isinstance(record.get("files"), dict) or not record["files"]:
        return None  # no manifest: nothing vouches for the files, so this is no complete checkpoint
    return record


def is_complete(checkpoint_dir: str | Path, tag: str) -> bool:
    """The tag's manifest was written (rank 0 writes it only once every file is on disk).

    A file the manifest lists that is missing or of another size is damage, not an interrupted
    save: :func:`verify_files` refuses it by name."""
    return _record(checkpoint_dir, tag) is not None


def _tags(checkpoint_dir: str | Path) -> list[str]:
    """Complete tags, oldest first (by the time their manifest was written)."""
    root = Path(checkpoint_dir)
    found = [d for d in root.iterdir() if d.is_dir() and is_complete(root, d.name)] if root.is_dir() else []
    def order(d: Path) -> tuple:  # the training step when saved (copies keep it; mtimes they may not), then time
        step = (_record(root, d.name) or {}).get("step")
        return (step if isinstance(step, int) else -1, (d / RECORD_FILE).stat().st_mtime_ns, d.name)

    return [d.name for d in sorted(found, key=order)]


def resume_tag(checkpoint_dir: str | Path) -> tuple[str, str | None]:
    """The newest complete checkpoint: ``(tag, note)``, the note saying why ``latest`` was passed over."""
    root = Path(checkpoint_dir)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if latest is not None and is_complete(root, latest):
        return latest, None
    tags = _tags(root)
    if not tags:
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} (no 'latest' file)")
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} ('latest' names {latest}, whose save did not finish)")
    why = "there is no 'latest' file" if latest is None else f"checkpoint {latest} is incomplete (its save was interrupted)"
    return tags[-1], f"{why}; resuming from {root / tags[-1]}, the newest complete checkpoint"


def verify_files(checkpoint_dir: str | Path, tag: str, names: list[str] | None = None) -> None:
    """Compare files of a complete tag with its manifest; a damaged one is refused by name."""
    record = _record(checkpoint_dir, tag)
    where = Path(checkpoint_dir) / str(tag)
    if record is None:
        raise ValueError(f"checkpoint {where} has no file manifest in {RECORD_FILE}: its save did not finish")
    for name, meta in record["files"].items():
        if names is not None and name not in names:
            continue
        path = where / name
        if not path.is_file():
            raise ValueError(f"checkpoint file missing: {path}")
        if not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes"):
            raise ValueError(f"checkpoint file damaged: {path} (its size differs from the one recorded when it was saved)")
        if _sha256(path) != meta.get("sha256"):
            raise ValueError(f"checkpoint file damaged: {path} (its SHA-256 differs from the one recorded when it was saved)")


def prune(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (never ``latest``); returns the removed tags.
    Incomplete tags older than the newest complete one (interrupted saves) go too."""
    root = Path(checkpoint_dir)
    tags = _tags(root)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    doomed = [t for t in tags[:-keep] if t != latest] if keep > 0 else []
    if tags:
        newest = (root / tags[-1] / RECORD_FILE).stat().st_mtime_ns
        doomed += [d.name for d in root.iterdir() if d.is_dir() and d.name not in tags and d.name != latest
                   and d.stat().st_mtime_ns < newest]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    return doomed


def load_rank_state(checkpoint_dir: str | Path, tag: str, rank: int) -> dict[str, Any]:
    """This rank's file (tensors and plain values only: no code runs while it loads)."""
    path = rank_file(checkpoint_dir, tag, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged or foreign
        raise ValueError(f"cannot read the ResIST rank file {path}: {e}") from None


def check_plain_tensors(where: Path) -> None:
    """Every ``.pt`` file of a tag loads as tensors and plain values: a pickle that would run
    code (or build any other object) is refused by name before DeepSpeed's loader sees it."""
    for path in sorted(Path(where).glob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"refusing to load {path}: it is not tensors and plain values only ({str(e).splitlines()[0]})") from None


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
