"""``python -m resist_det.train RECIPE`` — what the launchers run on every rank."""

import sys

from .lifetime import bind_rank_to_launcher

bind_rank_to_launcher()  # first, before the imports of torch and DeepSpeed (seconds, during which the launcher may die)

try:
    from .entry import main  # noqa: E402

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group: stop quietly
    sys.exit(130)
