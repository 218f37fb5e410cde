"""Run one training job across the emulated machines, through a real multi-node launcher.

Each node runs ``python -m resist_det.train.agent --nnodes N --node_rank i --master_addr <node 0>``
(or DeepSpeed's launcher with a hostfile and ``--no_ssh --node_rank i``) inside its namespace
with ``GLOO_SOCKET_IFNAME`` set to its shaped NIC, exactly as on real machines.  Node 0's output is streamed; the others go to ``node<i>.log``.  When one node fails the
others are stopped; whatever happens, the network is torn down before returning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .network import NIC, ClusterError, EmulatedNetwork

__all__ = ["ClusterRun", "run_on_cluster", "training_command"]

MASTER_PORT = 29400


@dataclass
class ClusterRun:
    """What a cluster run did: exit code, wall time, and every NIC's counters over the run."""

    returncode: int
    wall: float
    rates: list[float]
    nics: list[dict[str, int]] = field(default_factory=list)  # per node: tx/rx bytes and packets during the run
    logs: list[str] = field(default_factory=list)

    @property
    def wire_bytes(self) -> int:
        """Bytes all NICs sent (headers, acknowledgements and retransmissions included)."""
        return sum(n["tx_bytes"] for n in self.nics)

    def to_json(self) -> dict:
        return {**asdict(self), "wire_bytes": self.wire_bytes}


def training_command(target: str, args: list[str]) -> list[str]:
    """What torchrun starts on each rank: a recipe (file or shipped name) or a Python script."""
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise ClusterError(f"script not found: {target}")
        return [str(Path(target).resolve()), *args]
    from ..train.launch import recipe_path

    try:
        path = recipe_path(target)
    except FileNotFoundError as e:
        raise ClusterError(str(e)) from None
    return ["-m", "resist_det.train", str(path.resolve()), *args]


def _stream(pipe, sink, log) -> None:
    for line in iter(pipe.readline, ""):
        log.write(line)
        log.flush()
        if sink is not None:
            sink.write(line)
            sink.flush()


def launcher_command(launcher: str, net: EmulatedNetwork, node: int, nproc_per_node: int, command: list[str],
                     log_dir: Path) -> list[str]:
    """How node ``node`` starts its ranks: torchrun's multi-node rendezvous, or DeepSpeed's launcher
    with a hostfile (``--no_ssh``: each machine starts its own part, as pdsh would over ssh)."""
    if launcher == "torchrun":  # torchrun's agent, naming a failed rank in one line (resist_det.train.agent)
        return [sys.executable, "-m", "resist_det.train.agent", "--nnodes", str(net.nodes), "--node_rank", str(node),
                "--nproc_per_node", str(nproc_per_node), "--master_addr", net.address(0),
                "--master_port", str(MASTER_PORT), *command]
    if launcher == "deepspeed":
        hostfile = log_dir / "hostfile"
        hostfile.write_text("".join(f"node{i} slots={nproc_per_node}\n" for i in range(net.nodes)))
        target = ["--module", command[1], *command[2:]] if command[0] == "-m" else command
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", net.address(0), "--master_port", str(MASTER_PORT), *target]
    raise ClusterError(f"launcher {launcher!r}: expected 'torchrun' or 'deepspeed'")


def node_failure(net: EmulatedNetwork, node: int, code: int, log: Path) -> str:
    """One line: which machine failed, how, and what its ranks said (their one-line reasons)."""
    from ..train.agent import describe_exit

    said = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
            if ln.startswith(("resist-det: rank", "error:"))] if log.is_file() else []
    return (f"resist-det cluster: node {node} ({net.address(node)}) failed, its launcher {describe_exit(code)}"
            + (f": {'; '.join(said[-4:])}" if said else "") + f" (log: {log})")


def run_on_cluster(net: EmulatedNetwork, command: list[str], *, nproc_per_node: int = 1, log_dir: str | Path,
                   env: dict[str, str] | None = None, stream: bool = True, timeout: float | None = None,
                   launcher: str = "torchrun", stop_when: Callable[[], bool] | None = None) -> ClusterRun:
    """Start ``command`` (see :func:`training_command`) on every node of ``net``; wait for all.

    A node that fails stops the others; an interrupt stops all of them (the caller's ``with`` on
    ``net`` then removes the network); after ``timeout`` seconds all are stopped and the exit
    code is 124, as when ``stop_when()`` (polled a few times a second) turns true.  Returns exit
    code, wall time and NIC counters."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[int, int]] = []
    threads = max(1, (os.cpu_count() or 1) // (net.nodes * nproc_per_node))
    node_env = {"GLOO_SOCKET_IFNAME": NIC, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}  # no internet inside the namespaces
    procs, pumps, logs = [], [], []
    before = net.counters()
    start = time.monotonic()
    try:
        for i in range(net.nodes):
            argv = launcher_command(launcher, net, i, nproc_per_node, command, log_dir)
            log = open(log_dir / f"node{i}.log", "w")
            logs.append(log)
            p = subprocess.Popen(net.command(i, argv, node_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_stream, args=(p.stdout, sys.stdout if (i == 0 and stream) else None, log), daemon=True)
            t.start()
            pumps.append(t)
        while True:
            codes = [p.poll() for p in procs]  # every node polled: a failure anywhere ends the run
            if None not in codes or any(c for c in codes if c is not None):
                failed = [(i, c) for i, c in enumerate(codes) if c]  # before the others are stopped
                break
            if (timeout is not None and time.monotonic() - start > timeout) or (stop_when is not None and stop_when()):
                codes = [124]
                break
            time.sleep(0.2)
        code = next((c for c in codes if c), 0)
        wall = time.monotonic() - start
        after = net.counters()
    finally:
        net.kill_processes()  # a failed or interrupted run leaves nothing running
        for t in pumps:
            t.join(timeout=5)
        for log in logs:
            log.close()
    for i, c in failed:
        print(node_failure(net, i, c, log_dir / f"node{i}.log"), file=sys.stderr, flush=True)
    nics = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
    run = ClusterRun(code, wall, net.rates, nics, [str(log_dir / f"node{i}.log") for i in range(net.nodes)])
    tmp = log_dir / "cluster.json.tmp"
    tmp.write_text(json.dumps(run.to_json(), indent=1))
    os.replace(tmp, log_dir / "cluster.json")
    return run
