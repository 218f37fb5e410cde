"""A launched process dies with the process that launched it (Linux's ``PR_SET_PDEATHSIG``).

Without it, a torchrun agent killed by the OOM killer or ``SIGKILL`` leaves its ranks training
as orphans, holding the run's lock and its output folder; a ``resist-det`` launcher killed so
leaves its agent.  Ranks ask for ``SIGKILL`` (nothing of theirs needs saving that a checkpoint
did not save), the agent for ``SIGTERM`` (it then stops its ranks itself).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends; whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), sig)
    return True
