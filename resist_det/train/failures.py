"""Why a rank stops, in one line: the reasons a training run fails that are not bugs (a full
disk, a lost peer), and how a rank reports them to the user and to torchrun's agent."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as tdist

from ..io import atomic_write_json

__all__ = ["report_failure", "out_of_space", "lost_peer"]


def report_failure(message: str, *, every_rank: bool = False) -> None:
    """Say why this rank stops, in one line: on stderr from rank 0 (every rank fails the same
    way), or from each rank (``every_rank``: what each saw for itself); and in the error file
    torchrun gives each rank (``TORCHELASTIC_ERROR_FILE``), where its failure summary and
    ``resist-det train``'s find it, so a failure only one other rank met is reported too."""
    rank = os.environ.get("RANK", "0")
    printed = every_rank or rank == "0"
    if printed:
        print(f"error: {f'rank {rank}: ' if every_rank else ''}{message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # the layout torchrun's error handler writes (no call stack: the message is the reason); "printed" is ours
        atomic_write_json(error_file, {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}},
                                       "printed": printed})


def out_of_space(error: BaseException, output_dir: str | Path) -> str | None:
    """``"train.output_dir ...: no space left on device"`` when writing there failed for want of
    space (an ``ENOSPC``, or torch's writer giving up on a filesystem that is now full), else None."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full:
        try:  # torch.save reports a short write without the errno ("file write failed", "unexpected pos")
            full = shutil.disk_usage(output_dir).free < (1 << 20) and any(
                m in str(error) for m in ("write failed", "unexpected pos", "No space left"))
        except OSError:
            return None
    return f"train.output_dir {output_dir}: no space left on device; free space there and resume (--resume)" if full else None


# What gloo and NCCL say when a peer stopped answering or went away (torch's DistBackendError is a RuntimeError).
_LOST_PEER = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")


def lost_peer(error: BaseException) -> str | None:
    """``"communication timed out (...)"`` when ``error`` is a collective losing its peer, else None."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = first.lower()
    from_comm = isinstance(error, getattr(tdist, "DistError", ())) or any(m in text for m in ("gloo", "nccl", "c10d"))
    if not from_comm or not any(k in text for k in _LOST_PEER):  # e.g. a DataLoader timeout is not a lost peer
        return None
    kind = "timed out" if "time" in text else "lost its connection"
    return f"communication with the other ranks {kind} ({first.split('] ', 1)[-1]})"
