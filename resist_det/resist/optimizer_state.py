"""What happens to the optimizer's state at a sync (``resist.momentum``).

* ``restart``: cleared every round (the paper's momentum restart, for SGD).
* ``keep``: kept for the shared layers and the blocks that stay on a rank; a block that arrives
  from another rank starts with fresh state.
* ``average``: per-parameter moments (SGD's momentum buffer, Adam's ``exp_avg`` and
  ``exp_avg_sq``) are averaged and routed with the weights they belong to.
* ``auto``: ``average`` for Adam-family optimizers (``betas``), ``keep`` for every other (SGD).
  A restart costs accuracy with either, and with Adam ``keep`` falls well behind ``average``;
  SGD's step is linear in its buffer, so there ``keep`` comes close to ``average`` (equal at one
  local step) without sending the buffers.  Measured in ``benchmarks/results/sgd_state.txt``, ``adam_state.txt`` and
  ``tv_detection_momentum_*.txt`` (the table in ``docs/guide.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["adaptive_optimizer", "policy", "moments", "reset_state"]


def adaptive_optimizer(optimizer: Any) -> bool:
    """Adam-family optimizers (per-parameter moment estimates, ``betas``)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wrappers keep the torch optimizer here
    return "betas" in getattr(inner, "defaults", {}) or "betas" in getattr(optimizer, "defaults", {})


def policy(momentum: str, optimizer: Any) -> str:
    """The rule ``momentum`` stands for with this optimizer (``auto`` resolved)."""
    if momentum != "auto":
        return momentum
    return "average" if adaptive_optimizer(optimizer) else "keep"


def moments(optimizer: Any, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The per-parameter state tensors of ``params`` (shaped like the parameter), in a fixed order.

    Every rank must hold state for the same parameters (it does once each has taken a step)."""
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        out += [st[k] for k in sorted(st) if torch.is_tensor(st[k]) and st[k].is_floating_point() and st[k].shape == p.shape]
    return out


def reset_state(optimizer: Any, momentum: str, arrived: list[nn.Parameter]) -> None:
    """Apply the rule at the end of a round; ``arrived``: parameters of blocks that changed rank."""
    rule = policy(momentum, optimizer)
    if rule == "restart":
        optimizer.state.clear()
    elif rule == "keep":
        for p in arrived:
            optimizer.state.pop(p, None)
