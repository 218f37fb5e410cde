"""Emulated machines on one host: a network namespace per node, one shaped NIC each, one switch.

::

    node 0 (netns rdc<id>-n0) eth0 10.201.0.1 ──┐
    node 1 (netns rdc<id>-n1) eth0 10.201.0.2 ──┤  bridge br0 in netns rdc<id>-sw
    ...                                         ┘

Every NIC's egress is shaped with a token bucket (``tc qdisc ... tbf``), so a node sends at most
its link rate, as a machine with that NIC would.  Nothing is created in the host's own
namespace except, for an instant, the veth pairs before they are moved; :meth:`EmulatedNetwork.close`
kills every process left in the namespaces and deletes them, which removes the NICs and the bridge.
Needs root (``CAP_NET_ADMIN``), ``ip`` and ``tc``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["ClusterError", "EmulatedNetwork", "check_privileges", "leftovers", "parse_rate", "sweep_dead_clusters", "PREFIX",
           "SUBNET"]

PREFIX = "rdc"  # every namespace and temporary link this module creates starts with it
SUBNET = "10.201.0"  # node i has SUBNET.(i+1)/24, inside its own namespace only
NIC = "eth0"
OWNERS = Path("/run/resist_det")  # <tag>.json: the process that owns cluster <tag> (pid and start time)

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}  # tc's units: *bit are bits/s, *bps bytes/s


class ClusterError(RuntimeError):
    """The emulated cluster cannot be built or run (privileges, tools, bad arguments)."""


def parse_rate(rate: str) -> float:
    """``"100mbit"`` -> 1e8 bits per second (tc's units: bit/kbit/mbit/gbit/tbit, bps/kbps/mbps/gbps = bytes/s)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _UNITS:
        raise ClusterError(f"link rate {rate!r}: expected a number and one of tc's units {', '.join(_UNITS)} (e.g. 100mbit)")
    bits = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if bits < 8e3:
        raise ClusterError(f"link rate {rate!r}: at least 8kbit is needed")
    return bits


def check_privileges() -> None:
    """One clear line when this host cannot emulate a network (not root, no ``ip`` / ``tc``)."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"the emulated cluster needs {' and '.join(missing)} (iproute2) on PATH")
    cap_net_admin = 1 << 12
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    eff = int(next((ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), "0"), 16)
    if os.geteuid() != 0 and not eff & cap_net_admin:
        raise ClusterError("the emulated cluster needs root (CAP_NET_ADMIN) to create network namespaces")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise ClusterError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _netns(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True)
    if r.returncode:
        raise ClusterError(f"in {ns}: {' '.join(args)}: {r.stderr.strip()}")


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces and host links of cluster ``tag`` (of any cluster if ``None``); empty once removed."""
    ns_prefix, link_prefix = (f"{tag}-", f"{tag}n") if tag else (PREFIX, PREFIX)
    ns = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines() if line.strip()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ln.count(":") >= 2]
    return [f"netns {n}" for n in ns if n.startswith(ns_prefix)] + [f"link {n}" for n in names if n.startswith(link_prefix)]


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time (clock ticks since boot, /proc/<pid>/stat field 22); ``None`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(tag: str) -> tuple[bool, int | None]:
    """Is the process that created cluster ``tag`` still running?  (Its pid from the owner file,
    else from the tag itself, ``rdc<pid % 100000>``.)  A reused pid with another start time is not it."""
    record = OWNERS / f"{tag}.json"
    try:
        owner = json.loads(record.read_text())
        pid, start = int(owner["pid"]), str(owner["start"])
    except (OSError, ValueError, KeyError, TypeError):
        digits = tag[len(PREFIX):]
        if not digits.isdigit():
            return True, None  # not one of ours to judge
        pid, start = int(digits), None
    now = _start_time(pid)
    return now is not None and (start is None or now == start), pid


def _teardown(tag: str, namespaces: list[str]) -> None:
    """Kill every process inside ``namespaces`` and delete them and any host link of ``tag``."""
    for ns in namespaces:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for p in (int(x) for x in r.stdout.split()):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for name in leftovers(tag):
        if name.startswith("link "):
            subprocess.run(["ip", "link", "del", name.split()[1]], capture_output=True)
    (OWNERS / f"{tag}.json").unlink(missing_ok=True)


def sweep_dead_clusters() -> list[tuple[str, int | None]]:
    """Remove emulated clusters whose creating process is gone (a ``resist-det cluster`` killed
    by SIGKILL leaves its namespaces, torchrun nodes and ranks behind); clusters of live
    processes are left alone.  Returns ``(tag, owner pid)`` of each cluster removed."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    by_tag: dict[str, list[str]] = {}
    for line in listed:
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and "-" in name:
            by_tag.setdefault(name.split("-", 1)[0], []).append(name)
    swept = []
    for tag, namespaces in sorted(by_tag.items()):
        alive, pid = _owner_alive(tag)
        if not alive:
            _teardown(tag, namespaces)
            swept.append((tag, pid))
    return swept


class EmulatedNetwork:
    """``nodes`` namespaces on one bridge, NIC egress shaped to ``rates[i]`` bits/s.

    Use as a context manager; :meth:`close` runs on success, error and interrupt alike."""

    def __init__(self, nodes: int, rates: list[float], *, tag: str | None = None, mtu: int = 1500):
        if nodes < 1:
            raise ClusterError(f"nodes must be at least 1, got {nodes}")
        if len(rates) != nodes:
            raise ClusterError(f"rates: one link rate per node expected ({nodes}), got {len(rates)}")
        if nodes > 250:
            raise ClusterError(f"nodes: at most 250 in one /24 subnet, got {nodes}")
        self.nodes, self.rates, self.mtu = nodes, list(rates), mtu
        self.tag = tag or f"{PREFIX}{os.getpid() % 100000}"
        if not self.tag.startswith(PREFIX) or len(self.tag) > 9:
            raise ClusterError(f"tag {self.tag!r}: must start with {PREFIX!r} and have at most 9 characters (link names)")
        self.switch = f"{self.tag}-sw"
        self.namespaces = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.up = False

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def __enter__(self) -> EmulatedNetwork:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        check_privileges()
        clash = leftovers(self.tag)
        if clash:
            raise ClusterError(f"an emulated cluster named {self.tag} already exists ({', '.join(clash)})")
        self.up = True  # from here on close() has something to remove
        OWNERS.mkdir(parents=True, exist_ok=True)  # who owns it: a later run removes it if this process dies
        (OWNERS / f"{self.tag}.json").write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}))
        _ip("netns", "add", self.switch)
        _netns(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        _netns(self.switch, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            node_end, switch_end = f"{self.tag}n{i}a", f"{self.tag}n{i}b"
            _ip("netns", "add", ns)
            _ip("link", "add", node_end, "mtu", str(self.mtu), "type", "veth", "peer", "name", switch_end, "mtu", str(self.mtu))
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", switch_end, "netns", self.switch)
            _netns(self.switch, "ip", "link", "set", switch_end, "master", "br0")
            _netns(self.switch, "ip", "link", "set", switch_end, "up")
            _netns(ns, "ip", "link", "set", node_end, "name", NIC)
            _netns(ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", NIC)
            _netns(ns, "ip", "link", "set", NIC, "up")
            _netns(ns, "ip", "link", "set", "lo", "up")
            rate = int(self.rates[i])
            burst = max(32 * 1024, rate // 8 // 100)  # a bucket of at least 10 ms at the rate (tbf needs >= rate/HZ)
            # A queue of 100 ms at the rate, and at least 512 KiB: a switch port's buffer, so that
            # bursts from several gloo connections queue rather than drop and retransmit.
            limit = max(512 * 1024, rate // 8 // 10)
            _netns(ns, "tc", "qdisc", "add", "dev", NIC, "root", "tbf", "rate", f"{rate}bit",
                   "burst", str(burst), "limit", str(limit))

    def counters(self) -> list[dict[str, int]]:
        """Per node: bytes and packets its NIC sent and received so far (sysfs statistics)."""
        out = []
        for ns in self.namespaces:
            r = subprocess.run(["ip", "netns", "exec", ns, "cat", *(f"/sys/class/net/{NIC}/statistics/{k}"
                                for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"))],
                               capture_output=True, text=True)
            vals = [int(v) for v in r.stdout.split()] if r.returncode == 0 else [0, 0, 0, 0]
            out.append(dict(zip(("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"), vals)))
        return out

    def command(self, node: int, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run inside node ``node``'s namespace (with ``env`` added to the environment)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", self.namespaces[node], "env", *extra, *argv]

    def _pids(self, ns: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def kill_processes(self, grace: float = 5.0) -> None:
        """SIGTERM every process inside the namespaces, then SIGKILL what is left after ``grace`` s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for ns in [self.switch, *self.namespaces] for p in self._pids(ns)]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
            while pids and time.monotonic() < deadline:
                pids = [p for ns in [self.switch, *self.namespaces] for p in self._pids(ns)]
                time.sleep(0.1)
            if not pids:
                return

    def close(self) -> None:
        """Kill what runs inside, delete every namespace (its NIC, the bridge with them); idempotent."""
        if not self.up:
            return
        self.kill_processes()
        for ns in [*self.namespaces, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for name in leftovers(self.tag):
            if name.startswith("link "):  # a veth pair not yet moved when creation failed
                subprocess.run(["ip", "link", "del", name.split()[1]], capture_output=True)
        (OWNERS / f"{self.tag}.json").unlink(missing_ok=True)
        self.up = False
