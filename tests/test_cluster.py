"""The emulated cluster: real multi-node runs over shaped NICs, wire bytes against accounted
bytes, and nothing left behind after success, failure or an interrupt.  Needs root (CI is)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import fmnist_recipe, logged_a_step, train_rank, wait_until, write_idx
from distributed import run_on_ranks
from resist_det.cli import app
from resist_det.cluster import ClusterError, check_privileges, leftovers, parse_rate, run_cluster
from resist_det.cluster.network import PREFIX

try:
    check_privileges()
    NO_NETWORK = ""
except ClusterError as e:
    NO_NETWORK = str(e)
needs_network = pytest.mark.skipif(bool(NO_NETWORK), reason=NO_NETWORK)
# Every ``resist-det cluster`` run sweeps clusters whose owner is gone, so one started on another
# pytest worker could remove (and report) the cluster the SIGKILL test leaves for its own second
# run: the module runs on one worker.
pytestmark = pytest.mark.xdist_group("cluster")

WIRE_TOLERANCE = 0.03  # TCP/IP headers, acknowledgements and barriers: wire bytes <= accounted x 1.03
CLI = [sys.executable, "-m", "resist_det.cli"]


def _left(pid: int | None = None) -> list[str]:
    """What is left of the emulated cluster that process ``pid`` (default: this one) created; a
    cluster someone else runs on this machine at the same time is not ours to judge."""
    return leftovers(f"{PREFIX}{(pid or os.getpid()) % 100000}")


def _running(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_rates_parse_like_tc():
    assert parse_rate("100mbit") == 1e8 and parse_rate("1gbit") == 1e9 and parse_rate("10mbps") == 8e7
    with pytest.raises(ClusterError, match="tc's units"):
        parse_rate("100mb")


@pytest.mark.parametrize("args, message", [
    (["--rate", "100megabit"], "link rate '100megabit'"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--nodes", "3", "--rate-per-node", "10mbit,20mbit"], "2 rates given for 3 nodes"),
])
def test_bad_input_is_refused_before_anything_is_created(tmp_path, args, message):
    res = CliRunner().invoke(app, ["cluster", "demo_shapes", *args, "--logs", str(tmp_path)])
    assert res.exit_code == 1 and message in res.output, res.output
    assert not list(tmp_path.iterdir())
    if not NO_NETWORK:
        assert _left() == []


def test_without_root_one_line_and_nonzero(tmp_path):
    cmd = [*CLI, "cluster", "demo_shapes", "--logs", str(tmp_path / "logs")]
    if os.geteuid() == 0:  # drop to nobody, without capabilities
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    # the first thing missing is named: iproute2 where it is absent (the slim Docker image), else root
    missing = "root" if shutil.which("ip") and shutil.which("tc") else "ip and tc (iproute2)"
    assert res.returncode == 1 and len(errors) == 1 and missing in errors[0], res.stderr


@needs_network
def test_engine_bytes_agree_with_wire_bytes(tmp_path):
    script = Path(__file__).with_name("cluster_modes.py")
    for attempt in range(2):
        run = run_cluster(str(script), [str(tmp_path / "modes.json")], nodes=2, rates=[1e9] * 2,
                          log_dir=tmp_path / f"logs{attempt}", stream=False)
        # Seen once in about ten runs, under CPU contention: a worker aborts in gloo's start-up
        # ("terminate called without an active exception") before any training; start once more.
        if run.returncode == 0 or "terminate called without an active exception" not in Path(run.logs[0]).read_text():
            break
    assert run.returncode == 0, Path(run.logs[0]).read_text()[-3000:]
    res = json.loads((tmp_path / "modes.json").read_text())
    for mode, r in res.items():
        assert r["accounted"] > 1e6, (mode, r)
        assert r["accounted"] <= r["wire"] <= r["accounted"] * (1 + WIRE_TOLERANCE), (mode, r)
    assert res["resist"]["accounted"] < res["local_sgd"]["accounted"] < res["ddp"]["accounted"]
    assert run.wire_bytes >= sum(r["wire"] for r in res.values())  # the run's NIC counters hold all of it
    assert _left() == []


@needs_network
def test_two_machines_train_like_two_local_ranks(tmp_path):
    write_idx(tmp_path / "fmnist")
    recipe = {
        "deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0,
                      "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}},
        "resist": {"mode": "resist", "local_steps": 3, "min_blocks": 2},
        "model": {"kind": "preact_resnet", "layers": [1, 1, 5, 1], "base_width": 4, "stem": "cifar"},
        "data": {"kind": "fashion_mnist", "root": str(tmp_path / "fmnist")},
        "train": {"epochs": 1, "output_dir": str(tmp_path / "local")},
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    run_on_ranks(train_rank, 2, tmp_path / "ranks", recipe, False, timeout=300)  # 2 ranks on one machine
    for launcher in ("torchrun", "deepspeed"):  # deepspeed: a hostfile, each machine started with --no_ssh --node_rank
        run = run_cluster(str(tmp_path / "recipe.json"), ["--no-progress", "--set", f'train.output_dir="{tmp_path / launcher}"'],
                          nodes=2, rates=[1e8] * 2, log_dir=tmp_path / f"logs_{launcher}", stream=False, launcher=launcher)
        assert run.returncode == 0, Path(run.logs[0]).read_text()[-3000:]
    local, cluster, ds = (torch.load(tmp_path / d / "global_model.pt", weights_only=True)["model"] for d in ("local", "torchrun", "deepspeed"))
    assert local.keys() == cluster.keys() == ds.keys()
    assert all(torch.equal(local[k], cluster[k]) and torch.equal(local[k], ds[k]) for k in local)
    epochs = [json.loads(line) for line in (tmp_path / "torchrun" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in epochs if r["event"] == "epoch"][-1]
    assert last["bytes"] <= last["wire_bytes"] <= last["bytes"] * (1 + WIRE_TOLERANCE) + 20_000, last  # + monitoring reductions
    assert _left() == []


@needs_network
def test_a_lost_node_makes_the_others_exit_within_the_timeout(tmp_path):
    """A machine lost mid-round: node 1's processes frozen and its NIC down, as after a power loss
    (no connection is closed, so nothing but the timeout can tell).  Node 0's rank must fail on
    its own within ``train.comm_timeout_minutes`` (6 s): its launcher then exits, the run ends, and
    nothing is left behind.  The orchestrator cannot end it early: node 1's launcher never exits."""
    import threading

    write_idx(tmp_path / "fmnist", n_train=512)
    recipe = fmnist_recipe(tmp_path, "run", local_steps=4)
    recipe["train"].update(epochs=50, comm_timeout_minutes=0.1, log_every=1)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    lost = {}

    def lose_node_1():  # run_cluster holds the main thread (it owns the signal handlers)
        wait_until(lambda: logged_a_step(tmp_path / "run" / "metrics.jsonl"), 180, poll=0.2)
        node1 = [n.split()[1] for n in _left() if n.startswith("netns ") and n.endswith("-n1")]
        if not node1:
            return
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", node1[0]], capture_output=True, text=True).stdout.split()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        subprocess.run(["ip", "netns", "exec", node1[0], "ip", "link", "set", "eth0", "down"], check=True)
        lost.update(at=time.monotonic(), pids=pids)

    saboteur = threading.Thread(target=lose_node_1, daemon=True)
    saboteur.start()
    run = run_cluster(str(tmp_path / "recipe.json"), ["--no-progress"], nodes=2, rates=[1e8] * 2, log_dir=tmp_path / "logs",
                      stream=False, timeout=300)
    end = time.monotonic()
    saboteur.join(timeout=10)
    assert lost.get("pids"), "training did not start on the cluster, or node 1 had no processes"
    waited = end - lost["at"]
    print(f"node 0's run ended {waited:.1f} s after node 1 was lost")  # shown with pytest -s
    assert run.returncode not in (0, 124), run.returncode  # failed by itself, not stopped by the 300 s limit
    assert waited < 6 + 45, waited  # the timeout plus the launcher's teardown; not the default 15 minutes
    log0 = Path(run.logs[0]).read_text()
    assert "timed out" in log0.lower() or "timeout" in log0.lower(), log0[-3000:]
    assert _left() == [] and _running(str(tmp_path / "recipe.json")) == []


@needs_network
def test_failing_node_stops_the_others_and_cleans_up(tmp_path):
    script = tmp_path / "fail_on_node1.py"
    script.write_text("import os, sys, time\nif os.environ['GROUP_RANK'] == '1':\n    time.sleep(2); sys.exit(3)\ntime.sleep(600)\n")
    t = time.monotonic()
    run = run_cluster(str(script), [], nodes=2, rates=[1e8] * 2, log_dir=tmp_path / "logs", stream=False)
    assert run.returncode != 0 and time.monotonic() - t < 120
    assert _left() == [] and _running(str(script)) == []


@needs_network
def test_interrupt_removes_everything(tmp_path):
    script = tmp_path / "sleep_forever.py"
    script.write_text("import time\ntime.sleep(600)\n")
    # SIGINT back to its default in the child: a suite run as a background job inherits it ignored,
    # and Python then never raises KeyboardInterrupt (Ctrl-C in a terminal is what this stands for).
    proc = subprocess.Popen([*CLI, "cluster", str(script), "--nodes", "3", "--logs", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: len(_running(str(script))) >= 1 + 3 * 2, timeout=120)  # the tool, agent + worker per node (or give up)
    assert _left(proc.pid) != []
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped and removed" in err, err
    assert _left(proc.pid) == [] and _running(str(script)) == []


def test_plan_predicts_wire_seconds_by_hand():
    from resist_det.models.zoo import build_named_model
    from resist_det.resist.accounting import link_seconds, plan_report, split_sizes
    from resist_det.resist.plan import iter_plans, p2p_sends

    net = build_named_model("preact-resnet101")
    sizes, S = split_sizes(net), 4
    rep = plan_report(net, S, min_blocks=5, rounds=3)
    t = link_seconds(rep, 1e8)
    ring = 2 * (S - 1) / S * 4  # bytes each rank sends per element all-reduced
    assert t["local_sgd_round"] == pytest.approx(ring * sizes["total"] * 8 / 1e8)
    assert t["ddp_step"] == pytest.approx(ring * sizes["total_params"] * 8 / 1e8)
    plans = [p for _, p in zip(range(3), iter_plans(0, S, sizes["num_blocks"], 5))]
    busiest = [max(ring * sizes["shared"] + n * sizes["block"][0] * 4 for n in p2p_sends(a, b)) for a, b in zip(plans, plans[1:])]
    assert t["resist_round"] == pytest.approx(sum(busiest) / len(busiest) * 8 / 1e8)
    res = CliRunner().invoke(app, ["plan", "-S", "4", "--model", "preact-resnet101", "--rate", "100mbit", "--local-steps", "10", "--rounds", "1"])
    assert res.exit_code == 0 and f"{t['local_sgd_round']:.2f}" in res.output and f"{10 * t['ddp_step']:.2f}" in res.output
    bad = CliRunner().invoke(app, ["plan", "--rate", "fast"])
    assert bad.exit_code == 1 and "--rate" in bad.output


@needs_network
def test_a_cluster_run_killed_by_sigkill_is_swept_by_the_next_one(tmp_path):
    """``resist-det cluster`` SIGKILLed mid-run leaves its namespaces (and whatever still runs in
    them); the next ``resist-det cluster`` removes them (their owner is gone) and leaves a live
    run's alone."""
    from resist_det.cluster import EmulatedNetwork

    marker = f"sleeper-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / f"{marker}.py").write_text("import time\ntime.sleep(600)\n")  # its name marks the ranks
    (tmp_path / "ok.py").write_text("print('ok')\n")
    cli = [sys.executable, "-m", "resist_det.cli", "cluster"]
    victim = subprocess.Popen([*cli, str(tmp_path / f"{marker}.py"), "--nodes", "2", "--logs", str(tmp_path / "a")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with EmulatedNetwork(1, [1e9], tag="rdclive") as live:  # a live process's cluster: never swept
        assert wait_until(lambda: len(_running(marker)) >= 2, timeout=120), "the sleepers never started"
        victim.kill()
        victim.wait()
        # What SIGKILL leaves behind: the namespaces (the node launchers die with the CLI and take
        # their ranks along, but nothing removed the network)
        assert _left(victim.pid)
        out = subprocess.run([*cli, str(tmp_path / "ok.py"), "--nodes", "1", "--logs", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"removed emulated cluster {PREFIX}{victim.pid % 100000} left by a run that is gone (pid {victim.pid})" in out.stderr
        assert _left(victim.pid) == [] and wait_until(lambda: not _running(marker), timeout=10)
        assert leftovers(live.tag)  # the live one is still there
    assert leftovers("rdclive") == []


@needs_network
def test_a_failed_node_is_named_in_one_line(tmp_path):
    """A rank failing on node 1 only: the cluster run says which node failed and how, with the
    rank's own one-line report, and no launcher traceback."""
    script = tmp_path / "fails_on_node1.py"
    script.write_text("import os, sys\nif os.environ['GROUP_RANK'] == '1':\n    sys.exit(3)\n")
    out = subprocess.run([*CLI, "cluster", str(script), "--nodes", "2", "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "resist-det cluster: node 1 (10.201.0.2) failed, its launcher exit code 1: resist-det: rank 1 (local_rank: 0, pid" in text
    assert "failed: exit code 3" in text and "Traceback" not in text, text[-3000:]
