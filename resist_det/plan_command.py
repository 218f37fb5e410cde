"""``resist-det plan``: the partition of a network, depth, bytes and seconds per round; with
``--nodes``, topologies rank and node side by side (registered by :mod:`resist_det.cli`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .console import fail as _fail

if TYPE_CHECKING:
    from .resist.accounting import PlanReport

__all__ = ["plan_command"]


def plan_command(
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
    from .models.zoo import build_named_model
    from .resist.accounting import plan_report

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
    _print_plan(rep, rounds, rate, rate_bits if rate is not None else None, local_steps, compressed=bits != 32 or topk is not None)


def _print_plan(rep: "PlanReport", rounds: int, rate: str | None, rate_bits: float | None, local_steps: int, *,
                compressed: bool) -> None:
    """A plan report: sections, depth, each round's blocks and bytes, and with ``rate`` seconds per round."""
    from rich.console import Console
    from rich.table import Table

    from .resist.accounting import link_seconds

    console = Console(width=max(100, Console().width))
    _print_sections(console, rep)
    console.print(f"each sub-ResNet: {rep.blocks_per_worker} partitioned blocks (min_blocks {rep.min_blocks}), "
                  f"depth {rep.depth} of {rep.full_depth} blocks; residual scale of the global network {rep.scale:.4f}")
    first = rep.rounds[0].rank_params
    console.print(f"parameters per rank in round 0: mean {sum(first) / len(first):,.0f}, max {max(first):,} "
                  f"({max(first) / rep.total_params:.3f} of the whole network)")
    if rep.degenerate:
        console.print(f"[bold yellow]warning:[/] {rep.degenerate}")
    for r in rep.rounds[:rounds]:
        table = Table(title=f"round {r.round}")
        table.add_column("rank", justify="right")
        table.add_column("blocks held")
        for rank, g in enumerate(r.groups):
            table.add_row(str(rank), " ".join(str(b) for b in g))
        console.print(table)
        if r.bytes is not None:
            line = (f"sync into round {r.round}: {r.bytes / 2**20:.1f} MiB (local SGD {rep.local_sgd_bytes / 2**20:.1f} MiB, "
                    f"ratio {r.bytes / rep.local_sgd_bytes:.3f}")
            if compressed:
                line += f"; compressed ResIST / fp32 local SGD {r.bytes / rep.fp32_local_sgd_bytes:.3f}"
            console.print(line + ")")
    if rate is not None:
        t = link_seconds(rep, rate_bits)
        table = Table(title=f"predicted seconds on a {rate} link per machine, one round of {local_steps} local steps (no latency or headers)")
        for col in ("mode", "bytes sent per rank", "seconds per round"):
            table.add_column(col, justify="left" if col == "mode" else "right")
        mean_rank = t["resist_round"] * rate_bits / 8
        table.add_row("resist", f"{mean_rank / 2**20:.2f} MiB", f"{t['resist_round']:.2f}")
        table.add_row("local_sgd", f"{rep.local_sgd_rank_bytes / 2**20:.2f} MiB", f"{t['local_sgd_round']:.2f}")
        table.add_row("ddp", f"{local_steps * rep.ddp_rank_bytes_per_step / 2**20:.2f} MiB", f"{local_steps * t['ddp_step']:.2f}")
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


def _print_sections(console: Any, rep: "PlanReport") -> None:
    """The partitioned sections of a plan report: blocks, parameters, the share partitioned."""
    from rich.table import Table

    console.print(f"{rep.model}: {rep.num_blocks} partitionable blocks of {rep.partitioned_params:,} parameters; "
                  f"shared {rep.shared_params:,} of {rep.total_params:,} parameters "
                  f"({rep.partitioned_params / rep.total_params:.1%} partitioned)")
    table = Table(title="partitioned sections")
    for col in ("section", "partitionable blocks", "parameters", "share of all"):
        table.add_column(col, justify="left" if col in ("section", "partitionable blocks") else "right")
    for sec in rep.sections:
        table.add_row(sec["name"], " ".join(b.rpartition(".")[2] for b in sec["blocks"]), f"{sec['params']:,}",
                      f"{sec['params'] / rep.total_params:.1%}")
    console.print(table)
