"""When a round ends: a pure step counter, no DeepSpeed (in the style of PyTorch's
``PeriodicModelAverager``, whose caller owns the loop).

* A round ends after ``local_steps`` optimizer steps.
* With a local-SGD warm-up of ``warmup_steps`` steps (paper section 2.6), a round also ends at
  step ``warmup_steps``, where ResIST switches from the whole network to sub-ResNets.
* An explicit end of round (``engine.synchronize()``, e.g. at an epoch end) ends it only if
  a local step was taken since the last sync: a round with no step would move bytes for nothing.

Example::

    >>> s = RoundSchedule(local_steps=2)
    >>> for _ in range(5):
    ...     if s.step():
    ...         _ = s.end_round()
    >>> s.rounds, s.local_step, s.pending
    (2, 1, True)
"""

from __future__ import annotations

from typing import Any

__all__ = ["RoundSchedule"]


class RoundSchedule:
    """Counts optimizer steps and says when a synchronisation round ends.

    Args:
        local_steps: optimizer steps per round (``L``).
        warmup_steps: steps of local-SGD warm-up before ResIST starts (0: none).
    """

    def __init__(self, local_steps: int, warmup_steps: int = 0) -> None:
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, but got {local_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, but got {warmup_steps}")
        self.local_steps = local_steps
        self.warmup_steps = warmup_steps
        self.steps = 0  # optimizer steps taken, all rounds
        self.local_step = 0  # optimizer steps taken in the current round
        self.rounds = 0  # rounds ended
        self.in_warmup = warmup_steps > 0

    def step(self) -> bool:
        """Count one optimizer step; ``True`` when the round ends now (call :meth:`end_round`)."""
        self.steps += 1
        self.local_step += 1
        return self.local_step >= self.local_steps or self.switch_due

    @property
    def switch_due(self) -> bool:
        """The warm-up is over: the round that ends next switches to ResIST."""
        return self.in_warmup and self.steps >= self.warmup_steps

    @property
    def pending(self) -> bool:
        """A local step was taken since the last sync (so ending the round now does something)."""
        return self.local_step > 0

    def end_round(self) -> bool:
        """Record the end of a round; returns whether it is the warm-up switch."""
        switch = self.switch_due
        self.rounds += 1
        self.local_step = 0
        if switch:
            self.in_warmup = False
        return switch

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "local_step": self.local_step, "rounds": self.rounds, "in_warmup": self.in_warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.local_step = int(state["local_step"])
        self.rounds = int(state["rounds"])
        self.in_warmup = bool(state["in_warmup"])
