"""A lost rank turns into an error within the recipe's communication timeout, not a hang."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import run_on_ranks
from helpers import fmnist_recipe, kill_when_stopped, logged_a_step, process_state, train_rank, wait_until, write_idx


def _rank_pid(marker: str, rank: int) -> int | None:
    """The training process of ``rank`` whose command line holds ``marker``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "resist_det.train" in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_frozen_rank_fails_the_run_within_the_timeout(tmp_path):
    write_idx(tmp_path / "fmnist", n_train=512)
    recipe = fmnist_recipe(tmp_path, "run")
    recipe["resist"]["local_steps"] = 4
    recipe["train"].update(epochs=50, comm_timeout_minutes=0.1)  # 6 s
    path = tmp_path / "frozen_recipe.json"
    path.write_text(json.dumps(recipe))
    cmd = [sys.executable, "-m", "resist_det.cli", "train", str(path), "--nproc", "2", "--no-progress"]
    log = tmp_path / "output.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    running = lambda: proc.poll() is None  # noqa: E731
    stopped = None
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        stopped = wait_until(lambda: logged_a_step(metrics) and _rank_pid(str(path), 1), 180, running, poll=0.5)
        assert stopped, "training did not start"
        os.kill(stopped, signal.SIGSTOP)  # frozen, as a partitioned or hung machine: no connection closes
        t0 = time.monotonic()
        wait_until(lambda: "timed out" in log.read_text(), 120, running, poll=0.2)
        detected = time.monotonic() - t0
        # A frozen machine's processes are not the launcher's to wait for (on another machine they
        # are gone); here they would hold torchrun's 30 s teardown grace, so they end now.
        os.kill(stopped, signal.SIGKILL)
        proc.wait(timeout=120)
        out = log.read_text()
        assert proc.returncode != 0
        # the survivor says it in one line, and the launcher names the rank that ended
        assert "error: rank 0: communication with the other ranks timed out" in out and "Traceback" not in out, out[-3000:]
        assert f"resist-det: rank 1 (local_rank: 1, pid {stopped}) failed: killed by SIGKILL" in out, out[-3000:]
        assert detected < 6 + 20, detected  # the timeout plus the time to report it; not 30 minutes
    finally:
        if stopped:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_lost_peer_errors_and_exit_codes_are_named():
    """What a rank and the launcher print for the failures above, from the messages gloo raises."""
    from resist_det.train.agent import describe_exit
    from resist_det.train.failures import lost_peer

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/{}] {}"
    assert lost_peer(RuntimeError(gloo.format("unbound_buffer.cc:78", "Timed out waiting 6000ms for recv operation"))) == \
        "communication with the other ranks timed out (Timed out waiting 6000ms for recv operation)"
    assert lost_peer(RuntimeError(gloo.format("pair.cc:534", "Connection closed by peer [10.0.0.2]:4711"))) == \
        "communication with the other ranks lost its connection (Connection closed by peer [10.0.0.2]:4711)"
    assert lost_peer(RuntimeError("DataLoader timed out after 5 seconds")) is None  # not communication
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert [describe_exit(c) for c in (-9, -15, 2, 1)] == ["killed by SIGKILL", "killed by SIGTERM", "exit code 2", "exit code 1"]


# Loaded by every Python process of the run through PYTHONPATH: rank 1 alone fails, as with
# something only it can see (its shard of the data, its machine's disk).
_FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import resist_det.train.loop as loop

    def setup(recipe):
        raise ValueError("data.root: what only rank 1 met")

    loop.setup = setup
"""


def test_an_error_only_another_rank_met_is_reported_once(tmp_path):
    """Rank 0 prints the errors every rank meets; one that only rank 1 met reaches the user
    through torchrun's per-rank error file, in the launcher's line for rank 1, once."""
    write_idx(tmp_path / "fmnist", n_train=32, n_test=8)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(fmnist_recipe(tmp_path, "run")))
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_FAIL_ON_RANK_1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), *sys.path])}
    cmd = [sys.executable, "-m", "resist_det.cli", "train", str(path), "--nproc", "2", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert text.count("what only rank 1 met") == 1, text[-3000:]
    assert re.search(r"resist-det: rank 1 \(local_rank: 1, pid \d+\) failed: exit code 2: data.root: what only rank 1 met", text)


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from resist_det.train.run_lock import RunLock

    with RunLock(tmp_path) as lock:
        assert lock.path.is_file()
        with pytest.raises(ValueError, match=rf"train.output_dir {tmp_path} is in use by another run \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".resist_det.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".resist_det.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": "then"}))
    with RunLock(tmp_path):  # its holder died: taken over
        assert json.loads((tmp_path / ".resist_det.lock").read_text())["pid"] == os.getpid()
    # A holder killed with SIGKILL releases the lock at once (the kernel's flock): taken at the next try.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resist_det.train.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid}"):
        RunLock(tmp_path).check()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        pass


RACE_TRIALS = 40  # benchmarks/fault_campaign.py --lock-trials 1000 runs the same race, recorded


def test_simultaneous_takeovers_of_a_stale_lock_have_exactly_one_winner(tmp_path):
    """6 processes take over a lock left by a dead PID at the same moment: exactly one wins, every time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from fault_campaign import lock_trials
    finally:
        sys.path.pop(0)
    said = []
    assert lock_trials(tmp_path, RACE_TRIALS, said.append), said
    assert said == [f"lock: {RACE_TRIALS} simultaneous takeovers of a stale lock by 6 processes; trials without exactly one winner: 0"]


# Loaded by every Python process of the run through PYTHONPATH; only rank 1 acts on it, and only
# once at each point (a PID file marks the point as done, for the test to SIGKILL that PID):
# - once the first checkpoint is complete, at its next sync, after the shared layers are averaged
#   and before the blocks are routed (FAULT_PID_FILE);
# - after that, halfway through writing its own file of epoch 2's checkpoint (FAULT_SAVE_PID_FILE).
_STOP_IN_SYNC_AND_SAVE = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("FAULT_PID_FILE"):
    import io
    import signal
    from pathlib import Path

    import torch

    import resist_det.resist.checkpoint as checkpoint
    import resist_det.resist.strategies as strategies

    def stop_here(pid_file):
        pid_file.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)

    real_route, real_save = strategies.route_blocks, checkpoint.atomic_torch_save
    in_sync, in_save = Path(os.environ["FAULT_PID_FILE"]), Path(os.environ["FAULT_SAVE_PID_FILE"])

    def route_blocks(*args, **kwargs):
        if Path(os.environ["FAULT_AFTER"]).is_file() and not in_sync.exists():
            stop_here(in_sync)
        return real_route(*args, **kwargs)

    def atomic_torch_save(obj, path):
        if in_sync.exists() and not in_save.exists() and "epoch0001" in str(path):
            buf = io.BytesIO()
            torch.save(obj, buf)
            with open(path.with_name(f".{path.name}.killed.tmp"), "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            stop_here(in_save)
        return real_save(obj, path)

    strategies.route_blocks, checkpoint.atomic_torch_save = route_blocks, atomic_torch_save
"""


def test_a_killed_rank_is_restarted_from_the_newest_complete_checkpoint(tmp_path):
    """Rank 1 SIGKILLed three times (by PID, from the test) under --max-restarts 3: after the first
    checkpoint, inside a sync, between the shared-layer average and the block routing; after that
    restart, halfway through writing its file of the second checkpoint; after the next restart
    and the second checkpoint, at a moment of the round.  Each time the launcher reports the
    failed rank and starts again, the ranks resume from the newest complete checkpoint (--resume
    auto; the half-saved one is passed over), and the final weights equal an uninterrupted run's."""
    import torch

    write_idx(tmp_path / "fmnist", n_train=128)
    paths = {}
    for name in ("clean", "killed"):
        recipe = fmnist_recipe(tmp_path, name)
        recipe["train"]["epochs"] = 3
        paths[name] = tmp_path / f"{name}fmnist_recipe.json"
        paths[name].write_text(json.dumps(recipe))
    run_on_ranks(train_rank, 2, tmp_path / "ranks", json.loads(paths["clean"].read_text()), False, timeout=300)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    pid_file, save_pid_file = tmp_path / "stopped_in_sync.pid", tmp_path / "stopped_in_save.pid"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_STOP_IN_SYNC_AND_SAVE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), *sys.path]),
           "FAULT_PID_FILE": str(pid_file), "FAULT_SAVE_PID_FILE": str(save_pid_file), "FAULT_AFTER": str(latest)}
    cmd = [sys.executable, "-m", "resist_det.cli", "train", "--nproc", "2", "--no-progress", "--max-restarts", "3",
           str(paths["killed"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)

    running = lambda: proc.poll() is None  # noqa: E731
    try:
        # mid-sync, between the shared-layer average and the block routing
        assert kill_when_stopped(pid_file, 180, running), "rank 1 never stopped inside a sync after epoch 1"
        # mid-save: its own file of epoch 2's checkpoint half written
        assert kill_when_stopped(save_pid_file, 180, running), "rank 1 never stopped inside its save of epoch 2"
        assert latest.read_text().strip() == "epoch0000"  # the interrupted checkpoint was not marked latest
        assert wait_until(lambda: latest.is_file() and latest.read_text().strip() == "epoch0001", 180, running), \
            "training did not reach epoch 2 after the restart"
        victim = wait_until(lambda: _rank_pid(str(paths["killed"]), 1), 180, running)
        assert victim, "rank 1 of the restarted run did not start"
        os.kill(victim, signal.SIGKILL)  # mid-round
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert all(f"restart {n} of 3" in out for n in (1, 2, 3)), out[-3000:]
    assert out.count("local_rank: 1") >= 3, out[-3000:]  # the failed rank is named, each time
    a = torch.load(tmp_path / "clean" / "global_model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "global_model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert epochs == [0, 1, 2]  # each epoch cut short is logged once, after its restart
    assert not list((tmp_path / "killed" / "checkpoints").rglob("*.tmp"))  # the half-written file went with its re-save


def _start_training(tmp_path, out, epochs):
    """``resist-det train`` on 2 ranks of the Fashion-MNIST test recipe into ``tmp_path / out``, in
    its own session (as a terminal's job); returns (the CLI process, the recipe file)."""
    recipe = fmnist_recipe(tmp_path, out)
    recipe["train"]["epochs"] = epochs
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    cli = subprocess.Popen([sys.executable, "-m", "resist_det.cli", "train", str(path), "--nproc", "2", "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return cli, path


def _gone(pid: int) -> bool:
    return process_state(pid) in ("Z", "X")


#: How long after its launcher a rank may live: the kernel signals it at once (PR_SET_PDEATHSIG);
#: the agent, signalled with SIGTERM, gives its ranks torchrun's grace period before SIGKILL.
ORPHAN_SECONDS = 10


def test_two_runs_started_together_and_sigterm_to_one_stops_all_of_it(tmp_path):
    """Two CLI runs started at the same moment with separate output folders both train: no port
    or file collision.  SIGTERM to one CLI (what a scheduler sends, to the CLI only) stops its
    launcher and every one of its ranks; the other run finishes."""
    write_idx(tmp_path / "fmnist", n_train=48, n_test=16)
    cmds, paths = [], []
    for out, epochs in (("a", 1), ("b", 1000)):  # b trains until it is stopped
        recipe = fmnist_recipe(tmp_path, out)
        recipe["train"]["epochs"] = epochs
        paths.append(tmp_path / f"recipe_{out}.json")
        paths[-1].write_text(json.dumps(recipe))
        cmds.append([sys.executable, "-m", "resist_det.cli", "train", str(paths[-1]), "--nproc", "2", "--no-progress"])
    a, b = (subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for c in cmds)
    try:
        wait_until(lambda: logged_a_step(tmp_path / "b" / "metrics.jsonl"), 180, lambda: b.poll() is None, poll=0.5)
        ranks = [_rank_pid(str(paths[1]), r) for r in (0, 1)]
        assert all(ranks), "run b did not start training: " + (b.stdout.read() if b.poll() is not None else "")
        os.kill(b.pid, signal.SIGTERM)
        b_out = b.communicate(timeout=60)[0]
        assert b.returncode == 143 and "Traceback" not in b_out, b_out[-3000:]  # the shell's code for SIGTERM, no traceback
        assert wait_until(lambda: all(_gone(p) for p in ranks), ORPHAN_SECONDS), f"ranks {ranks} outlived their launcher"
        assert _rank_pid(str(paths[1]), 0) is None and _rank_pid(str(paths[1]), 1) is None
        out = a.communicate(timeout=300)[0]
        assert a.returncode == 0, out[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    epochs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["event"] == "epoch"] == [0]
    assert not (tmp_path / "a" / ".resist_det.lock").exists()  # released at the end


def test_ctrl_c_stops_the_run_with_130_and_no_traceback(tmp_path):
    """Ctrl-C at a terminal (SIGINT to the whole foreground process group) stops the launcher and
    every rank; the CLI exits 130, the shell's code for SIGINT, with no traceback."""
    write_idx(tmp_path / "fmnist", n_train=48, n_test=16)
    run, path = _start_training(tmp_path, "run", epochs=1000)
    try:
        wait_until(lambda: logged_a_step(tmp_path / "run" / "metrics.jsonl"), 180, lambda: run.poll() is None, poll=0.5)
        ranks = [_rank_pid(str(path), r) for r in (0, 1)]
        assert all(ranks), "the run did not start training: " + (run.stdout.read() if run.poll() is not None else "")
        os.killpg(run.pid, signal.SIGINT)
        out = run.communicate(timeout=60)[0]
        assert run.returncode == 130 and "Traceback" not in out, out[-3000:]
        assert wait_until(lambda: all(_gone(p) for p in ranks), ORPHAN_SECONDS)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert not (tmp_path / "run" / ".resist_det.lock").exists()


def test_a_folder_in_use_is_refused_before_any_rank_starts(tmp_path):
    """A live holder of the run lock (this test's own process) makes ``resist-det train`` refuse
    at once, naming the folder and the holder, and leaves the lock alone."""
    from typer.testing import CliRunner

    from resist_det.cli import app

    from resist_det.train.run_lock import RunLock

    out = tmp_path / "run"
    lock = out / ".resist_det.lock"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(fmnist_recipe(tmp_path, "run")))  # its data does not exist: refused before that check
    with RunLock(out):  # a live run holds the folder
        res = CliRunner().invoke(app, ["train", str(recipe), "--nproc", "2"])
        assert res.exit_code != 0
        assert f"train.output_dir {out} is in use by another run (pid {os.getpid()}" in res.output, res.output
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("victim", ["agent", "cli"])
def test_no_rank_outlives_a_killed_launcher(tmp_path, victim):
    """SIGKILL to torchrun's agent (the OOM killer's way) or to the resist-det launcher: every
    process below it ends within ORPHAN_SECONDS and the run's lock is free again."""
    from resist_det.train.run_lock import RunLock

    write_idx(tmp_path / "fmnist", n_train=48, n_test=16)
    recipe = fmnist_recipe(tmp_path, "run")
    recipe["train"]["epochs"] = 1000  # trains until stopped
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    cli = subprocess.Popen([sys.executable, "-m", "resist_det.cli", "train", str(path), "--nproc", "2", "--no-progress"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: logged_a_step(tmp_path / "run" / "metrics.jsonl"), 180, lambda: cli.poll() is None, poll=0.5)
        agents = [p for p in _children(cli.pid) if b"resist_det.train.agent" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(agents) == 1
        ranks = [_rank_pid(str(path), r) for r in (0, 1)]
        assert all(ranks)
        os.kill(agents[0] if victim == "agent" else cli.pid, signal.SIGKILL)
        assert wait_until(lambda: all(_gone(p) for p in [*ranks, agents[0]]), ORPHAN_SECONDS), \
            [(p, process_state(p)) for p in [*ranks, agents[0]]]
        def lock_free() -> bool:
            try:
                RunLock(tmp_path / "run").check()
            except ValueError:
                return False
            return True

        assert wait_until(lock_free, ORPHAN_SECONDS)  # a new run may take the folder
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """The output folder fills up after the first checkpoint: the run stops, saying where there is
    no space left; the complete checkpoint stays intact and ``latest`` unmoved."""
    from resist_det.resist.checkpoint import verify_files

    write_idx(tmp_path / "fmnist", n_train=48, n_test=16)
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(out)], check=True)
    try:
        cli, path = _start_training(tmp_path, "small/run", epochs=50)
        latest = out / "run" / "checkpoints" / "latest"
        assert wait_until(latest.is_file, 180, lambda: cli.poll() is None, poll=0.05)
        with (out / "filler").open("wb") as f:  # fill what is left
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        text = cli.communicate(timeout=180)[0]
        assert cli.returncode != 0 and f"train.output_dir {out / 'run'}: no space left on device" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        tag = latest.read_text().strip()
        verify_files(out / "run" / "checkpoints", tag)  # the last complete checkpoint is whole
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
