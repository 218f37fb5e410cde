"""Start the ranks of a training run on this machine, after checking everything that can fail.

``resist-det train RECIPE --nproc N`` validates the recipe, the dataset folder and (for
``--resume``) the checkpoint first, then runs torchrun's agent (:mod:`.agent`) with N processes
of ``python -m resist_det.train``.  Inside a launcher (``RANK`` set) it runs in-process.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import Recipe, load_recipe
from .lifetime import die_with_parent
from .preflight import check_data, preflight
from .rundir import RunDir, check_same_recipe, finished_message

__all__ = ["check_resume", "launch", "recipe_path"]

#: The recipes shipped inside the package (``resist_det/recipes``), found as package data.
PACKAGE_RECIPES = Path(str(importlib.resources.files("resist_det") / "recipes"))


def recipe_path(name: str | Path) -> Path:
    """A recipe file: a path, or the name of a recipe shipped with the package (``demo_shapes``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = PACKAGE_RECIPES / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(x.stem for x in PACKAGE_RECIPES.glob("*.json")))
    raise FileNotFoundError(f"recipe not found: {name} (shipped recipes: {names})")


def check_resume(recipe: Recipe, world_size: int) -> str:
    """The tag to resume from; refuses a missing checkpoint, another world size or recipe."""
    from ..resist.checkpoint import check_checkpoint, check_plain_tensors, resume_tag, verify_files

    ckpt = RunDir.of(recipe).checkpoints
    try:
        tag, note = resume_tag(ckpt)
        if note:
            print(f"--resume: {note}", file=sys.stderr)
        check_checkpoint(ckpt, tag, world_size, recipe.resist)
        verify_files(ckpt, tag)
        check_plain_tensors(ckpt / tag)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--resume: {e}") from None
    check_same_recipe(recipe)
    return tag


def launch(recipe_file: str | Path, *, nproc: int = 1, resume: bool = False, overrides: dict[str, Any] | None = None,
           progress: bool = True, max_restarts: int = 0) -> int:
    """Validate, then train on ``nproc`` local ranks; returns the exit code."""
    recipe = load_recipe(recipe_path(recipe_file), overrides)
    inside = "RANK" in os.environ
    if inside:
        check_data(recipe)  # every rank checks its data when it builds it
    else:
        from .run_lock import RunLock

        RunLock(recipe.train.output_dir).check()  # a folder in use: refused before any rank starts
        skipped = preflight(recipe)  # once, before any rank starts
        if skipped:
            print(f"data.skip_bad: leaving out {len(skipped)} images:\n  " + "\n  ".join(skipped), file=sys.stderr, flush=True)
    if resume:
        tag = check_resume(recipe, int(os.environ.get("WORLD_SIZE", nproc)) if inside else nproc)
        done = re.fullmatch(r"epoch(\d+)", tag)
        if resume is True and done and int(done.group(1)) + 1 >= recipe.train.epochs and not inside:
            print(finished_message(recipe), file=sys.stderr, flush=True)
            return 0
    if inside or (nproc == 1 and not max_restarts):
        from .loop import train

        train(recipe, resume=resume, progress=progress)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    for attempt in range(max_restarts + 1):
        # A fresh launcher (new rendezvous store) per attempt: a restarted attempt continues from
        # the newest complete checkpoint of this run (--resume auto).  --standalone: the launcher
        # binds its store to a port the OS hands it, and the ranks share that store.  A port picked
        # here and passed on could be taken before the launcher binds it (another run's pick, or
        # an outgoing connection's ephemeral port): two runs started together then collided.
        # --local-addr: the ranks reach that store on loopback, not at this host's name.
        cmd = [sys.executable, "-m", "resist_det.train.agent", "--standalone", "--local-addr", "127.0.0.1",
               "--nproc_per_node", str(nproc),
               "-m", "resist_det.train", str(recipe_path(recipe_file))]
        for k, v in (overrides or {}).items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        if resume:
            cmd.append("--resume")
        elif attempt > 0:
            cmd += ["--resume", "auto"]
        if not progress:
            cmd.append("--no-progress")
        code, signalled = _run_forwarding_signals(cmd, env)
        if code == 0 or signalled or attempt == max_restarts:
            return code
        print(f"resist-det: training failed (exit code {code}); restart {attempt + 1} of {max_restarts}, from the "
              "newest complete checkpoint", file=sys.stderr, flush=True)
    return code


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run the launcher and wait for it; SIGTERM / SIGINT / SIGHUP to this process go to the
    launcher once (it stops its ranks), and this process waits for it: no orphans.  The launcher
    has its own session, so a terminal's Ctrl-C reaches it through here only, once.
    Returns (exit code, whether a signal stopped it); stopped by a signal, the exit code is the
    shell's 128 + its number (143 for SIGTERM, 130 for Ctrl-C)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    signalled = []

    def forward(signum, _frame):
        signalled.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = proc.wait()
        return (128 + signalled[0] if signalled else code), bool(signalled)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
