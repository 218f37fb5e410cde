#!/usr/bin/env python
"""Fault campaign: random SIGKILLs during short training runs, each followed by a restart.

    python benchmarks/fault_campaign.py [--tree 20] [--agent 5] [--rank 5] [--seed 0]
        [--record benchmarks/results/fault_campaign.txt]

A small Fashion-MNIST-shaped set (written here, IDX format) and a small pre-activation ResNet on
2 CPU ranks, ``resist-det train``.  First an uninterrupted run gives the reference global model.
Then, each in a fresh output folder:

* ``--tree N``: N SIGKILLs of the whole process tree (launcher, agent, ranks) at random moments,
  each followed by ``resist-det train --resume`` (a fresh start when no checkpoint is complete
  yet), until the run finishes;
* ``--agent N``: N SIGKILLs of torchrun's agent alone, under ``--max-restarts N``;
* ``--rank N``: N SIGKILLs of one rank alone, under ``--max-restarts N``;
* ``--lock-trials N`` (default 0): N times, 6 processes take over one stale run lock (left by a dead PID) at
  the same moment: exactly one may win each time.

Each campaign must end with a global model equal to the reference tensor for tensor; after every
kill no process of the run may outlive its launcher by more than 10 s, and the run's lock must
be free again once all of it has ended.  Not part of the test suite (it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from resist_det.data.idx import write_quadrant_idx
from resist_det.record import host_line, write_record

ORPHAN_SECONDS = 10


def recipe(data: Path, out: Path, epochs: int) -> dict:
    return {
        "deepspeed": {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                      "gradient_clipping": 0.0},
        "resist": {"mode": "resist", "local_steps": 3, "min_blocks": 2, "momentum": "keep"},
        "model": {"kind": "preact_resnet", "layers": [1, 1, 5, 1], "base_width": 4, "stem": "cifar"},
        "data": {"kind": "fashion_mnist", "root": str(data)},
        "train": {"epochs": epochs, "output_dir": str(out), "log_every": 2},
    }


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _lock_free(out: Path) -> bool:
    from resist_det.train.run_lock import RunLock

    try:
        RunLock(out).check()
    except ValueError:
        return False
    return True


def _start(path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "resist_det.cli", "train", str(path), "--nproc", "2", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_gone(pids: list[int]) -> float:
    """Seconds until every process in ``pids`` has ended (inf past ORPHAN_SECONDS)."""
    t = time.monotonic()
    while time.monotonic() - t < ORPHAN_SECONDS:
        if not any(_alive(p) for p in pids):
            return time.monotonic() - t
        time.sleep(0.05)
    return float("inf")


def _same_model(out: Path, reference: dict) -> bool:
    got = torch.load(out / "global_model.pt", weights_only=True)["model"]
    return got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)


def tree_campaign(path: Path, out: Path, kills: int, duration: float, rng: random.Random, say) -> tuple[bool, float, int]:
    """SIGKILL the whole tree ``kills`` times at random moments, resuming after each; returns
    (finished, slowest end of a killed process, kills made: fewer if the run finished first)."""
    worst, done = 0.0, 0
    while True:
        resume = (out / "checkpoints" / "latest").is_file()
        proc = _start(path, *(["--resume"] if resume else []))
        if done < kills:
            time.sleep(rng.uniform(2.0, duration / 3))
            if proc.poll() is None:
                tree = [proc.pid, *_descendants(proc.pid)]
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                gone = _wait_gone(tree)
                worst = max(worst, gone)
                done += 1
                say(f"  tree kill {done}/{kills}: {len(tree)} processes ended in {gone:.2f} s; lock free: {_lock_free(out)}")
                continue
        code = proc.wait()
        if code != 0:
            say(f"  a run ended with exit code {code}")
        return code == 0, worst, done


def one_process_campaign(path: Path, out: Path, kills: int, which: str, duration: float, rng: random.Random,
                         say) -> tuple[bool, float, int]:
    """SIGKILL the agent (``which == "agent"``) or rank 1 ``kills`` times under --max-restarts."""
    proc = _start(path, "--max-restarts", str(kills))
    worst, done = 0.0, 0
    for k in range(kills):
        time.sleep(rng.uniform(2.0, duration / 2))
        below = _descendants(proc.pid)
        agent = next((p for p in below if b"resist_det.train.agent" in Path(f"/proc/{p}/cmdline").read_bytes()), None) \
            if below else None
        if agent is None:
            continue
        ranks = _descendants(agent)
        victim = agent if which == "agent" else (ranks[-1] if ranks else None)
        if victim is None:
            continue
        os.kill(victim, signal.SIGKILL)
        done += 1
        if which == "agent":
            gone = _wait_gone(ranks)
            worst = max(worst, gone)
            say(f"  agent kill {k + 1}/{kills}: its {len(ranks)} ranks ended in {gone:.2f} s")
        else:
            say(f"  rank kill {k + 1}/{kills}: pid {victim}")
        time.sleep(3.0)  # the launcher notices and restarts from the newest complete checkpoint
    return proc.wait() == 0, worst, done


def _race(folder: str, barrier, results) -> None:
    from resist_det.train.run_lock import RunLock

    lock = RunLock(folder)
    barrier.wait()
    try:
        lock.acquire()
        won = True
    except ValueError:
        won = False
    barrier.wait()  # every contender has tried while the winner still holds the lock
    lock.release()
    results.put(won)


def lock_trials(tmp: Path, trials: int, say) -> bool:
    """``trials`` simultaneous takeovers of a stale lock by 6 processes: one winner each time?"""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    bad = 0
    for trial in range(trials):
        folder = tmp / "locks" / str(trial)
        folder.mkdir(parents=True)
        (folder / ".resist_det.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": "then"}))
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(folder), barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        wins = sum(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        bad += wins != 1
    say(f"lock: {trials} simultaneous takeovers of a stale lock by 6 processes; trials without exactly one winner: {bad}")
    return bad == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=int, default=20)
    ap.add_argument("--agent", type=int, default=5)
    ap.add_argument("--rank", type=int, default=5)
    ap.add_argument("--lock-trials", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    host, lines = host_line(), []
    print(host, flush=True)

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.lock_trials:
            checks.append((f"lock: one winner in each of {args.lock_trials} simultaneous takeovers",
                           lock_trials(tmp, args.lock_trials, say)))
        if not (args.tree or args.agent or args.rank):
            for what, ok in checks:
                say(f"{'PASS' if ok else 'FAIL'}  {what}")
            return _record(args, lines, checks, host)
        write_quadrant_idx(tmp / "data", n_train=768, n_test=64)
        ref_path = tmp / "reference.json"
        ref_path.write_text(json.dumps(recipe(tmp / "data", tmp / "reference", args.epochs)))
        t = time.monotonic()
        if _start(ref_path).wait() != 0:
            say("the uninterrupted reference run failed")
            return 1
        duration = time.monotonic() - t
        reference = torch.load(tmp / "reference" / "global_model.pt", weights_only=True)["model"]
        say(f"reference: {args.epochs} epochs uninterrupted in {duration:.1f} s")
        for name, kills in (("tree", args.tree), ("agent", args.agent), ("rank", args.rank)):
            if kills == 0:
                continue
            out = tmp / name
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(recipe(tmp / "data", out, args.epochs)))
            say(f"== {kills} SIGKILLs of the {'whole tree' if name == 'tree' else name}")
            t = time.monotonic()
            if name == "tree":
                finished, worst, done = tree_campaign(path, out, kills, duration, rng, say)
            else:
                finished, worst, done = one_process_campaign(path, out, kills, name, duration, rng, say)
            equal = finished and _same_model(out, reference)
            say(f"{name}: {done} kills, finished {finished}, global model equal to the reference: {equal}, "
                f"slowest end of a killed process {worst:.2f} s, lock free at the end: {_lock_free(out)}, "
                f"{time.monotonic() - t:.0f} s")
            checks.append((f"{name}: {done} of {kills} kills made, equal global model, every killed process ended "
                           f"within {ORPHAN_SECONDS} s, lock free", done == kills and equal and worst <= ORPHAN_SECONDS
                           and _lock_free(out)))
    for what, ok in checks:
        say(f"{'PASS' if ok else 'FAIL'}  {what}")
    return _record(args, lines, checks, host)


def _record(args: argparse.Namespace, lines: list[str], checks: list[tuple[str, bool]], host: str) -> int:
    if args.record:
        write_record(args.record, lines, host=host)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
