"""``resist-det cluster``: a recipe or script on N emulated machines (registered by :mod:`resist_det.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import fail

__all__ = ["cluster_command"]


def cluster_command(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="Recipe (file or shipped name) or a Python script; what follows goes to it (e.g. --set train.epochs=1).")],
    nodes: Annotated[int, typer.Option(help="Emulated machines.")] = 2,
    rate: Annotated[str, typer.Option(help="Link rate of every machine's NIC, tc units (100mbit, 1gbit, 10mbps).")] = "1gbit",
    rate_per_node: Annotated[Optional[str], typer.Option(help="Comma-separated rates, one per machine (overrides --rate).")] = None,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Ranks per machine.")] = 1,
    logs: Annotated[Path, typer.Option(help="Where node<i>.log and cluster.json (NIC bytes) go.")] = Path("runs/cluster"),
    timeout: Annotated[Optional[float], typer.Option(min=1, help="Stop every node after this many seconds (exit code 124).")] = None,
    launcher: Annotated[str, typer.Option(help="torchrun (multi-node rendezvous) or deepspeed (hostfile, --no_ssh per machine).")] = "torchrun",
) -> None:
    """Run a recipe or script on N emulated machines (network namespaces, shaped NICs, one switch)
    through a real multi-node launcher (torchrun or DeepSpeed's); prints every NIC's bytes; removes everything after.
    Needs root.  Example: resist-det cluster fashion_mnist_resist --nodes 4 --rate 100mbit -- --set train.epochs=1"""
    from . import ClusterError, check_privileges, node_rates, run_cluster
    from ..train.metrics import human_bytes

    args = list(ctx.args)
    try:
        rates = node_rates(nodes, rate, rate_per_node.split(",") if rate_per_node else None)
        check_privileges()
        if not target.endswith(".py"):  # a recipe: check it and its data before anything is created
            from ..config import load_recipe, parse_overrides
            from ..train.launch import recipe_path
            from ..train.preflight import check_data

            sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
            check_data(load_recipe(recipe_path(target), parse_overrides(sets)))
        run = run_cluster(target, args, nodes=nodes, rates=rates, log_dir=logs, nproc_per_node=nproc_per_node, timeout=timeout,
                          launcher=launcher)
    except (ClusterError, FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        typer.secho("interrupted: the emulated cluster was stopped and removed", err=True)
        raise typer.Exit(code=130) from None
    for i, (nic, r) in enumerate(zip(run.nics, run.rates)):
        typer.echo(f"node {i}  link {r / 1e6:g} Mbit/s  sent {human_bytes(nic['tx_bytes'])}  received {human_bytes(nic['rx_bytes'])}")
    typer.echo(f"wall {run.wall:.1f}s  wire bytes sent {human_bytes(run.wire_bytes)}  exit code {run.returncode}  logs {logs}")
    raise typer.Exit(code=run.returncode)
