"""torchrun's elastic agent, reporting failed ranks in one line each instead of its traceback.

``resist-det train --nproc N`` starts ``python -m resist_det.train.agent <torchrun arguments>``.
When a rank fails, the agent stops the others and raises ``ChildFailedError``; torchrun would
print that as a Python traceback of its own code plus a table.  The rank has already said what
went wrong (a one-line ``error:`` for bad input or a diverged run, its traceback for a bug), so
what is left to say is which rank ended and how (and why, where only another rank knew).
"""

from __future__ import annotations

import os
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


def _reason(failure) -> str:
    """The one-line message a rank left in its error file (torchrun's layout), or ''."""
    message = failure.message
    return message.get("message", "") if isinstance(message, dict) else ""


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .lifetime import AGENT_PID_ENV

    os.environ[AGENT_PID_ENV] = str(os.getpid())  # the parent each rank checks it still has (train/lifetime.py)
    try:  # torchrun's ``main`` without its ``@record`` wrapper, which would re-log the ranks' error files
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        # A rank's own one-line reason (its error file, :func:`resist_det.train.failures.report_failure`)
        # is repeated here only where that rank did not print it and no rank printed the same.
        said = {_reason(f) for f in e.failures.values() if f.error_file_data.get("printed")}
        for rank, failure in sorted(e.failures.items()):
            line = f"resist-det: rank {rank} (local_rank: {failure.local_rank}, pid {failure.pid}) failed: {describe_exit(failure.exitcode)}"
            reason = _reason(failure)
            if failure.error_file_data.get("printed") is False and reason not in said:
                line += f": {reason}"
                said.add(reason)
            print(line, file=sys.stderr, flush=True)
        return 1
    except SignalException as e:  # stopped from outside (SIGTERM, Ctrl-C): the ranks are stopped; no traceback
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
