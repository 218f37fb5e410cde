"""The ResIST algorithm, importable without the detector, datasets or CLI.

``initialize`` is the drop-in for ``deepspeed.initialize``; ``plan``, ``subnet`` and ``sync``
are the pure pieces it is built from.
"""

from .config import ResISTConfig
from .engine import ResISTEngine, memory_footprint
from .initialize import initialize
from .partition import partitionable_blocks, set_residual_scales
from .plan import Plan, inclusion_probability, iter_plans, make_plan

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
