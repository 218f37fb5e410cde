#!/usr/bin/env python
"""Bytes over each machine's NIC per sync, topology ``rank`` against ``node`` (needs root).

    python benchmarks/bench_topology_bytes.py [--layouts 2x2,4x2] [--rounds 3] [--rate 1gbit]
        [--record benchmarks/results/topology_bytes.txt]

For each layout N x g, ``resist-det cluster``'s emulated machines (one namespace and one shaped
NIC each; a machine's ranks talk over its loopback) run this script's worker on N x g ranks:
the paper's network shape (pre-activation ResNet, section 3 of 23 blocks, 22 partitioned,
min_blocks 5) trained one step per round on random data, ``--rounds`` syncs with
``resist.topology`` ``rank`` and then ``node``.  Around every sync the ranks meet at a barrier
and each machine's local rank 0 reads its NIC's ``tx_bytes``; the engines count what they sent
to other machines (``engine.nic_bytes``).  Printed per layout and topology: NIC bytes per
machine per sync on the wire, as accounted, and as ``resist-det plan --nodes N
--gpus-per-node g`` predicts; then node / rank, measured against predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from resist_det.record import host_line, write_record

LAYERS, WIDTH, MIN_BLOCKS, SEED = [1, 1, 23, 1], 16, 5, 3


def network(device=None):
    from resist_det.models import preact_resnet

    return preact_resnet(layers=LAYERS, num_classes=10, stem="cifar", base_width=WIDTH, seed=SEED, device=device)


def worker(out: Path, rounds: int) -> None:
    """One rank: both topologies, ``rounds`` syncs each; writes its figures as JSON."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import resist_det
    from resist_det.train.world import init_distributed, nic_tx_bytes

    rank, _ = init_distributed(10)
    torch.manual_seed(rank)
    result = {}
    for topology in ("rank", "node"):
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
               "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
               "resist": {"local_steps": 10**6, "min_blocks": MIN_BLOCKS, "seed": SEED, "topology": topology}}
        engine, *_ = resist_det.initialize(model=network("meta"), config=cfg)
        wire, counted = [], []
        for _ in range(rounds):
            x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
            dist.barrier()
            tx, nic = nic_tx_bytes(), engine.nic_bytes
            engine.synchronize()
            dist.barrier()
            wire.append(None if tx is None else nic_tx_bytes() - tx)
            counted.append(engine.nic_bytes - nic)
        result[topology] = {"machine": engine.topology.machine, "kind": engine.topology.kind, "wire": wire, "counted": counted}
        del engine
    tmp = out / f".rank{rank}.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / f"rank{rank}.json")


def per_machine(ranks: list[dict], topology: str, key: str, machines: int) -> list[float]:
    """Mean over the syncs of each machine's bytes (summed over its ranks; wire: read once per machine)."""
    out = [0.0] * machines
    for r in ranks:
        t = r[topology]
        values = [v for v in t[key] if v is not None]
        out[t["machine"]] += sum(values) / len(t[key])
    return out


def measure(layout: str, args) -> tuple[list[str], list[tuple[str, bool]]]:
    from resist_det.cluster import node_rates, run_cluster
    from resist_det.resist.accounting import machine_report

    nodes, g = (int(x) for x in layout.split("x"))
    out = Path(args.out) / layout
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    run = run_cluster(str(Path(__file__).resolve()), ["--worker", str(out), "--rounds", str(args.rounds)], nodes=nodes,
                      rates=node_rates(nodes, args.rate), log_dir=out / "cluster", nproc_per_node=g, stream=False)
    if run.returncode != 0:
        print(Path(run.logs[0]).read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"the {layout} run failed (exit code {run.returncode})")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nodes * g)]
    predicted = machine_report(network("meta"), nodes, g, min_blocks=MIN_BLOCKS, seed=SEED, rounds=args.rounds)
    lines, checks, busiest = [], [], {}
    for topology in ("rank", "node"):
        assert {r[topology]["kind"] for r in ranks} == {topology}
        wire = per_machine(ranks, topology, "wire", nodes)
        counted = per_machine(ranks, topology, "counted", nodes)
        pred = [sum(n[m] for n in predicted[topology]["nic_rounds"]) / args.rounds for m in range(nodes)]
        worst = max(abs(w / c - 1) for w, c in zip(wire, counted))
        busiest[topology] = (max(wire), max(counted), max(pred))
        mib = lambda xs: " ".join(f"{x / 2**20:7.2f}" for x in xs)  # noqa: E731
        lines.append(f"{layout:6s} {topology:5s}  wire MiB/sync per machine [{mib(wire)}]  accounted [{mib(counted)}]  "
                     f"plan [{mib(pred)}]  wire/accounted worst {1 + worst:.3f}")
        checks.append((f"{layout} {topology}: NIC bytes per machine per sync within 8 % of the accounted bytes "
                       f"(worst {1 + worst:.3f})", worst <= 0.08))
        checks.append((f"{layout} {topology}: accounted bytes equal to the plan's prediction",
                       all(abs(c - p) <= 1e-6 * max(p, 1) for c, p in zip(counted, pred))))
    ratio_wire = busiest["node"][0] / busiest["rank"][0]
    ratio_pred = busiest["node"][2] / busiest["rank"][2]
    lines.append(f"{layout:6s} node / rank, busiest machine's NIC per sync: wire {ratio_wire:.3f}, plan {ratio_pred:.3f} "
                 f"({busiest['rank'][0] / busiest['node'][0]:.2f}x fewer bytes over the slow link with node)")
    checks.append((f"{layout}: node / rank cross-machine bytes within 5 % of resist-det plan's prediction "
                   f"({ratio_wire:.3f} vs {ratio_pred:.3f})", abs(ratio_wire / ratio_pred - 1) <= 0.05))
    return lines, checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--layouts", default="2x2,4x2", help="machines x ranks per machine, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="1gbit", help="every NIC's link rate (tc units)")
    ap.add_argument("--out", default="runs/bench_topology_bytes")
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    if args.worker is not None:
        worker(args.worker, args.rounds)
        return 0
    from resist_det.cluster import ClusterError, check_privileges

    try:
        check_privileges()
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.monotonic()
    lines, checks = [], []
    for layout in args.layouts.split(","):
        more_lines, more_checks = measure(layout, args)
        lines += more_lines
        checks += more_checks
    text = "\n".join([f"paper-shaped preact ResNet {LAYERS} width {WIDTH} (22 partitioned blocks, min_blocks {MIN_BLOCKS}), "
                      f"{args.rounds} syncs per topology, every NIC at {args.rate}  (total {time.monotonic() - start:.0f} s)",
                      *lines, *[f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]])
    print(text)
    if args.record:
        write_record(args.record, text, host=host)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
