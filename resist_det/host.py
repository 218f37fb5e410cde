"""The machine a figure was measured on, for the first lines of a benchmark's recorded output.

Timings move with the CPU, its thread count and whatever else runs beside them, so every record
names them (a rerun on another machine differs and says so).
"""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_model", "host_line"]


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_line() -> str:
    """``host: <CPU>, <n> CPUs, torch <v> (<t> threads), python <v>; load average at start a, b, c``."""
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"host: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}; load average at start {load}")
