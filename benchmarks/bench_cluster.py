#!/usr/bin/env python
"""Time to accuracy on emulated machines over bandwidth-limited links (needs root).

    python benchmarks/bench_cluster.py [--nodes 4] [--rates 500kbit,1mbit,50mbit,1gbit] [--seeds 0,1]
        [--other-seeds 0] [--target 0.80] [--epochs 10] [--record benchmarks/results/cluster.txt]

Real data (Fashion-MNIST, ``apt-get install dataset-fashion-mnist``), ``--nodes`` emulated
machines (one network namespace and one tbf-shaped NIC each, ``resist-det cluster``), one rank
per machine, the same recipe for every mode: ResIST, local SGD and DeepSpeed data parallel.  The
network is a pre-activation ResNet whose section 3 has 23 blocks (22 partitioned, as in the
paper's ResNet101) and carries most of the parameters.  For each link rate and mode: time to
reach ``--target`` test accuracy (training wall time at the end of the first epoch whose global
model reaches it; evaluation excluded, as in the paper's timings), final accuracy, wall time,
accounted and wire bytes, and the measured sync seconds per round beside ``resist-det plan``'s
prediction.  Data parallel is stopped after ``--ddp-cap`` x ResIST's time to target at the same
rate; when stopped, its time to target is reported as a lower bound.  Training is bit-identical
at every link rate (the same seeds and data; ``tests/test_cluster.py``), so the runs train every
epoch only at the highest rate, where that is cheapest, and final accuracy is read there; at the
other rates they stop once they reach the target (``--full-at all``: every epoch at every rate;
``--full-at none``: nowhere, final accuracy not measured); only the ``--final-modes`` do, the
others stop at the target everywhere.  ``--seeds`` run at the lowest
rate and where final accuracy is read, ``--other-seeds`` elsewhere.  Writes a PNG (accuracy
against wall time per rate, speedup against link rate) next to ``--record``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from resist_det.cluster import ClusterError, check_privileges, node_rates, parse_rate, run_cluster
from resist_det.record import host_line, write_record

RECIPE = "fashion_mnist_resist"
PAPER = ("paper, ResIST / local SGD speedup: Table 4 (CIFAR, 4-8 machines, total time) 3.58-3.81x; "
         "Table 6 (Pascal VOC, 2-4 machines) 1.49-1.64x; Table 5 (ImageNet, time to accuracy) 1.02-1.25x")


#: PyTorch's own tools, run by benchmarks/peer_train.py on the same recipe: label -> its arguments.
PEERS = {"powersgd1": ["--peer", "powersgd", "--powersgd-rank", "1"], "powersgd4": ["--peer", "powersgd", "--powersgd-rank", "4"],
         "post_local_sgd": ["--peer", "post_local_sgd"]}


def split_mode(label: str) -> tuple[str, int]:
    """``resist_8bit`` -> (``resist``, 8); ``local_sgd@node`` -> (``local_sgd``, 32); a peer -> (its label, 32)."""
    if label in PEERS:
        return label, 32
    m = re.fullmatch(r"(resist|local_sgd|ddp)(?:_(\d)bit)?(?:@(rank|node))?", label)
    if not m or (m.group(1) == "ddp" and (m.group(2) or m.group(3))):
        raise SystemExit(f"error: --modes: unknown mode {label!r} (resist, local_sgd, ddp, or resist_8bit / local_sgd_8bit ..., "
                         f"each with @rank or @node for resist.topology; or a peer: {', '.join(PEERS)})")
    return m.group(1), int(m.group(2) or 32)


def topology_of(label: str) -> str:
    """``resist@node`` -> ``node``; without a suffix, ``auto`` (the recipe's default)."""
    return label.split("@")[1] if "@" in label else "auto"


def overrides(args, label: str, seed: int, out: Path) -> dict:
    mode, bits = split_mode(label)
    drops = [float(e) for e in args.lr_drops.split(",")] if args.lr_drops else []
    if args.model == "resnet18":  # a stock torchvision resnet18 (1-channel stem), every section partitioned
        net = {"model": {"kind": "resnet", "depth": 18, "seed": seed}, "resist.min_blocks": None}
    else:  # the paper's shape: section 3 of 23 blocks, most of the parameters
        net = {"model.layers": [1, 1, 23, 1], "model.base_width": 8, "model.seed": seed, "resist.min_blocks": 5}
    return {
        **net, "resist.mode": "local_sgd" if mode in PEERS else mode, "resist.compression": {"bits": bits},
        "resist.topology": topology_of(label), "resist.local_steps": args.local_steps, "resist.seed": seed,
        "deepspeed.train_micro_batch_size_per_gpu": args.batch,
        "train.epochs": args.epochs, "train.max_steps_per_epoch": args.steps_per_epoch, "train.lr_schedule": {"milestones": drops, "gamma": 0.1},
        "train.seed": seed, "train.eval_every": 1, "train.checkpoint_every": 10**6, "train.log_every": 5,
        "train.output_dir": str(out), "data.limit_test": args.limit_test,
    }


def read_run(out: Path) -> dict:
    """Epoch records, and how far training got (seconds, evaluation excluded) by its last log line."""
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    epochs = [r for r in log if r["event"] == "epoch"]
    start = next((r["time"] for r in log if r["event"] == "start"), None)
    trained = (log[-1]["time"] - start - sum(r.get("eval_seconds", 0.0) for r in epochs)) if log and start else 0.0
    return {"epochs": epochs, "trained_seconds": max(trained, epochs[-1]["wall"] if epochs else 0.0)}


def time_to_target(run: dict, target: float) -> tuple[float, bool]:
    """(seconds, reached): the wall of the first epoch at ``target``, else a lower bound."""
    for r in run["epochs"]:
        if r.get("metrics", {}).get("accuracy", 0.0) >= target:
            return r["wall"], True
    return run["trained_seconds"], False


def reached_target(out: Path, target: float):
    """A ``stop_when`` for :func:`run_cluster`: has the run logged an epoch at ``target``?"""
    path, seen = out / "metrics.jsonl", {"size": -1}

    def check() -> bool:
        size = path.stat().st_size if path.is_file() else 0
        if size == seen["size"]:
            return False
        seen["size"] = size
        return time_to_target(read_run(out), target)[1]
    return check


def predicted(args, labels: list[str]) -> dict:
    """``resist-det plan``'s wire seconds per round (and per DDP step) for each rate and mode label."""
    from resist_det.models import preact_resnet
    from resist_det.models.resnet import resnet
    from resist_det.resist.accounting import link_seconds, plan_report
    from resist_det.resist.transport import Codec

    if args.model == "resnet18":
        net, min_blocks = resnet(18, num_classes=10, in_channels=1, device="meta"), None
    else:
        net, min_blocks = preact_resnet(layers=[1, 1, 23, 1], num_classes=10, stem="cifar", base_width=8, device="meta"), 5
    out: dict = {}
    if args.nproc_per_node > 1:  # seconds on the busiest machine's NIC, per topology (resist-det plan --nodes)
        from resist_det.resist.accounting import machine_report

        for bits in sorted({split_mode(label)[1] for label in labels}):
            both = machine_report(net, args.nodes, args.nproc_per_node, min_blocks=min_blocks, rounds=20,
                                  codec=Codec(bits=bits) if bits != 32 else None)
            for rate in args.rates:
                for label in labels:
                    mode, b = split_mode(label)
                    kind = "node" if topology_of(label) == "node" else "rank"
                    if b == bits and mode != "ddp":
                        key = "nic_round" if mode == "resist" else "local_sgd_nic_round"
                        out[(rate, label)] = both[kind][key] * 8 / parse_rate(rate)
        return out
    for bits in sorted({split_mode(label)[1] for label in labels}):
        rep = plan_report(net, args.nodes, min_blocks=min_blocks, rounds=20, codec=Codec(bits=bits) if bits != 32 else None)
        for rate in args.rates:
            secs = link_seconds(rep, parse_rate(rate))
            for label in labels:
                mode, b = split_mode(label)
                if b == bits and mode not in PEERS:  # (no prediction for PyTorch's tools)
                    out[(rate, label)] = secs["ddp_step"] * args.local_steps if mode == "ddp" else secs[f"{mode}_round"]
    return out


def plot(results: dict, args, path: Path, base: str = "local_sgd", ours: str = "resist") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.rates) + 1, figsize=(4.2 * (len(args.rates) + 1), 3.6))
    colours = {"resist": "tab:red", "local_sgd": "tab:blue", "ddp": "tab:gray", "resist_8bit": "tab:orange", "local_sgd_8bit": "tab:cyan",
               "resist@node": "tab:red", "resist@rank": "tab:purple", "local_sgd@node": "tab:blue", "resist_8bit@node": "tab:orange",
               "powersgd1": "tab:green", "powersgd4": "tab:olive", "post_local_sgd": "tab:brown"}
    for ax, rate in zip(axes, args.rates):
        for (r, mode, seed), run in results.items():
            if r != rate:
                continue
            xs = [e["wall"] for e in run["epochs"]]
            ys = [100 * e.get("metrics", {}).get("accuracy", math.nan) for e in run["epochs"]]
            ax.plot(xs, ys, "o-", color=colours.get(mode, "tab:green"), label=mode if seed == args.seeds[0] else None, alpha=0.8)
        ax.axhline(100 * args.target, ls="--", color="k", lw=0.8)
        ax.set(title=f"{rate} per machine", xlabel="training wall (s)", ylabel="test accuracy (%)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    bits = [parse_rate(r) / 1e6 for r in args.rates]
    for base, style in ((base, "o-"), ("ddp", "s--")):
        if not any(m == base for _, m, _ in results):
            continue
        ratios = []
        for rate in args.rates:
            t_res = _mean([time_to_target(results[(rate, ours, s)], args.target)[0] for s in args.seeds if (rate, ours, s) in results])
            t_base = _mean([time_to_target(results[(rate, base, s)], args.target)[0] for s in args.seeds if (rate, base, s) in results])
            ratios.append(t_base / t_res if t_res and t_base else math.nan)
        ax.plot(bits, ratios, style, label=f"{ours} speedup over {base}")
    ax.set(xscale="log", xlabel="link rate (Mbit/s)", ylabel="speedup in time to target", title="speedup")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mean_time_to_target(results: dict, args, rate: str, mode: str) -> tuple[float, bool]:
    """Mean over ``--seeds`` of the time to target at ``rate``, and whether every seed reached it."""
    ts = [time_to_target(results[(rate, mode, s)], args.target) for s in args.seeds if (rate, mode, s) in results]
    return _mean([t for t, _ in ts]), all(ok for _, ok in ts) and bool(ts)


def final_accuracy(results: dict, args, rate: str, mode: str) -> float:
    """Mean over ``--seeds`` of the last epoch's accuracy (%) of the runs trained in full at ``rate``."""
    return _mean([100 * results[(rate, mode, s)]["epochs"][-1].get("metrics", {}).get("accuracy", math.nan)
                  for s in args.seeds if (rate, mode, s) in results and results[(rate, mode, s)]["epochs"]
                  and not results[(rate, mode, s)]["stopped"]])


def peer_checks(results: dict, args, modes: list[str]) -> list[tuple[str, bool]]:
    """ResIST against PyTorch's tools and 8-bit local SGD, when they ran (issue: the strongest peers)."""
    peers = [m for m in modes if m in PEERS]
    if not peers:
        return []

    mean_t = lambda rate, mode: mean_time_to_target(results, args, rate, mode)  # noqa: E731
    final = lambda rate, mode: final_accuracy(results, args, rate, mode)  # noqa: E731

    low, high, out = args.rates[0], args.rates[-1], []
    rivals = [m for m in peers + ["local_sgd_8bit"] if m in modes]
    if "resist_8bit" in modes:
        best_low = min((mean_t(low, m)[0], m) for m in rivals)
        q8 = mean_t(low, "resist_8bit")
        out.append((f"lowest rate ({low}): resist_8bit <= 0.5 x the best of {', '.join(rivals)} ({best_low[1]}: "
                    f"{q8[0]:.1f}s vs {best_low[0]:.1f}s)", q8[1] and q8[0] <= 0.5 * best_low[0]))
    if "resist" in modes:
        best_high = min((mean_t(high, m)[0], m) for m in rivals + [m for m in ("local_sgd", "ddp") if m in modes])
        ours = mean_t(high, "resist")
        out.append((f"highest rate ({high}): resist within 1.1 x the best peer ({best_high[1]}: {ours[0]:.1f}s vs {best_high[0]:.1f}s)",
                    ours[1] and ours[0] <= 1.1 * best_high[0]))
    if "post_local_sgd" in modes and "local_sgd" in modes:
        a, b = final(high, "post_local_sgd"), final(high, "local_sgd")
        out.append((f"PyTorch post-local SGD matches the local_sgd mode (final accuracy within 0.5 point, same seeds, {high}): "
                    + ("NOT MEASURED (neither trained every epoch here: --final-modes / --full-at)" if math.isnan(a - b)
                       else f"{a:.2f}% vs {b:.2f}%"), abs(a - b) <= 0.5))
    return out


def topology_summary(results: dict, args, modes: list[str], pred: dict, total: float, host: str) -> int:
    """Machines of several ranks: ResIST with topology node against rank and hierarchical local SGD."""
    lines = [f"Fashion-MNIST, {args.nodes} emulated machines x {args.nproc_per_node} ranks (tbf-shaped NICs; a machine's ranks "
             f"talk over its loopback), preact ResNet [1,1,23,1] width 8, batch {args.batch}/rank, {args.local_steps} local steps, "
             f"{args.steps_per_epoch} steps/epoch, {args.epochs} epochs, test set first {args.limit_test} images, "
             f"target {100 * args.target:.1f}%  (total {total:.0f} s)",
             "rate      mode               seed  t->target(s)  final acc  wall (s)  NIC MiB acct  wire MiB  wire/acc  sync s/round  plan s/round"]
    worst, measured = 0.0, 0
    for (rate, mode, seed), r in results.items():
        last = r["epochs"][-1] if r["epochs"] else {}
        t, reached = time_to_target(r, args.target)
        acc = 100 * last.get("metrics", {}).get("accuracy", math.nan)
        acct = sum(last["nic_bytes"]) if "nic_bytes" in last else math.nan
        wire = last.get("wire_bytes", math.nan)
        ratio = wire / acct if acct else math.nan
        if not math.isnan(ratio):
            worst, measured = max(worst, abs(ratio - 1)), measured + 1
        sync = last.get("sync_seconds", math.nan) / last["round"] if last.get("round") else math.nan
        lines.append(f"{rate:9s} {mode:18s} {seed:4d}  {('' if reached else '>') + f'{t:.1f}':>12s}  {acc:8.2f}%  "
                     f"{last.get('wall', math.nan):8.1f}  {acct / 2**20:12.1f}  {wire / 2**20:8.1f}  {ratio:8.3f}  "
                     f"{sync:12.2f}  {pred.get((rate, mode), math.nan):12.2f}"
                     + ("  (stopped at target)" if r["at_target"] else "  (stopped)" if r["stopped"] else ""))
    lines.append("('NIC MiB acct': what the engines counted as crossing the machines' NICs; n/a for runs recorded before "
                 "the loop logged it; 'plan s/round': the busiest machine's NIC per sync, resist-det plan --nodes)")

    mean_t = lambda rate, mode: mean_time_to_target(results, args, rate, mode)  # noqa: E731
    final_acc = lambda rate, mode: final_accuracy(results, args, rate, mode)  # noqa: E731

    low, high = args.rates[0], args.rates[-1]
    for rate in args.rates:
        lines.append(f"{rate}: time to {100 * args.target:.0f}%: " + ", ".join(
            f"{m} {mean_t(rate, m)[0]:.1f}s{'' if mean_t(rate, m)[1] else ' (not reached)'}" for m in modes))
    node, rank, local, q8 = (mean_t(low, m) for m in ("resist@node", "resist@rank", "local_sgd@node", "resist_8bit@node"))
    acc_node, acc_local = final_acc(high, "resist@node"), final_acc(high, "local_sgd@node")
    checks = [
        (f"lowest rate ({low}): resist@node <= 0.6 x resist@rank's time to target ({node[0] / rank[0]:.3f})",
         node[1] and rank[1] and node[0] <= 0.6 * rank[0]),
        (f"lowest rate ({low}): resist@node <= 0.6 x hierarchical local SGD's (local_sgd@node) time ({node[0] / local[0]:.3f})",
         node[1] and local[1] and node[0] <= 0.6 * local[0]),
        (f"lowest rate ({low}): resist_8bit@node <= 0.35 x fp32 hierarchical local SGD's time ({q8[0] / local[0]:.3f})",
         q8[1] and local[1] and q8[0] <= 0.35 * local[0]),
        (f"final accuracy of resist@node within 1.0 point of local_sgd@node (mean of seeds {args.seeds}, trained in full at "
         f"{high}, bit-identical at every rate): {acc_node:.2f}% vs {acc_local:.2f}%", abs(acc_node - acc_local) <= 1.0),
        (f"wire / accounted NIC bytes within 1 + {args.wire_tolerance} in every run that logged them ({measured} runs, worst "
         f"{1 + worst:.3f})", measured > 0 and worst <= args.wire_tolerance),
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_record(args.record, text, host=host)
        plot(results, args, args.record.with_suffix(".png"), base="local_sgd@node", ours="resist@node")
        print(f"plot: {args.record.with_suffix('.png')}")
    return 0 if all(ok for _, ok in checks) else 1


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--nproc-per-node", type=int, default=1, help="ranks per emulated machine")
    ap.add_argument("--model", choices=["preact", "resnet18"], default="preact",
                    help="preact: the paper's shape (section 3 of 23 blocks); resnet18: stock torchvision, every section")
    ap.add_argument("--max-ratio", type=float, default=0.5, help="the check at the lowest rate: resist <= this x local SGD's time")
    ap.add_argument("--max-ddp-ratio", type=float, default=0.2,
                    help="the check at the lowest rate: resist <= this x DDP's time (0: DDP's time is reported, not checked)")
    ap.add_argument("--rates", default="500kbit,1mbit,50mbit,1gbit", help="comma-separated, lowest first (tc units)")
    ap.add_argument("--seeds", default="0,1", help="seeds at the lowest and the highest rate")
    ap.add_argument("--other-seeds", default="0", help="seeds at the other rates")
    ap.add_argument("--ddp-seeds", default="0", help="seeds for data parallel (it is the slow one)")
    ap.add_argument("--modes", default="resist,local_sgd,ddp,resist_8bit")
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=140)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--lr-drops", default="7,9", help="comma-separated epochs at which the learning rate is multiplied by 0.1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit-test", type=int, default=2000)
    ap.add_argument("--ddp-cap", type=float, default=5.5, help="stop DDP once it has trained this many times ResIST's time to target")
    ap.add_argument("--peer-cap", type=float, default=0,
                    help="stop a PyTorch peer once it has trained this many times ResIST's (8-bit if run) time to target "
                         "(0: never); a stopped peer's time to target is a lower bound")
    ap.add_argument("--full-at", choices=["highest", "all", "none"], default="highest",
                    help="where runs train every epoch (elsewhere they stop at the target); 'none': final accuracy is not measured")
    ap.add_argument("--final-modes", default="resist,local_sgd",
                    help="modes whose final accuracy is read (they train every epoch where --full-at says; the others stop at the target)")
    ap.add_argument("--out", default="runs/bench_cluster")
    ap.add_argument("--record", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="summarise runs already finished under --out instead of rerunning them")
    ap.add_argument("--wire-tolerance", type=float, default=0.08,
                    help="allowed wire / accounted - 1: Ethernet, IP and TCP headers (66 B per <= 1448 B segment, "
                         "4.6 %%) and acknowledgements (about 2.3 %%) when a slow link keeps segments small")
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    args.rates = args.rates.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    other_seeds = [int(s) for s in args.other_seeds.split(",")]
    ddp_seeds = [int(s) for s in args.ddp_seeds.split(",")]
    modes, final_modes = args.modes.split(","), args.final_modes.split(",")
    for m in modes + final_modes:
        split_mode(m)
    try:
        check_privileges()
        for r in args.rates:
            node_rates(args.nodes, r)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from resist_det.train.launch import recipe_path

    recipe = str(recipe_path(RECIPE))
    results: dict = {}
    t_all = time.monotonic()
    for rate in args.rates:
        # all seeds where a check reads the mean: the lowest rate, and where final accuracy is read
        main_rate = rate == args.rates[0] or (rate == args.rates[-1] and args.full_at == "highest")
        for seed in (args.seeds if main_rate else other_seeds):
            for mode in modes:
                if mode == "ddp" and seed not in ddp_seeds:
                    continue
                out = Path(args.out) / rate / f"{mode}_s{seed}"
                cap = None
                if mode == "ddp" and (rate, "resist", seed) in results:
                    cap = args.ddp_cap * time_to_target(results[(rate, "resist", seed)], args.target)[0]
                ref = next((m for m in ("resist_8bit", "resist") if (rate, m, seed) in results), None)
                if mode in PEERS and args.peer_cap > 0 and ref:
                    cap = args.peer_cap * time_to_target(results[(rate, ref, seed)], args.target)[0]
                sets = [a for k, v in overrides(args, mode, seed, out).items() for a in ("--set", f"{k}={json.dumps(v)}")]
                print(f"== {rate}, {mode}, seed {seed}" + (f" (stopped after {cap:.0f} s of training)" if cap else ""), flush=True)
                done = out / "cluster" / "cluster.json"
                if args.reuse and done.is_file() and json.loads(done.read_text())["returncode"] in (0, 124):
                    code = json.loads(done.read_text())["returncode"]
                    print("  (reusing the finished run in " + str(out) + ")")
                else:
                    full = mode in final_modes and (args.full_at == "all" or (args.full_at == "highest" and rate == args.rates[-1]))
                    at_target = None if full else reached_target(out, args.target)
                    stop = at_target
                    if cap is not None:  # training time, not wall: start-up (the first broadcast at slow rates) is free
                        stop = lambda at_target=at_target, cap=cap, out=out: (
                            (at_target is not None and at_target()) or read_run(out)["trained_seconds"] >= cap)
                    target, argv = (str(Path(__file__).with_name("peer_train.py")), [recipe, *PEERS[mode], *sets]) \
                        if mode in PEERS else (recipe, [*sets, "--no-progress"])
                    run = run_cluster(target, argv, nodes=args.nodes, rates=node_rates(args.nodes, rate),
                                      log_dir=out / "cluster", stream=False, stop_when=stop, nproc_per_node=args.nproc_per_node)
                    code = run.returncode
                    if code not in (0, 124):
                        print(Path(run.logs[0]).read_text()[-3000:], file=sys.stderr)
                        print(f"training failed: {rate} {mode} seed {seed}", file=sys.stderr)
                        return 1
                res = read_run(out)
                res.update(stopped=code == 124, at_target=code == 124 and time_to_target(res, args.target)[1])
                results[(rate, mode, seed)] = res
                for e in res["epochs"]:
                    print(f"  epoch {e['epoch'] + 1}  wall {e['wall']:7.1f}s  acc {100 * e.get('metrics', {}).get('accuracy', math.nan):5.2f}%  "
                          f"rounds {e.get('round', '-')}  accounted {e.get('bytes', math.nan) / 2**20:7.1f} MiB  "
                          f"wire {e.get('wire_bytes', math.nan) / 2**20:7.1f} MiB", flush=True)
    if args.nproc_per_node > 1:
        return topology_summary(results, args, modes, predicted(args, modes), time.monotonic() - t_all, host)
    pred = predicted(args, modes)
    network = "stock torchvision resnet18 (1-channel stem, every section partitioned)" if args.model == "resnet18" else \
        "preact ResNet [1,1,23,1] width 8"
    lines = [f"Fashion-MNIST, {args.nodes} emulated machines (1 rank each, tbf-shaped NICs), {network}, "
             f"batch {args.batch}/rank, {args.local_steps} local steps, {args.steps_per_epoch} steps/epoch, {args.epochs} epochs, "
             f"test set first {args.limit_test} images, target {100 * args.target:.1f}%  (total {time.monotonic() - t_all:.0f} s)",
             "rate      mode       seed  t->target(s)  final acc  wall (s)  accounted MiB  wire MiB  wire/acc  sync s/round  plan s/round"]
    worst_wire = 0.0
    for (rate, mode, seed), r in results.items():
        last = r["epochs"][-1] if r["epochs"] else {}
        t, reached = time_to_target(r, args.target)
        acc = 100 * last.get("metrics", {}).get("accuracy", math.nan)
        wire, acct = last.get("wire_bytes", math.nan), last.get("bytes", math.nan)
        ratio = wire / acct if acct else math.nan
        if not math.isnan(ratio):
            worst_wire = max(worst_wire, abs(ratio - 1))
        sync = last.get("sync_seconds", math.nan) / last["round"] if last.get("round") else math.nan
        plan_s = pred.get((rate, mode), math.nan)
        lines.append(f"{rate:9s} {mode:10s} {seed:4d}  {('' if reached else '>') + f'{t:.1f}':>12s}  {acc:8.2f}%  "
                     f"{last.get('wall', math.nan):8.1f}  {acct / 2**20:13.1f}  {wire / 2**20:8.1f}  {ratio:8.3f}  "
                     f"{sync:12.2f}  {plan_s:12.2f}" + ("  (stopped at target)" if r["at_target"] else "  (stopped)" if r["stopped"] else ""))
    lines.append("(ddp: no sync rounds; 'plan s/round' is its gradient traffic over the same local steps; "
                 "'stopped at target': final acc, wall and bytes are those at the target)")
    verdicts = []
    for rate in args.rates:
        def mean_t(mode):
            ts = [time_to_target(results[(rate, mode, s)], args.target) for s in args.seeds if (rate, mode, s) in results]
            return _mean([t for t, _ in ts]), all(ok for _, ok in ts) and bool(ts)

        (tr, okr), (tl, okl), (td, okd) = mean_t("resist"), mean_t("local_sgd"), mean_t("ddp")
        accs = {m: _mean([100 * results[(rate, m, s)]["epochs"][-1].get("metrics", {}).get("accuracy", math.nan)
                          for s in args.seeds if (rate, m, s) in results and results[(rate, m, s)]["epochs"]]) for m in modes}
        lines.append(f"{rate}: time to {100 * args.target:.0f}%: resist {tr:.1f}s{'' if okr else ' (not reached)'}, "
                     f"local SGD {tl:.1f}s{'' if okl else ' (not reached)'}, ddp {'' if okd else '>'}{td:.1f}s; "
                     f"resist / local SGD {tr / tl:.3f}, resist / ddp {'' if okd else '<'}{tr / td:.3f}; "
                     + ("final acc " + ", ".join(f"{m} {accs[m]:.2f}%" for m in full) if (full := [
                         m for m in modes if (runs := [r for (r_, m_, _), r in results.items() if (r_, m_) == (rate, m)])
                         and not any(r["stopped"] for r in runs)])
                        else "runs stopped at the target (final accuracy: where trained in full)"))
        compressed = {m: mean_t(m) for m in modes if split_mode(m)[1] != 32}
        for m, (tc, okc) in compressed.items():
            lines.append(f"{rate}: {m}: time to {100 * args.target:.0f}% {tc:.1f}s{'' if okc else ' (not reached)'}, "
                         f"/ fp32 local SGD {tc / tl:.3f}, / fp32 resist {tc / tr:.3f}; final acc {accs[m]:.2f}%")
        verdicts.append((rate, tr, tl, td, okr, okl, accs, compressed))
    low, high = verdicts[0], verdicts[-1]
    final = {"highest": high, "all": low, "none": None}[args.full_at]  # where every epoch was trained
    checks = []
    if "resist" in modes and "local_sgd" in modes:  # the paper's comparison (a peers-only run skips it)
        checks.append((f"lowest rate ({low[0]}): resist <= {args.max_ratio} x local SGD's time to target",
                       low[4] and low[5] and low[1] <= args.max_ratio * low[2]))
        if "ddp" in modes and args.max_ddp_ratio > 0:
            checks.append((f"lowest rate ({low[0]}): resist <= {args.max_ddp_ratio} x DDP's time to target",
                           low[4] and low[1] <= args.max_ddp_ratio * low[3]))
        checks.append((f"final accuracy at most 1.0 point below local SGD's (mean of seeds; trained in full at {final[0]}, "
                       f"bit-identical at every rate): resist {final[6].get('resist', math.nan):.2f}% local SGD "
                       f"{final[6].get('local_sgd', math.nan):.2f}%",
                       final[6].get("local_sgd", math.nan) - final[6].get("resist", math.nan) <= 1.0) if final and "resist" in final_modes
                      else ("final accuracy within 1.0 point of local SGD: NOT MEASURED in this run (resist not trained in full: "
                            "--full-at / --final-modes)", False))
        if len(args.rates) > 1:
            checks.append((f"highest rate ({high[0]}): resist no slower than local SGD to the target", high[4] and high[1] <= high[2]))
    checks.append((f"wire / accounted bytes within 1 + {args.wire_tolerance} in every run (worst {1 + worst_wire:.3f})",
                   worst_wire <= args.wire_tolerance))
    if "resist_8bit" in low[7] and "local_sgd" in modes:
        tc, okc = low[7]["resist_8bit"]
        checks.append((f"lowest rate ({low[0]}): resist_8bit <= 0.28 x fp32 local SGD's time to target", okc and low[5] and tc <= 0.28 * low[2]))
    checks += peer_checks(results, args, modes)
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]
    lines.append(PAPER)
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_record(args.record, text, host=host)
        plot(results, args, args.record.with_suffix(".png"))
        print(f"plot: {args.record.with_suffix('.png')}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
