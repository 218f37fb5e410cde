"""``resist-det``: train, evaluate, plan, benchmark and demo ResIST from the command line.

Each command is a thin call into the library; a user mistake is one line on stderr and exit
code 1 (or 2 for bad usage), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .cluster.command import cluster_command
from .console import fail as _fail
from .plan_command import plan_command

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ResIST distributed training of ResNets and ResNet detectors.")
data_app = typer.Typer(no_args_is_help=True, help="Make or inspect datasets.")
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resist-det {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """ResIST: layer-wise decomposition of ResNets for communication-efficient distributed training."""


def _overrides(items: list[str]) -> dict[str, Any]:
    from .config import parse_overrides

    return parse_overrides(items)


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe JSON file, or the name of a shipped recipe (e.g. demo_shapes).")],
    nproc: Annotated[int, typer.Option(min=1, help="Ranks to start on this machine (ignored inside a launcher).")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of the recipe's output_dir.")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key, e.g. --set train.epochs=3.")] = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="Show a progress bar on rank 0 (a line per epoch is printed either way).")] = True,
    max_restarts: Annotated[int, typer.Option(min=0, help="Restart all ranks this many times after a failure, "
                                              "each time from the newest complete checkpoint.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out (and list) images that fail the pre-flight "
                                           "data checks instead of refusing to start (data.skip_bad).")] = False,
) -> None:
    """Train a recipe on N local ranks (CPU: gloo, GPU: NCCL), or on this rank inside a launcher."""
    from .train.launch import launch

    try:
        overrides = _overrides(set_)
        if skip_bad:
            overrides["data.skip_bad"] = True
        code = launch(recipe, nproc=nproc, resume=resume, overrides=overrides, progress=progress,
                      max_restarts=max_restarts)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    raise typer.Exit(code=code)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="global_model.pt of a training run, or its output_dir.")],
    data: Annotated[Optional[str], typer.Option(help="Dataset root (VOCdevkit); default: the recipe's.")] = None,
    year: Annotated[Optional[str], typer.Option(help="VOC year of the test set, e.g. 2007.")] = None,
    split: Annotated[Optional[str], typer.Option(help="VOC split of the test set, e.g. test.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N images only.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the JSON report (default: next to the checkpoint).")] = None,
    metric: Annotated[str, typer.Option(help="voc (VOC AP), or coco (COCO AP via pycocotools, beside VOC AP).")] = "voc",
) -> None:
    """Evaluate a trained global network: per-class AP table and mAP (VOC07 11-point and all-point; --metric coco: COCO AP too)."""
    from rich.console import Console
    from rich.table import Table

    from .io import atomic_write_json
    from .train.evaluate import evaluate_checkpoint

    try:
        report = evaluate_checkpoint(checkpoint, data_root=data, year=year, split=split, limit=limit, metric=metric)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    m = report["metrics"]
    console = Console(width=max(100, Console().width))
    if "per_class" in m:
        table = Table(title=f"VOC AP ({report['data']['test_sets']}, {m['num_test']} images, IoU > 0.5)")
        for col in ("class", "AP (07 11-pt)", "AP (all-pt)", "objects", "detections"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for name, row in m["per_class"].items():
            table.add_row(name, f"{row['ap_07']:.4f}", f"{row['ap_all']:.4f}", str(row["npos"]), str(row["num_detections"]))
        table.add_row("[bold]mAP", f"[bold]{m['map_07']:.4f}", f"[bold]{m['map_all']:.4f}", "", "")
        console.print(table)
        if "coco" in m:
            c = m["coco"]
            console.print(f"COCO AP@[.5:.95] {c['AP']:.4f}  AP50 {c['AP50']:.4f}  AP75 {c['AP75']:.4f}  "
                          f"AR100 {c['AR100']:.4f}  (pycocotools)")
    else:
        console.print(f"accuracy {m['accuracy']:.4f} on {m['num_test']} images")
    console.print(f"test loss {m['test_loss']:.4f}")
    target = out or Path(report["checkpoint"]).with_name("eval_report.json")
    atomic_write_json(target, report)
    console.print(f"report: {target}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="global_model.pt of a training run, or its output_dir.")],
    out: Annotated[Path, typer.Option(help="File to write: the network's state_dict (tensors only).")] = Path("model.pt"),
) -> None:
    """Write a trained global network as a plain state_dict for the recipe's own model class."""
    from .io import atomic_torch_save
    from .train.evaluate import load_global_model

    try:
        saved, _ = load_global_model(checkpoint)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.pt'}")
        atomic_torch_save(saved["model"], out)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(f"--out {out}: cannot write it ({e.strerror or e})") from None
    typer.echo(f"wrote {len(saved['model'])} tensors to {out} (load with torch.load(path, weights_only=True))")


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Folder to write (a VOCdevkit tree is created inside).")],
    images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 1200,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    format: Annotated[str, typer.Option("--format", help="voc (a VOCdevkit tree), or coco (also a COCO tree in <out>/coco: "
                                        "train2017 = VOC trainval, val2017 = VOC test, annotations/instances_*.json).")] = "voc",
) -> None:
    """Write a synthetic VOC-format set of coloured shapes (JPEGs, XML annotations, ImageSets); --format coco adds
    the COCO layout that torchvision's detection reference and pycocotools read."""
    from .data.shapes import SHAPES_CLASSES, write_shapes_dataset

    if format not in ("voc", "coco"):
        raise _fail(f"--format: expected 'voc' or 'coco', got {format!r}")
    try:
        root = write_shapes_dataset(out, images, image_size=size, seed=seed)
        if format == "coco":
            from .data.coco_export import write_coco_layout

            coco = write_coco_layout(root / "VOC2007", Path(out) / "coco", SHAPES_CLASSES)
    except OSError as e:
        raise _fail(f"--out {out}: cannot write the dataset there ({e.strerror or e}: {e.filename or out})") from None
    typer.echo(f"wrote {images} images to {root}" + (f" and the COCO layout to {coco}" if format == "coco" else ""))


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (each with a metrics.jsonl).")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("runs/plot.png"),
) -> None:
    """Plot the evaluation metric against bytes communicated and against wall time."""
    from .train.plot import plot_runs

    try:
        typer.echo(f"wrote {plot_runs(runs, out)}")
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None


app.command("plan")(plan_command)
app.command("cluster", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(cluster_command)


_BENCHMARKS = {"engine": "bench_engine.py", "ap": "bench_voc_ap.py", "fashion-mnist": "bench_fashion_mnist.py",
               "cluster": "bench_cluster.py", "tv-detection": "bench_tv_detection.py"}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"Which benchmark: {', '.join(_BENCHMARKS)}. Extra arguments go to its script.")],
    scripts: Annotated[Path, typer.Option("--scripts", help="The benchmarks/ folder of a resist_det checkout.")] = Path("benchmarks"),
) -> None:
    """Run a benchmark script of a source checkout (e.g. `resist-det bench engine bytes`); it prints its figures."""
    import subprocess
    import sys

    if name not in _BENCHMARKS:
        raise _fail(f"unknown benchmark {name!r}; choose one of {', '.join(_BENCHMARKS)}")
    script = scripts / _BENCHMARKS[name]
    if not script.is_file():
        raise _fail(f"--scripts: {script} not found; run from a resist_det checkout or pass --scripts <checkout>/benchmarks "
                    "(benchmarks are not part of the installed package)")
    raise typer.Exit(code=subprocess.call([sys.executable, str(script), *ctx.args]))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where data, runs and the plot go.")] = Path("runs/demo"),
    nproc: Annotated[int, typer.Option(min=1, help="Ranks per training run.")] = 2,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs per run (default: the recipe's).")] = None,
) -> None:
    """ResIST vs local SGD on a synthetic shapes set: trains both, prints a table, writes a PNG."""
    from rich.console import Console
    from rich.table import Table

    from .io import atomic_write_json
    from .train.demo import run_demo
    from .train.metrics import human_bytes

    try:
        res = run_demo(out, nproc=nproc, epochs=epochs)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None
    table = Table(title=f"ResIST vs local SGD, shapes detection, {nproc} CPU ranks")
    for col in ("mode", "mAP (VOC07)", "mAP (all-pt)", "train wall (s)", "bytes sent", "memory / rank", "peak RSS / rank"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, s in res["runs"].items():
        m = s.get("metrics", {})
        table.add_row(mode, f"{m.get('map_07', float('nan')):.4f}", f"{m.get('map_all', float('nan')):.4f}", f"{s['wall']:.1f}",
                      human_bytes(s["bytes"]), human_bytes(s["memory"]), human_bytes(s["peak_rss"]))
    Console(width=max(110, Console().width)).print(table)
    typer.echo(f"plot: {res['plot']}")
    atomic_write_json(Path(out) / "demo_summary.json", res)


if __name__ == "__main__":
    app()
