"""Who holds which partitioned block in each round (paper section 2.2 and 2.6).

A plan is a pure function of ``(seed, round, S, n blocks, min blocks)``: every rank computes
it, nothing about it is communicated.  In round t a random permutation of the n partitionable
blocks is dealt to the S sub-ResNets in equal shares of ``k = max(ceil(n / S), min_blocks)``
blocks, reading the permutation cyclically: where ``S k > n`` some blocks go to two
sub-ResNets (sharing, to reach the minimum depth), every block equally often up to one.
Equal sizes mean equal compute per worker and no empty slots.

Which group goes to which rank does not change the distribution over sub-networks, so it is
chosen to keep as many blocks as possible where they already are (a maximum-overlap
assignment against the previous round): fewer bytes moved for the same randomness.

Blocks of several sections (``resist.sections``) differ in size: a ``layer4`` bottleneck of a
ResNet50 holds 64 times the parameters of a ``layer1`` one, though both cost about the same
FLOPs.  Given the blocks' ``sizes``, the deal stays random and equal in block count (equal
compute) but balances parameters: blocks go out largest first, each to the sub-ResNet holding
the fewest parameters so far (ties in a random order), and the keep-blocks assignment weighs
overlap by size.  With blocks of one size this is not used: the plan is the paper's, above.

Example::

    >>> plan = make_plan(seed=0, round=0, num_workers=4, num_blocks=22, min_blocks=5)
    >>> [len(g) for g in plan.groups]
    [6, 6, 6, 6]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "Plan", "make_plan", "iter_plans", "reducer_of", "p2p_sends", "blocks_per_worker", "inclusion_probability",
    "check_plan_args", "degenerate_plan", "default_min_blocks", "resolve_min_blocks", "p2p_bytes", "p2p_messages",
]


@dataclass(frozen=True)
class Plan:
    """The partition of one round: ``groups[rank]`` is the sorted tuple of block indices."""

    round: int
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_workers(self) -> int:
        return len(self.groups)

    @property
    def num_blocks(self) -> int:
        """Blocks the plan deals (every block is held by some worker)."""
        return 1 + max(max(g) for g in self.groups)

    def holders(self, block: int) -> tuple[int, ...]:
        """Ranks holding ``block`` in this round, ascending."""
        return tuple(r for r, g in enumerate(self.groups) if block in g)


def check_plan_args(num_workers: int, num_blocks: int, min_blocks: int) -> None:
    """Raise ``ValueError`` naming the argument for impossible settings."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, but got {num_workers}")
    if num_blocks < 1:
        raise ValueError(
            f"num_blocks must be >= 1, but got {num_blocks}: the model has no partitionable blocks "
            "(use mode 'local_sgd' for it)"
        )
    if not 1 <= min_blocks <= num_blocks:
        raise ValueError(
            f"resist.min_blocks must be between 1 and the number of partitionable blocks ({num_blocks}), but got {min_blocks}"
        )


def default_min_blocks(num_blocks: int) -> int:
    """``resist.min_blocks`` when the config leaves it out: a fifth of the partitionable blocks,
    rounded up (the paper's 5 of the 22 blocks of ResNet101's section 3)."""
    return max(1, math.ceil(num_blocks / 5))


def resolve_min_blocks(min_blocks: int | None, num_blocks: int) -> int:
    """The minimum depth in force: ``min_blocks`` as given, or :func:`default_min_blocks`."""
    return default_min_blocks(num_blocks) if min_blocks is None else min_blocks


def blocks_per_worker(num_workers: int, num_blocks: int, min_blocks: int) -> int:
    """Size k of every sub-ResNet's partitioned part: ``max(ceil(n / S), min_blocks)``."""
    check_plan_args(num_workers, num_blocks, min_blocks)
    return max(math.ceil(num_blocks / num_workers), min_blocks)


def degenerate_plan(num_workers: int, num_blocks: int, min_blocks: int) -> str | None:
    """Why the plan is no decomposition at all (every sub-ResNet holds every block), or ``None``."""
    k = blocks_per_worker(num_workers, num_blocks, min_blocks)
    if num_workers > 1 and k >= num_blocks:
        return (
            f"every sub-ResNet holds all {num_blocks} partitionable blocks (min_blocks {min_blocks} >= {num_blocks} blocks): "
            "this is local SGD (it syncs as local SGD does); lower resist.min_blocks or partition more blocks "
            "(resist.sections)"
        )
    return None


def inclusion_probability(num_workers: int, num_blocks: int, min_blocks: int) -> float:
    """Probability that a given sub-ResNet holds a given block: ``k / n`` (``1 / S`` without sharing)."""
    return blocks_per_worker(num_workers, num_blocks, min_blocks) / num_blocks


def _deal(rng: np.random.Generator, num_workers: int, num_blocks: int, k: int) -> list[list[int]]:
    """Deal a random permutation, read cyclically, to the workers in runs of ``k``.

    For one lap (``S * k == n``) this is a uniformly random partition into equal groups, the
    same distribution as round-robin dealing.  Where ``S * k > n`` the stream wraps around, so
    every block is held ``floor`` or ``ceil`` of ``S k / n`` times and, since ``k <= n``, no
    run repeats a block.
    """
    perm = rng.permutation(num_blocks)
    return [sorted(int(perm[(i * k + j) % num_blocks]) for j in range(k)) for i in range(num_workers)]


def _deal_balanced(rng: np.random.Generator, num_workers: int, sizes: Sequence[int], k: int) -> list[list[int]]:
    """Deal blocks of unequal sizes: ``k`` each, largest first, each to the lightest worker.

    A random permutation orders blocks of equal size and a second one the workers (ties).  The
    first lap hands out every block once; further laps (``S k > n``) hand out blocks again to
    workers that do not hold them yet, until every worker has ``k``."""
    order = sorted(rng.permutation(len(sizes)).tolist(), key=lambda b: -sizes[b])  # stable: ties stay shuffled
    workers = rng.permutation(num_workers).tolist()
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    placed = 0
    while placed < num_workers * k:
        for b in order:
            free = [w for w in workers if len(groups[w]) < k and b not in groups[w]]
            if not free:
                continue
            w = min(free, key=lambda w: load[w])  # first in the shuffled order among the lightest
            groups[w].append(b)
            load[w] += sizes[b]
            placed += 1
            if placed == num_workers * k:
                break
    return [sorted(g) for g in groups]


def _assign(groups: list[list[int]], previous: tuple[tuple[int, ...], ...],
            sizes: Sequence[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Give each rank the new group that overlaps most (in blocks, or in ``sizes``) with what it holds now."""
    weight = (lambda common: len(common)) if sizes is None else (lambda common: sum(sizes[b] for b in common))
    overlap = np.array([[weight(set(prev) & set(g)) for g in groups] for prev in previous])
    _, cols = linear_sum_assignment(-overlap)
    return tuple(tuple(groups[c]) for c in cols)


def _check_sizes(sizes: Sequence[int] | None, num_blocks: int) -> Sequence[int] | None:
    """``sizes`` if blocks differ in size, ``None`` if they are all alike (the paper's plan)."""
    if sizes is None:
        return None
    if len(sizes) != num_blocks:
        raise ValueError(f"sizes must give one size per block ({num_blocks}), but got {len(sizes)}")
    return None if len(set(sizes)) <= 1 else list(sizes)


def iter_plans(seed: int, num_workers: int, num_blocks: int, min_blocks: int, start: int = 0,
               sizes: Sequence[int] | None = None) -> Iterator[Plan]:
    """Plans of rounds ``start, start + 1, ...``; rounds chain through the keep-blocks assignment.

    ``sizes`` (elements per block) balances blocks of unequal size (several sections).  The
    engine walks this once; resuming at round t replays the cheap chain from round 0.
    """
    k = blocks_per_worker(num_workers, num_blocks, min_blocks)
    if start < 0:
        raise ValueError(f"start must be >= 0, but got {start}")
    sizes = _check_sizes(sizes, num_blocks)
    prev: tuple[tuple[int, ...], ...] | None = None
    for t in itertools.count():
        rng = np.random.default_rng([seed, t])
        groups = _deal(rng, num_workers, num_blocks, k) if sizes is None else _deal_balanced(rng, num_workers, sizes, k)
        prev = tuple(tuple(g) for g in groups) if prev is None else _assign(groups, prev, sizes)
        if t >= start:
            yield Plan(round=t, groups=prev)


def make_plan(seed: int, round: int, num_workers: int, num_blocks: int, min_blocks: int,
              sizes: Sequence[int] | None = None) -> Plan:
    """The plan of round ``round`` (0-based)."""
    if round < 0:
        raise ValueError(f"round must be >= 0, but got {round}")
    return next(iter_plans(seed, num_workers, num_blocks, min_blocks, start=round, sizes=sizes))


def reducer_of(block: int, old: Plan, new: Plan) -> int:
    """The rank that averages ``block`` at the sync from ``old`` to ``new``: a previous holder
    that also holds it next if there is one (its copy then never travels)."""
    old_h, new_h = old.holders(block), set(new.holders(block))
    both = [r for r in old_h if r in new_h]
    return both[0] if both else old_h[0]


def p2p_sends(old: Plan, new: Plan) -> list[int]:
    """Point-to-point block messages each rank sends at the sync from ``old`` to ``new``.

    A block's other holders send it to its reducer; the reducer sends the average to every
    next holder but itself.
    """
    return p2p_bytes(old, new, [1] * old.num_blocks)


def p2p_messages(old: Plan, new: Plan) -> list[tuple[int, int, int]]:
    """The block messages ``(sender, receiver, block)`` of the sync from ``old`` to ``new``
    (:func:`resist_det.resist.sync.route_blocks`): a block's other holders send it to its
    reducer; the reducer sends the average to every next holder but itself."""
    out = []
    for b in range(old.num_blocks):
        r = reducer_of(b, old, new)
        out += [(h, r, b) for h in old.holders(b) if h != r]
        out += [(r, h, b) for h in new.holders(b) if h != r]
    return out


def p2p_bytes(old: Plan, new: Plan, sizes: Sequence[int]) -> list[int]:
    """What each worker sends point-to-point at the sync from ``old`` to ``new``, block ``b``
    costing ``sizes[b]`` per message."""
    sends = [0] * old.num_workers
    for src, _, b in p2p_messages(old, new):
        sends[src] += sizes[b]
    return sends
