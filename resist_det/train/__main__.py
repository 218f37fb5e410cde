"""``python -m resist_det.train RECIPE`` — what the launchers run on every rank."""

import sys

from .loop import main

sys.exit(main())
