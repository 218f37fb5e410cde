"""The ResIST algorithm, importable without the detector, datasets or CLI.

``initialize`` is the drop-in for ``deepspeed.initialize``; ``plan``, ``schedule``,
``adapters``, ``subnet``, ``sync`` and ``strategies`` are the pieces it is built from.  Each name
loads its module on first use.
"""

import importlib
from typing import Any

# Every name loads its module on first use: ``resist_det.resist.config`` (what a recipe is
# validated with) must not pull in torch, SciPy or DeepSpeed for the launcher.
_LAZY = {
    "initialize": ".build", "ResISTEngine": ".engine", "memory_footprint": ".engine",
    "branch_scale": ".adapters", "fold_branch_scale": ".adapters", "register_block": ".adapters",
    "set_branch_scale": ".adapters", "ResISTConfig": ".config", "partitionable_blocks": ".partition",
    "Plan": ".plan", "inclusion_probability": ".plan", "iter_plans": ".plan", "make_plan": ".plan",
    "RoundSchedule": ".schedule",
}

__all__ = [
    "Plan",
    "ResISTConfig",
    "ResISTEngine",
    "RoundSchedule",
    "branch_scale",
    "fold_branch_scale",
    "inclusion_probability",
    "initialize",
    "iter_plans",
    "make_plan",
    "memory_footprint",
    "partitionable_blocks",
    "register_block",
    "set_branch_scale",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
