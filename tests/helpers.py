"""Small networks, configs and training steps shared by the engine tests."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

LAYERS = [1, 1, 7, 1]  # 6 partitionable blocks in section 3
WIDTH = 4


def preact_net(seed=0, device=None, layers=LAYERS, num_classes=3):
    """A tiny pre-activation ResNet (this project's blocks)."""
    from resist_det.models import preact_resnet

    return preact_resnet(layers=layers, num_classes=num_classes, stem="cifar", base_width=WIDTH, seed=seed, device=device)


def stock_net(seed=0, layers=(1, 1, 4, 1), num_classes=3, block="basic", **kwargs):
    """An unmodified torchvision ResNet (stock blocks), seeded by torch's global generator."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(seed)
    return ResNet(BasicBlock if block == "basic" else Bottleneck, list(layers), num_classes=num_classes, **kwargs)


def ds_config(lr=0.1, sgd_momentum=0.0, batch=4, **resist):
    """A DeepSpeed config with a ``resist`` section (DeepSpeed's default clipping turned off)."""
    return {
        "train_micro_batch_size_per_gpu": batch,
        "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": sgd_momentum}},
        "gradient_clipping": 0.0,
        "resist": resist,
    }


def batch(gen, size=8, n=4, classes=3):
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def train_steps(engine, steps, gen, size=8):
    """``steps`` optimizer steps of cross-entropy on random batches drawn from ``gen``."""
    for _ in range(steps):
        x, y = batch(gen, size)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()


def block_snapshot(engine):
    """Partitioned block index -> its tensors (sync order), flattened; every section's slots, empty ones skipped."""
    from resist_det.resist.sync import block_tensors

    s = engine.strategy
    return {b: torch.cat([t.flatten() for t in block_tensors(m)]).clone() for b, m in zip(s.slot_blocks, s.slots) if b is not None}


def shared_snapshot(engine):
    """The floating-point tensors every rank holds (all but the slots)."""
    return {n: t.clone() for n, t in engine.module.state_dict().items() if ".slots." not in n and t.is_floating_point()}


def shared_digest(engine):
    """SHA-256 of each tensor of :func:`shared_snapshot`: equal digests on every rank mean
    identical tensors, without pickling a large network back from each rank."""
    import hashlib

    return {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in shared_snapshot(engine).items()}


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` in /proc (``T``: stopped); ``Z`` once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_until(found: Callable[[], Any], timeout: float, keep_waiting: Callable[[], bool] = lambda: True,
               poll: float = 0.1) -> Any:
    """Poll ``found()`` until it returns something true, and return that; None once ``timeout``
    seconds pass or ``keep_waiting()`` turns false (the process watched has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and keep_waiting():
        if value := found():
            return value
        time.sleep(poll)
    return None


def logged_a_step(metrics: Path) -> bool:
    """Whether a run's ``metrics.jsonl`` holds a training-step record yet (training has started)."""
    return metrics.is_file() and '"step"' in metrics.read_text()


def kill_when_stopped(pid_file: Path, timeout: float, keep_waiting: Callable[[], bool] = lambda: True) -> int | None:
    """Wait until ``pid_file`` names a process that has stopped itself (SIGSTOP at the moment a
    fault test wants), SIGKILL it and return its PID: a crash at exactly that point.  None if
    that does not happen within ``timeout`` seconds or while ``keep_waiting()`` holds."""
    def stopped() -> int | None:
        text = pid_file.read_text().strip() if pid_file.is_file() else ""
        return int(text) if text and process_state(int(text)) == "T" else None

    pid = wait_until(stopped, timeout, keep_waiting, poll=0.05)
    if pid:
        os.kill(pid, signal.SIGKILL)
    return pid


def write_idx(folder, n_train=64, n_test=32, seed=0):
    """A tiny Fashion-MNIST in its IDX form: the label is the brightest quadrant of a noisy image."""
    from resist_det.data.idx import write_quadrant_idx

    return write_quadrant_idx(folder, n_train, n_test, seed)


def fmnist_recipe(tmp_path, out="run", **resist):
    """A small Fashion-MNIST ResIST recipe training into ``tmp_path / out`` (data at ``tmp_path / fmnist``)."""
    return {
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 8,
            "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
            "gradient_clipping": 0.0,
        },
        "resist": {"mode": "resist", "local_steps": 3, "min_blocks": 2, "momentum": "keep", **resist},
        "model": {"kind": "preact_resnet", "layers": [1, 1, 5, 1], "base_width": 4, "stem": "cifar"},
        "data": {"kind": "fashion_mnist", "root": str(tmp_path / "fmnist")},
        "train": {"epochs": 3, "output_dir": str(tmp_path / out), "log_every": 2},
    }


def train_rank(rank, world, recipe, resume):
    """The training loop on one rank (for ``run_on_ranks``)."""
    from resist_det.config import load_recipe
    from resist_det.train.loop import train

    return train(load_recipe(recipe), resume=resume, progress=False)


def final_model(tmp_path, out):
    """The saved global model of run ``out`` and the rounds logged at each epoch."""
    saved = torch.load(tmp_path / out / "global_model.pt", weights_only=True)
    rounds = [r["round"] for r in map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
    return saved, rounds
