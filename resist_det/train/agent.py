"""torchrun's elastic agent, reporting failed ranks in one line each instead of its traceback.

``resist-det train --nproc N`` starts ``python -m resist_det.train.agent <torchrun arguments>``.
When a rank fails, the agent stops the others and raises ``ChildFailedError``; torchrun would
print that as a Python traceback of its own code plus a table.  The rank has already said what
went wrong (a one-line ``error:`` for bad input or a diverged run, its traceback for a bug), so
what is left to say is which rank ended and how.
"""

from __future__ import annotations

import signal
import sys

__all__ = ["describe_exit", "main"]


def describe_exit(code: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``2`` -> ``"exit code 2"``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            print(f"resist-det: rank {rank} (local_rank: {failure.local_rank}, pid {failure.pid}) failed: "
                  f"{describe_exit(failure.exitcode)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
