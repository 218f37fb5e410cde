"""Metrics to a JSON-lines log (and TensorBoard when installed), progress on rank 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io import standard_json

__all__ = ["MetricsLog", "Progress", "read_metrics", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class MetricsLog:
    """Appends one JSON object per line; mirrors scalars to TensorBoard if it is installed."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self._tb = None

    def truncate_after(self, epoch: int) -> None:
        """Keep only records of epochs before ``epoch`` (and those without one), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        from ..io import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", -1) < epoch:
                    kept.append(line)
            except ValueError:  # a line cut short by a crash
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(standard_json(record), default=float, allow_nan=False) + "\n")
        if self._tb is not None and record.get("event") == "epoch":
            step = record["epoch"]
            for k in ("train_loss", "bytes", "wall"):
                self._tb.add_scalar(k, record[k], step)
            for k, v in (record.get("metrics") or {}).items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"eval/{k}", v, step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (a missing file is an error naming it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {n} is not a metrics record (a JSON object), got a {type(record).__name__}")
        records.append(record)
    return records


class Progress:
    """Rank 0's progress: a line per epoch, above a rich bar on a terminal (``bar=False``: lines only,
    what ``--no-progress`` asks for)."""

    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True, start_epoch: int = 0,
                 bar: bool = True) -> None:
        self.enabled = enabled
        self.epochs, self.steps = epochs, steps_per_epoch
        self._bar = None
        if enabled and bar and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("round {task.fields[round]}  loss {task.fields[loss]:.4f}  sent {task.fields[sent]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch,
                                            epoch=start_epoch, round=0, loss=float("nan"), sent="0 B")

    def update(self, epoch: int, step: int, *, loss: float, round: int, bytes_sent: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=epoch * self.steps + step, epoch=epoch, round=round, loss=loss,
                             sent=human_bytes(bytes_sent))

    def epoch_done(self, epoch: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = record.get("metrics") or {}
        shown = {k: metrics[k] for k in ("map_07", "map_all", "accuracy", "test_loss") if k in metrics}
        text = (f"epoch {epoch + 1}/{self.epochs}  train_loss {record['train_loss']:.4f}  round {record['round']}  "
                f"sent {human_bytes(record['bytes'])}  wall {record['wall']:.1f}s"
                + "".join(f"  {k} {v:.4f}" for k, v in shown.items()))
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
