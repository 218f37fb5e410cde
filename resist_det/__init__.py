"""resist_det: ResIST (layer-wise decomposition of ResNets for distributed training) for DeepSpeed.

Example::

    import resist_det
    engine, optimizer, _, _ = resist_det.initialize(model=net, model_parameters=net.parameters(), config=cfg)

The engine (and DeepSpeed) is imported on first use, so ``import resist_det`` stays light.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"initialize", "Plan", "ResISTConfig", "ResISTEngine", "make_plan", "register_block"}
__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name == "torch":  # the plain-PyTorch shell, resist_det.torch
        import importlib

        return importlib.import_module(".torch", __name__)
    if name in _LAZY:
        from . import resist

        value = getattr(resist, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resist_det' has no attribute {name!r}")
