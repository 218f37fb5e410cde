"""One run per output directory: a lock file that rank 0 holds while it trains.

Two runs writing the same ``train.output_dir`` would interleave checkpoints and logs.  The lock
records the holder's host and PID; a lock whose process is gone (a crash) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock"]

LOCK_FILE = ".resist_det.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(output_dir):`` — refuses (ValueError naming the holder) when another live run holds it."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def _holder(self) -> dict | None:
        """The live run holding the lock, or None (no lock, or one left by a run that died here)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return None
        return holder

    def _in_use(self, holder: dict) -> ValueError:
        return ValueError(
            f"train.output_dir {self.path.parent} is in use by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}); choose another output_dir, or delete "
            f"{self.path} if that run is gone")

    def _check_folder(self) -> None:
        folder = self.path.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "" if existing == folder else f": {existing}"
            raise ValueError(f"train.output_dir {folder}{where} is a file, not a folder; choose another output_dir")

    def check(self) -> None:
        """Refuse now if a live run holds the lock (the launcher's early check; rank 0 still acquires)."""
        self._check_folder()
        holder = self._holder()
        if holder is not None:
            raise self._in_use(holder)

    def acquire(self) -> None:
        self._check_folder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    self.path.unlink(missing_ok=True)  # left by a run that died: take it over
                    continue
                raise self._in_use(holder) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
