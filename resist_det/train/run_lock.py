"""One run per output directory: a lock file that rank 0 holds while it trains.

Two runs writing the same ``train.output_dir`` would interleave checkpoints and logs.  The lock
is the kernel's (``flock`` on the lock file, held for the run's life): taking it is atomic, and
a run that dies, however it dies, releases it at once.  The file records the holder's host and
PID for the message that refuses a second run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock"]

LOCK_FILE = ".resist_det.lock"


class RunLock:
    """``with RunLock(output_dir):`` — refuses (ValueError naming the holder) when another live run holds it."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.held = False
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _in_use(self) -> ValueError:
        holder = self._holder()
        return ValueError(
            f"train.output_dir {self.path.parent} is in use by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}); choose another output_dir, or stop that run")

    def _check_folder(self) -> None:
        folder = self.path.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "" if existing == folder else f": {existing}"
            raise ValueError(f"train.output_dir {folder}{where} is a file, not a folder; choose another output_dir")

    def check(self) -> None:
        """Refuse now if a live run holds the lock (the launcher's early check; rank 0 still acquires)."""
        self._check_folder()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use() from None
        finally:
            os.close(fd)  # (releases the shared lock taken just to look)

    def acquire(self) -> None:
        self._check_folder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use() from None
            try:  # the file locked may be one its last holder unlinked meanwhile: then lock the new one
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd, self.held = fd, True
            return
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: a waiting run re-checks the inode
            os.close(self._fd)
            self._fd, self.held = None, False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
