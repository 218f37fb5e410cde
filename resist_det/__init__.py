"""resist_det: ResIST (layer-wise decomposition of ResNets for distributed training) for DeepSpeed.

Example::

    import resist_det
    engine, optimizer, _, _ = resist_det.initialize(model=net, model_parameters=net.parameters(), config=cfg)
"""

__version__ = "0.1.0"

from .resist import Plan, ResISTConfig, ResISTEngine, initialize, make_plan  # noqa: E402

__all__ = ["__version__", "initialize", "Plan", "ResISTConfig", "ResISTEngine", "make_plan"]
