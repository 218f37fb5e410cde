#!/usr/bin/env python
"""Train a recipe on every rank a launcher starts.

    deepspeed --num_gpus 2 tools/train.py recipes/voc_resist.json
    torchrun --nproc_per_node 2 tools/train.py recipes/cifar10_resist.json
    python tools/train.py recipes/demo_shapes.json          # one process
"""

import sys

from resist_det.train.entry import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group: stop quietly
        sys.exit(130)
