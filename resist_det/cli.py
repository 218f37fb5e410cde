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

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ResIST distributed training of ResNets and ResNet detectors.")
data_app = typer.Typer(no_args_is_help=True, help="Make or inspect datasets.")
app.add_typer(data_app, name="data")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


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


@app.command()
def plan(
    workers: Annotated[Optional[int], typer.Option("--workers", "-S", min=1, max=4096, help="Number of sub-ResNets (ranks); default 4.")] = None,
    nodes: Annotated[Optional[int], typer.Option(min=1, max=1024, help="Machines: compare resist.topology rank and node on them (instead of -S).")] = None,
    gpus_per_node: Annotated[int, typer.Option(min=1, max=64, help="Ranks per machine (with --nodes).")] = 8,
    model: Annotated[str, typer.Option(help="cifar-resnet101, preact-resnet<depth>, yolo-resnet<depth>, vit-tiny or a torchvision model name.")] = "cifar-resnet101",
    min_blocks: Annotated[Optional[int], typer.Option(min=1, help="Minimum partitioned blocks per sub-ResNet (resist.min_blocks; default: a fifth of the partitionable blocks).")] = None,
    sections: Annotated[Optional[str], typer.Option(help="Partitioned sections, comma-separated (resist.sections, e.g. layer3,layer4); default: the model's.")] = None,
    seed: Annotated[int, typer.Option(help="Plan seed.")] = 0,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to show.")] = 3,
    rate: Annotated[Optional[str], typer.Option(help="Link rate per machine (tc units, e.g. 100mbit): predict seconds on the wire per round.")] = None,
    local_steps: Annotated[int, typer.Option(min=1, help="Local steps per round (with --rate: DDP's traffic over the same steps).")] = 50,
    bits: Annotated[int, typer.Option(help="Bits per value on the wire (resist.compression.bits: 4-8, or 32 for fp32).")] = 32,
    topk: Annotated[Optional[float], typer.Option(help="Fraction of each averaged tensor's change sent per sync (resist.compression.topk, in (0, 1]).")] = None,
) -> None:
    """Show the partition of a network over S workers, depth per sub-ResNet and bytes per round
    (with --rate: predicted seconds per round for ResIST, local SGD and DDP)."""
    from rich.console import Console
    from rich.table import Table

    from .models.zoo import build_named_model
    from .resist.accounting import link_seconds, plan_report

    try:
        if nodes is not None and workers is not None:
            raise ValueError(f"give -S (sub-networks) or --nodes (machines), not both (got -S {workers} and --nodes {nodes})")
        workers = 4 if workers is None else workers
        if rate is not None:
            from .cluster.network import ClusterError, parse_rate

            try:
                rate_bits = parse_rate(rate)
            except ClusterError as e:
                raise ValueError(f"--rate: {e}") from None
        if bits not in (4, 5, 6, 7, 8, 32):
            raise ValueError(f"--bits: expected 4, 5, 6, 7, 8 or 32, got {bits}")
        if topk is not None and not 0 < topk <= 1:
            raise ValueError(f"--topk: expected a fraction in (0, 1], got {topk}")
        from .resist.transport import Codec

        chosen = [x.strip() for x in sections.split(",") if x.strip()] if sections is not None else None
        if nodes is not None:
            if topk is not None:
                raise ValueError("--topk: the machine comparison (--nodes) predicts fp32 and --bits transport only")
            from .resist.accounting import machine_report

            net = build_named_model(model)
            both = machine_report(net, nodes, gpus_per_node, min_blocks=min_blocks, seed=seed, rounds=max(rounds, 1),
                                  codec=Codec(bits), sections=chosen)
            _print_machines(both, nodes, gpus_per_node, rate, rate_bits if rate is not None else None, local_steps)
            return
        rep = plan_report(build_named_model(model), workers, model_name=model, min_blocks=min_blocks, seed=seed,
                          rounds=max(rounds, 2), codec=Codec(bits), topk=topk, sections=chosen)
    except (ValueError, KeyError, TypeError) as e:
        raise _fail(str(e).replace("resist.min_blocks", "--min-blocks").replace("resist.sections", "--sections")) from None
    console = Console(width=max(100, Console().width))
    _print_sections(console, rep)
    console.print(f"each sub-ResNet: {rep['blocks_per_worker']} partitioned blocks (min_blocks {rep['min_blocks']}), "
                  f"depth {rep['depth']} of {rep['full_depth']} blocks; residual scale of the global network {rep['scale']:.4f}")
    first = rep["rounds"][0]["rank_params"]
    console.print(f"parameters per rank in round 0: mean {sum(first) / len(first):,.0f}, max {max(first):,} "
                  f"({max(first) / rep['total_params']:.3f} of the whole network)")
    if rep["degenerate"]:
        console.print(f"[bold yellow]warning:[/] {rep['degenerate']}")
    for r in rep["rounds"][:rounds]:
        table = Table(title=f"round {r['round']}")
        table.add_column("rank", justify="right")
        table.add_column("blocks held")
        for rank, g in enumerate(r["groups"]):
            table.add_row(str(rank), " ".join(str(b) for b in g))
        console.print(table)
        if r["bytes"] is not None:
            line = (f"sync into round {r['round']}: {r['bytes'] / 2**20:.1f} MiB (local SGD {rep['local_sgd_bytes'] / 2**20:.1f} MiB, "
                    f"ratio {r['bytes'] / rep['local_sgd_bytes']:.3f}")
            if bits != 32 or topk is not None:
                line += f"; compressed ResIST / fp32 local SGD {r['bytes'] / rep['fp32_local_sgd_bytes']:.3f}"
            console.print(line + ")")
    if rate is not None:
        t = link_seconds(rep, rate_bits)
        table = Table(title=f"predicted seconds on a {rate} link per machine, one round of {local_steps} local steps (no latency or headers)")
        for col in ("mode", "bytes sent per rank", "seconds per round"):
            table.add_column(col, justify="left" if col == "mode" else "right")
        mean_rank = t["resist_round"] * rate_bits / 8
        table.add_row("resist", f"{mean_rank / 2**20:.2f} MiB", f"{t['resist_round']:.2f}")
        table.add_row("local_sgd", f"{rep['local_sgd_rank_bytes'] / 2**20:.2f} MiB", f"{t['local_sgd_round']:.2f}")
        table.add_row("ddp", f"{local_steps * rep['ddp_rank_bytes_per_step'] / 2**20:.2f} MiB", f"{local_steps * t['ddp_step']:.2f}")
        console.print(table)


def _print_machines(both: dict[str, Any], nodes: int, g: int, rate: str | None, rate_bits: float | None, local_steps: int) -> None:
    """``plan --nodes``: topologies rank and node side by side."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    table = Table(title=f"{nodes} machines x {g} ranks: resist.topology rank and node (bytes per machine's NIC)")
    table.add_column("")
    for kind in ("rank", "node"):
        table.add_column(kind, justify="right")
    r, n = both["rank"], both["node"]
    mib = lambda x: f"{x / 2**20:,.1f} MiB"  # noqa: E731
    rows = [("sub-networks (S)", str(r["workers"]), str(n["workers"])),
            ("partitioned blocks per sub-network", str(r["blocks_per_worker"]), str(n["blocks_per_worker"])),
            ("depth (blocks)", f"{r['depth']} of {r['full_depth']}", f"{n['depth']} of {n['full_depth']}"),
            ("ResIST: NIC bytes per sync (busiest machine)", mib(r["nic_round"]), mib(n["nic_round"])),
            ("local SGD: NIC bytes per sync", mib(r["local_sgd_nic_round"]), mib(n["local_sgd_nic_round"])),
            ("bytes inside a machine per step (per rank)", mib(r["inside_step"]), mib(n["inside_step"]))]
    if rate_bits is not None:
        rows += [(f"ResIST: seconds per sync at {rate}", f"{r['nic_round'] * 8 / rate_bits:.2f}", f"{n['nic_round'] * 8 / rate_bits:.2f}"),
                 (f"local SGD: seconds per sync at {rate}", f"{r['local_sgd_nic_round'] * 8 / rate_bits:.2f}",
                  f"{n['local_sgd_nic_round'] * 8 / rate_bits:.2f}")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if r["nic_round"]:
        console.print(f"node / rank ResIST bytes over the slow link: {n['nic_round'] / r['nic_round']:.3f} "
                      f"({r['nic_round'] / max(n['nic_round'], 1):.1f}x less with node)")
    for kind in ("rank", "node"):
        if both[kind]["degenerate"]:
            console.print(f"[bold yellow]warning:[/] {kind}: {both[kind]['degenerate']}")


def _print_sections(console: Any, rep: dict[str, Any]) -> None:
    """The partitioned sections of a plan report: blocks, parameters, the share partitioned."""
    from rich.table import Table

    console.print(f"{rep['model']}: {rep['num_blocks']} partitionable blocks of {rep['partitioned_params']:,} parameters; "
                  f"shared {rep['shared_params']:,} of {rep['total_params']:,} parameters "
                  f"({rep['partitioned_params'] / rep['total_params']:.1%} partitioned)")
    table = Table(title="partitioned sections")
    for col in ("section", "partitionable blocks", "parameters", "share of all"):
        table.add_column(col, justify="left" if col in ("section", "partitionable blocks") else "right")
    for sec in rep["sections"]:
        table.add_row(sec["name"], " ".join(b.rpartition(".")[2] for b in sec["blocks"]), f"{sec['params']:,}",
                      f"{sec['params'] / rep['total_params']:.1%}")
    console.print(table)


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


app.command("cluster", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(cluster_command)


_BENCHMARKS = {"engine": "bench_engine.py", "ap": "bench_voc_ap.py", "fashion-mnist": "bench_fashion_mnist.py"}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"Which benchmark: {', '.join(_BENCHMARKS)}. Extra arguments go to its script.")],
) -> None:
    """Run a benchmark script of benchmarks/ (e.g. `resist-det bench engine bytes`); it prints its figures."""
    import subprocess
    import sys

    if name not in _BENCHMARKS:
        raise _fail(f"unknown benchmark {name!r}; choose one of {', '.join(_BENCHMARKS)}")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / _BENCHMARKS[name]
    if not script.is_file():
        raise _fail(f"{script} not found: benchmarks live in the source checkout, not in the installed package")
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
