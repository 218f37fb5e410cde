"""Benchmark records: the command, the machine it ran on, and what it printed.

Timings move with the CPU, its thread count and whatever else runs beside them, so every record
under ``benchmarks/results`` starts with the command and names the machine (a rerun elsewhere
differs, and its record says where it ran).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_write_text

__all__ = ["cpu_model", "host_line", "write_record"]


def cpu_model() -> str:
    """The CPU's name as ``/proc/cpuinfo`` gives it, else what ``platform`` knows."""
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


def write_record(path: str | os.PathLike[str], body: str | Sequence[str], *, host: str | None = None,
                 argv: Sequence[str] | None = None) -> Path:
    """Write ``$ python <argv>``, the host line (``host``: the one taken when the run started) and
    ``body`` (text or lines) to ``path``, atomically."""
    command = "$ python " + shlex.join(list(sys.argv if argv is None else argv))
    text = body if isinstance(body, str) else "\n".join(body)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(path), f"{command}\n{host or host_line()}\n{text.rstrip()}\n")
