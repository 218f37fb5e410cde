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

__all__ = ["die_with_parent", "bind_rank_to_launcher", "AGENT_PID_ENV"]

_PR_SET_PDEATHSIG = 1

#: Set by ``resist_det.train.agent`` for its ranks: the parent a rank must still have when it binds
#: itself (the agent may die while the rank is still starting up).
AGENT_PID_ENV = "RESIST_DET_AGENT_PID"


def die_with_parent(sig: signal.Signals = signal.SIGKILL, expected_parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends; whether it could.
    With ``expected_parent``, a process whose parent is already another one (it was orphaned
    before this call) gets ``sig`` at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), sig)
    return True


def bind_rank_to_launcher() -> None:
    """In a rank started by a launcher (``RANK`` / ``LOCAL_RANK`` set): die with it (``SIGKILL``)."""
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    agent = os.environ.get(AGENT_PID_ENV, "")
    die_with_parent(signal.SIGKILL, int(agent) if agent.isdigit() else None)
