"""Training: the loop shared by ``tools/train.py`` and the CLI, schedules, metrics, checkpoints."""
