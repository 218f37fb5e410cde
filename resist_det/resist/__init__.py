"""The ResIST algorithm, importable without the detector, datasets or CLI.

``initialize`` is the drop-in for ``deepspeed.initialize``; ``plan``, ``schedule``,
``adapters``, ``subnet``, ``sync`` and ``strategies`` are the pieces it is built from.  Names
that need DeepSpeed load on first use.
"""

from typing import Any

from .adapters import branch_scale, fold_branch_scale, register_block, set_branch_scale
from .config import ResISTConfig
from .partition import partitionable_blocks
from .plan import Plan, inclusion_probability, iter_plans, make_plan
from .schedule import RoundSchedule

_LAZY = {"initialize": ".build", "ResISTEngine": ".engine", "memory_footprint": ".engine"}

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
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
