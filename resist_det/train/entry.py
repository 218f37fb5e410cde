"""A rank's entry point (``python -m resist_det.train``, ``tools/train.py``): arguments, the
training loop, and one line instead of a traceback for every failure that is not a bug."""

from __future__ import annotations

import os

from ..config import parse_overrides
from .failures import lost_peer, out_of_space, report_failure
from .loop import train

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m resist_det.train RECIPE [--resume] [--set key=value ...]`` (also under launchers)."""
    import argparse

    from ..config import load_recipe

    p = argparse.ArgumentParser(prog="tools/train.py", description="Train a resist_det recipe on this rank.")
    p.add_argument("recipe", help="recipe JSON (deepspeed / resist / model / data / train sections)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"], metavar="auto",
                   help="continue from the newest complete checkpoint; '--resume auto': only if there is one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (JSON value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.local_rank is not None:  # (under torchrun and resist-det, python -m resist_det.train bound it already)
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from .lifetime import bind_rank_to_launcher

    bind_rank_to_launcher()  # a rank of a launcher that died would train on as an orphan, holding the run's lock
    try:
        recipe = load_recipe(args.recipe, parse_overrides(args.set))
    except (FileNotFoundError, ValueError) as e:
        report_failure(str(e))
        return 2
    try:
        train(recipe, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:  # bad input or a diverged run: one line, not a traceback per rank
        report_failure(str(e))
        return 2
    except (RuntimeError, OSError) as e:
        full = out_of_space(e, recipe.train.output_dir)
        if full is not None:  # checked first: rank 0 stopped writing, so the others lost their peer
            report_failure(full, every_rank=True)
            return 4
        lost = lost_peer(e) if isinstance(e, RuntimeError) else None
        if lost is None:
            raise
        # every rank that noticed says so: on a cluster, its own machine's log is what its owner reads
        report_failure(f"{lost}; a rank died, hangs or cannot be reached (a collective waits at most "
                       f"train.comm_timeout_minutes = {recipe.train.comm_timeout_minutes:g})", every_rank=True)
        return 3
    return 0
