"""The ResIST algorithm, importable without the detector, datasets or CLI.

``initialize`` is the drop-in for ``deepspeed.initialize``; ``plan``, ``subnet`` and ``sync``
are the pure pieces it is built from.  Names that need DeepSpeed load on first use.
"""

from typing import Any

from .config import ResISTConfig
from .partition import partitionable_blocks, set_residual_scales
from .plan import Plan, inclusion_probability, iter_plans, make_plan

_LAZY = {"initialize": ".build", "ResISTEngine": ".engine", "memory_footprint": ".engine"}

__all__ = [
    "Plan",
    "ResISTConfig",
    "ResISTEngine",
    "inclusion_probability",
    "initialize",
    "iter_plans",
    "make_plan",
    "memory_footprint",
    "partitionable_blocks",
    "set_residual_scales",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
