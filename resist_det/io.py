"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where a tensor is written: the launcher never needs it
    import torch

__all__ = ["standard_json", "tensor_checksums", "atomic_write_text", "atomic_torch_save", "atomic_write_json", "read_json_file"]


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda f: f.write(text.encode()))


def standard_json(obj: Any) -> Any:
    """NaN and infinities -> None: the files are standard JSON that any parser reads."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: standard_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [standard_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Standard JSON (non-finite numbers written as ``null``), written atomically."""
    return atomic_write_text(path, json.dumps(standard_json(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _atomic(Path(path), lambda f: torch.save(obj, f))


def tensor_checksums(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of every tensor's bytes: stored beside the tensors, checked when they load."""
    import hashlib

    import torch

    return {k: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, t in state.items()}


def read_json_file(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON is an error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, so not a {what} ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a {what}") from None
