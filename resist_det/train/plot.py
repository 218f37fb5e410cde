"""Metric against bytes communicated and against wall time (the paper's Figures 5 and 8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import read_metrics

__all__ = ["plot_runs", "run_curve"]

_METRICS = ("map_07", "accuracy")


def run_curve(run_dir: str | Path) -> dict[str, Any]:
    """Per-epoch (bytes, wall, metric) of a run directory's ``metrics.jsonl``."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    start = next((r for r in records if r.get("event") == "start"), {})
    points = [r for r in records if r.get("event") == "epoch" and r.get("metrics")]
    if not points:
        raise ValueError(f"{run_dir}: metrics.jsonl has no evaluated epoch to plot")
    if not isinstance(points[0]["metrics"], dict):
        raise ValueError(f"{run_dir}/metrics.jsonl: an epoch record's 'metrics' is not an object")
    metric = next((m for m in _METRICS if m in points[0]["metrics"]), "test_loss")
    for key, of in (("bytes", lambda p: p.get("bytes")), ("wall", lambda p: p.get("wall")),
                    (metric, lambda p: p["metrics"].get(metric) if isinstance(p["metrics"], dict) else None)):
        bad = next((p for p in points if not _is_number(of(p))), None)
        if bad is not None:
            raise ValueError(f"{run_dir}/metrics.jsonl: epoch {bad.get('epoch')} has no number for {key!r} "
                             f"(got {of(bad)!r}); not a resist_det metrics log")
    return {
        "label": f"{start.get('mode', Path(run_dir).name)} (S={start.get('world_size', '?')})",
        "metric": metric,
        "bytes": [p["bytes"] for p in points],
        "wall": [p["wall"] for p in points],
        "value": [p["metrics"][metric] for p in points],
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write a PNG with metric-vs-bytes and metric-vs-time curves of ``run_dirs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [run_curve(d) for d in run_dirs]
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in curves:
        ax_b.plot([b / 2**30 for b in c["bytes"]], c["value"], marker="o", label=c["label"])
        ax_t.plot(c["wall"], c["value"], marker="o", label=c["label"])
    name = {"map_07": "VOC07 mAP", "accuracy": "test accuracy"}.get(curves[0]["metric"], curves[0]["metric"])
    ax_b.set(xlabel="bytes communicated, all ranks (GiB)", ylabel=name, title=f"{name} vs communication")
    ax_t.set(xlabel="training wall time (s)", ylabel=name, title=f"{name} vs time")
    for ax in (ax_b, ax_t):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
