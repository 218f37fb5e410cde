"""Several emulated machines on one host with bandwidth-limited links (``resist-det cluster``).

:mod:`.network` builds the namespaces, NICs, switch and shaping; :mod:`.launch` runs one
node per machine through a real multi-node launcher (torchrun or DeepSpeed's) and collects NIC counters.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .launch import ClusterRun, run_on_cluster, training_command
from .network import ClusterError, EmulatedNetwork, check_privileges, leftovers, parse_rate, sweep_dead_clusters

__all__ = ["ClusterError", "ClusterRun", "EmulatedNetwork", "check_privileges", "leftovers", "parse_rate",
           "run_cluster", "node_rates", "training_command"]


def node_rates(nodes: int, rate: str, rate_per_node: list[str] | None = None) -> list[float]:
    """Link rate of every node in bits/s: ``rate`` for all, or one entry of ``rate_per_node`` each."""
    if nodes < 1:
        raise ClusterError(f"--nodes must be at least 1, got {nodes}")
    if rate_per_node:
        if len(rate_per_node) != nodes:
            raise ClusterError(f"--rate-per-node: {len(rate_per_node)} rates given for {nodes} nodes (one per node expected)")
        return [parse_rate(r) for r in rate_per_node]
    return [parse_rate(rate)] * nodes


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the tool unwinds like Ctrl-C, so the network is always removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_cluster(target: str, args: list[str], *, nodes: int, rates: list[float], log_dir: str | Path,
                nproc_per_node: int = 1, stream: bool = True, env: dict[str, str] | None = None,
                timeout: float | None = None, launcher: str = "torchrun",
                stop_when: Callable[[], bool] | None = None) -> ClusterRun:
    """Build the network, run ``target`` (recipe or script) on every node, remove the network."""
    check_privileges()
    if launcher not in ("torchrun", "deepspeed"):
        raise ClusterError(f"launcher {launcher!r}: expected 'torchrun' or 'deepspeed'")
    command = training_command(target, args)
    for tag, pid in sweep_dead_clusters():
        print(f"resist-det cluster: removed emulated cluster {tag} left by a run that is gone (pid {pid})", file=sys.stderr)
    with _sigterm_as_interrupt(), EmulatedNetwork(nodes, rates) as net:
        return run_on_cluster(net, command, nproc_per_node=nproc_per_node, log_dir=log_dir, stream=stream, env=env,
                              timeout=timeout, launcher=launcher, stop_when=stop_when)
