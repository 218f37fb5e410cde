"""Learning-rate schedule of the recipes: linear warm-up, then step decay (paper section 5)."""

from __future__ import annotations

from ..config import LRSchedule

__all__ = ["learning_rate"]


def learning_rate(schedule: LRSchedule, base_lr: float, epoch: float) -> float:
    """The lr at fractional ``epoch`` (0-based).

    The VOC recipe: 1e-5 raised linearly to 1e-4 over 30 epochs, divided by 10 at 60 and 90.
    """
    if epoch < schedule.warmup_epochs:
        frac = epoch / schedule.warmup_epochs
        return schedule.warmup_start_lr + (base_lr - schedule.warmup_start_lr) * frac
    return base_lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
