"""The training loop, resume, the CLI's checks and the evaluation of saved global networks."""

import hashlib
import json
import os
import signal
import threading

import pytest
import torch
from typer.testing import CliRunner

from distributed import run_on_ranks
from helpers import final_model, fmnist_recipe, kill_when_stopped, train_rank, write_idx as _write_idx
from resist_det.cli import app


def _train_rank_killed_in_save(rank, world, recipe, victim, target):
    """``train_rank``, but rank ``victim`` stops (SIGSTOP) halfway through writing its epoch-2
    checkpoint file, its PID in ``victim.pid`` beside the output folder, for the test to SIGKILL:
    its own state (``resist_rank``, written to a temporary file and renamed) or DeepSpeed's model
    file (``mp_rank``, written in place)."""
    import io
    from pathlib import Path

    import resist_det.resist.checkpoint as ckpt_module

    def half_then_die(obj, path):
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        pid_file = Path(recipe["train"]["output_dir"]).parent / "victim.pid"
        pid_file.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # the test SIGKILLs this PID

    real_save, real_atomic = torch.save, ckpt_module.atomic_torch_save
    if rank == victim and target == "resist_rank":
        def atomic(obj, path):
            if "epoch0001" not in str(path):
                return real_atomic(obj, path)
            half_then_die(obj, path.with_name(f".{path.name}.killed.tmp"))
        ckpt_module.atomic_torch_save = atomic
    if rank == victim and target == "mp_rank":
        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and "epoch0001" in str(f) and "mp_rank" in str(f):
                half_then_die(obj, f)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    return train_rank(rank, world, recipe, False)


@pytest.mark.parametrize("compression,victim,target", [(None, 1, "resist_rank"), ({"topk": 0.25, "bits": 8}, 0, "mp_rank")],
                         ids=["fp32-rank1-own-file", "topk-8bit-rank0-deepspeed-file"])
def test_resume_after_a_rank_killed_mid_save_equals_uninterrupted(tmp_path, compression, victim, target):
    """A rank is SIGKILLed halfway through writing epoch 2's checkpoint (its own file, or rank
    0's DeepSpeed file): the other rank fails within the communication timeout, --resume passes
    over the incomplete checkpoint, continues from epoch 1's, and ends bit-identical to an
    uninterrupted run.  Also with top-k transport, whose baselines and residuals are resumed."""
    _write_idx(tmp_path / "fmnist")
    extra = {"compression": compression} if compression else {}
    full = fmnist_recipe(tmp_path, "full", **extra)
    full["train"]["epochs"] = 2
    [summary, _] = run_on_ranks(train_rank, 2, tmp_path / "a", full, False, timeout=300)
    assert summary["main_metric"] == "accuracy" and summary["epoch"] == 1
    part = fmnist_recipe(tmp_path, "part", **extra)
    part["train"].update(epochs=2, comm_timeout_minutes=0.1)  # the survivor gives up after 6 s
    killed = []  # SIGKILL by PID, from the test, while the file is half written
    killer = threading.Thread(target=lambda: killed.append(kill_when_stopped(tmp_path / "victim.pid", 240)), daemon=True)
    killer.start()
    with pytest.raises(AssertionError, match="failed on 1 of 2 ranks"):  # the survivor failed; a hang is a TimeoutError
        run_on_ranks(_train_rank_killed_in_save, 2, tmp_path / "b", part, victim, target, timeout=120)
    killer.join(timeout=5)
    assert killed and killed[0], "the victim never stopped inside its save"
    ckpt = tmp_path / "part" / "checkpoints"
    assert not (ckpt / "epoch0001" / "resist.json").exists()  # no manifest: the checkpoint is incomplete
    part["train"]["comm_timeout_minutes"] = 15.0  # a resumable key
    from resist_det.resist.checkpoint import resume_tag

    assert (ckpt / "latest").read_text().strip() == "epoch0000"  # written after the manifest only
    assert resume_tag(ckpt)[0] == "epoch0000"
    run_on_ranks(train_rank, 2, tmp_path / "c", part, True, timeout=300)
    a, rounds_a = final_model(tmp_path, "full")
    b, rounds_b = final_model(tmp_path, "part")
    assert rounds_a == rounds_b and len(rounds_a) == 2  # the same plan sequence; epoch 2 logged once
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # the same weights, bit for bit
    # Every rank's own state was checkpointed next to DeepSpeed's files, with a manifest.
    assert (ckpt / "latest").read_text().strip() == "epoch0001"
    assert not list(ckpt.rglob("*.tmp"))  # the killed rank's half-written file went when its tag was saved again
    assert sorted(p.name for p in (ckpt / "epoch0001").glob("resist_rank*.pt")) == ["resist_rank00.pt", "resist_rank01.pt"]
    record = json.loads((ckpt / "epoch0001" / "resist.json").read_text())
    assert record["world_size"] == 2 and {"resist_rank00.pt", "resist_rank01.pt"} <= set(record["files"])
    # Rank 0's sub-network and optimizer live in DeepSpeed's file only: nothing is stored twice.
    rank0, rank1 = (torch.load(ckpt / "epoch0001" / f"resist_rank0{r}.pt", weights_only=True) for r in (0, 1))
    assert "module" not in rank0 and "optimizer" not in rank0 and "module" in rank1 and "optimizer" in rank1


def test_a_diverged_run_stops_with_a_clear_error_and_saves_nothing_of_that_epoch(tmp_path):
    """A learning rate that blows the loss up: the epoch ends in an error naming the key to change,
    on every rank, instead of training on and checkpointing NaN weights."""
    _write_idx(tmp_path / "fmnist", n_train=64, n_test=16)
    recipe = fmnist_recipe(tmp_path, "diverged")
    recipe["deepspeed"]["optimizer"]["params"]["lr"] = 1e12
    recipe["train"]["epochs"] = 2
    with pytest.raises(AssertionError, match="failed on 2 of 2 ranks") as err:
        run_on_ranks(train_rank, 2, tmp_path / "ranks", recipe, False, timeout=120)
    message = str(err.value)
    assert message.count("the run diverged") == 2 and "deepspeed.optimizer.params.lr" in message, message[-2000:]
    assert "the training loss is nan in epoch 1" in message or "the training loss is inf in epoch 1" in message
    out = tmp_path / "diverged"
    assert not (out / "global_model.pt").exists() and not (out / "checkpoints" / "latest").exists()
    assert not any(json.loads(line)["event"] == "epoch" for line in (out / "metrics.jsonl").read_text().splitlines())


def test_reports_are_standard_json(tmp_path):
    """NaN and infinities (an AP of a class without objects, a diverged loss) are written as null:
    every parser reads the files, not only Python's."""
    from resist_det.io import atomic_write_json
    from resist_det.train.metrics import MetricsLog

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    record = {"map_07": float("nan"), "per_class": {"cat": {"ap_07": float("-inf")}}, "loss": [1.5, float("inf")]}
    atomic_write_json(tmp_path / "report.json", record)
    assert strict((tmp_path / "report.json").read_text()) == {"map_07": None, "per_class": {"cat": {"ap_07": None}},
                                                              "loss": [1.5, None]}
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write(event="epoch", epoch=0, map_07=float("nan"))
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(line)["map_07"] is None


def test_training_alone_in_process_leaves_no_world_behind(tmp_path, monkeypatch):
    """``resist-det train --nproc 1`` trains in this process (a world of one): afterwards no
    process group and no RANK/WORLD_SIZE remain, so a later launch here is not taken for a rank
    started by a launcher (it would train a world of one whatever --nproc says)."""
    import torch.distributed as dist

    from resist_det.train.world import WORLD_OF_ONE_ENV

    for key in WORLD_OF_ONE_ENV:
        monkeypatch.delenv(key, raising=False)
    _write_idx(tmp_path / "fmnist", n_train=32, n_test=8)
    recipe = fmnist_recipe(tmp_path, "alone")
    recipe["train"]["epochs"] = 1
    for out in ("alone", "again"):  # the second run here must not meet groups of the first's world
        recipe["train"]["output_dir"] = str(tmp_path / out)
        (tmp_path / "recipe.json").write_text(json.dumps(recipe))
        result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.json"), "--nproc", "1", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "epoch 1/1  train_loss" in result.output  # --no-progress drops the bar, not the epoch line
        assert (tmp_path / out / "global_model.pt").is_file()
        assert not dist.is_initialized() and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_cli_eval_of_a_trained_classifier(tmp_path):
    _write_idx(tmp_path / "fmnist")
    recipe = fmnist_recipe(tmp_path, "one", mode="local_sgd")
    recipe["train"]["epochs"] = 1
    run_on_ranks(train_rank, 1, tmp_path / "a", recipe, False, timeout=300)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "one" / "eval_report.json").read_text())
    saved = torch.load(tmp_path / "one" / "global_model.pt", weights_only=True)
    assert report["metrics"]["accuracy"] == saved["metrics"]["accuracy"]  # same network, same test set
    assert report["metrics"]["num_test"] == 32
    # export: a plain state_dict that loads into the recipe's own model class
    result = CliRunner().invoke(app, ["export", str(tmp_path / "one"), "--out", str(tmp_path / "model.pt")])
    assert result.exit_code == 0, result.output
    from resist_det.config import load_recipe
    from resist_det.train.tasks import build_task

    state = torch.load(tmp_path / "model.pt", weights_only=True)
    build_task(load_recipe(recipe), with_train=False).make_model(None).load_state_dict(state)
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)


# ---- bad input: clear one-line errors, nothing changed on disk --------------------------------
@pytest.fixture
def recipe_file(tmp_path):
    _write_idx(tmp_path / "fmnist")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(fmnist_recipe(tmp_path)))
    return path


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--set", "train.epochz=3"], "train.epochz: unknown key"),
        (["--set", "train.epochs=\"many\""], "train.epochs: Input should be a valid integer"),
        (["--set", "data.root=\"/no/such/dir\""], "data.root: dataset folder not found: /no/such/dir"),
        (["--resume"], "--resume: no checkpoint in"),
        # what building the engine on every rank would refuse (a traceback per rank, after seconds)
        (["--set", 'deepspeed.optimizer.params.lr="fast"'], "deepspeed.optimizer.params.lr: expected a number >= 0, got 'fast'"),
        (["--set", "deepspeed.optimizer.params.betas=[0.9]"], "deepspeed.optimizer.params.betas: expected two numbers"),
        (["--set", "resist.min_blocks=5"], "resist.min_blocks must be at most 4, the partitionable blocks of layer3 in this model"),
        (["--set", 'model={"kind": "resnet", "depth": 18}', "--set", "resist.min_blocks=5"],
         "resist.min_blocks must be at most 4, the partitionable blocks of layer1, layer2, layer3, layer4"),
        (["--set", 'resist.sections=["layer9"]'], "resist.sections: 'layer9' is not a section of this model"),
        (["--set", 'resist.block_pattern="(["'], "resist.block_pattern '([' is not a valid regular expression"),
        (["--set", "model.layers=[1,1,1,1]"], "section 3 has 1 block, so ResIST has nothing to partition"),
        (["--set", "model.layers=null", "--set", "model.depth=77"], "model.depth must be one of 18, 34, 50, 101, 152, 200"),
        (["--set", "model.layers=[1,1,0,1]"], "model.layers: the blocks of 4 sections, at least one each; got [1, 1, 0, 1]"),
        (["--set", 'deepspeed.zero_optimization={"stage": 2}'], "deepspeed.zero_optimization.stage must be 0 with resist.mode='resist'"),
        (["--set", 'deepspeed.fp16={"enabled": true}'], "deepspeed.fp16.enabled is not supported with resist.mode='resist'"),
        (["--set", 'train.output_dir="{tmp}/a_file"'], "train.output_dir {tmp}/a_file is a file, not a folder"),
        (["--set", 'train.output_dir="{tmp}/a_file/run"'], "train.output_dir {tmp}/a_file/run: {tmp}/a_file is a file, not a folder"),
        (["--set", "deepspeed.fp16=true"], "deepspeed.fp16: expected an object such as {\"enabled\": false}, got True"),
        # values the ranks would crash on, or take without comment: refused here, naming the key
        (["--set", "train.comm_timeout_minutes=1e300"], "train.comm_timeout_minutes: Input should be less than or equal to 10080"),
        (["--set", "deepspeed.train_micro_batch_size_per_gpu=0"], "deepspeed.train_micro_batch_size_per_gpu: expected a whole number from 1"),
        (["--set", "deepspeed.train_micro_batch_size_per_gpu=true"], "deepspeed.train_micro_batch_size_per_gpu: expected a whole number"),
        (["--set", 'deepspeed.train_micro_batch_size_per_gpu="16"'], "deepspeed.train_micro_batch_size_per_gpu: expected a whole number"),
        (["--set", "deepspeed.train_micro_batch_size_per_gpu=1000000000000"], "deepspeed.train_micro_batch_size_per_gpu: expected"),
        (["--set", "deepspeed.optimizer.params.lr=Infinity"], "deepspeed.optimizer.params.lr: expected a number >= 0, got inf"),
        (["--set", "deepspeed.gradient_clipping=-5"], "deepspeed.gradient_clipping: expected a finite number >= 0"),
        (["--set", "model.image_size=3200000"], "model.image_size: Input should be less than or equal to 4096"),
        (["--set", "data.num_workers=1000000"], "data.num_workers: Input should be less than or equal to 256"),
        (["--set", 'data.classes=[""]'], "data.classes: Value error, expected distinct, non-empty class names"),
        (["--set", "resist.local_steps=1e20"], "resist.local_steps: Input should be a valid integer"),
        (["--set", "train.epochs=true"], "train.epochs: Input should be a valid integer"),
        (["--set", "train.epochs.x=1"], "--set train.epochs.x: train.epochs is a value, not a section"),
    ],
)
def test_train_refuses_bad_input_before_starting(recipe_file, tmp_path, args, msg):
    (tmp_path / "a_file").write_text("not a folder")
    args, msg = [a.replace("{tmp}", str(tmp_path)) for a in args], msg.replace("{tmp}", str(tmp_path))
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, ["train", str(recipe_file), "--nproc", "2", *args])
    assert result.exit_code == 1
    assert msg in result.output and "Traceback" not in result.output, result.output
    assert _snapshot(tmp_path) == before  # nothing written, not even a run folder


def test_recipe_check_counts_the_blocks_the_engine_partitions():
    """The pre-launch check's count (torch-free, per section) equals what the engine partitions."""
    from resist_det.config import load_recipe
    from resist_det.models import preact_resnet, yolo_resnet
    from resist_det.models.resnet import resnet
    from resist_det.resist.partition import partitionable_blocks
    from resist_det.train.launch import recipe_path

    stock = {"model": {"kind": "resnet", "depth": 18}}
    for name, sets in [("fashion_mnist_resist", {}), ("demo_shapes", {}), ("voc_resist", {"model.depth": 50}),
                       ("cifar10_resist", {"model.layers": [2, 1, 7, 1]}), ("imagenet_resist", {}),
                       ("fashion_mnist_resist", {**stock, "resist.min_blocks": 1}),
                       ("fashion_mnist_resist", {"model": {"kind": "resnet", "depth": 50}}),
                       ("fashion_mnist_resist", {**stock, "resist.sections": ["layer1"], "resist.min_blocks": 1}),
                       ("fashion_mnist_resist", {**stock, "resist.sections": ["layer2", "layer4"], "resist.min_blocks": 1})]:
        recipe = load_recipe(recipe_path(name), sets)
        m = recipe.model
        if m.kind == "yolo":
            model = yolo_resnet(m.depth, num_classes=2, device="meta")
        elif m.kind == "resnet":
            model = resnet(m.depth, num_classes=2, device="meta")
        else:
            model = preact_resnet(m.depth if m.layers is None else None, layers=m.layers, block=m.block, device="meta")
        names = partitionable_blocks(model, None, recipe.resist.sections)
        assert sum(recipe.partition_counts().values()) == len(names), (name, sets)


def test_resume_refuses_other_world_size_or_recipe(recipe_file, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "epoch0000").mkdir(parents=True)
    (ckpt / "latest").write_text("epoch0000")
    for r in range(2):
        (ckpt / "epoch0000" / f"resist_rank{r:02d}.pt").write_bytes(b"")
    from resist_det.config import load_recipe

    saved = load_recipe(recipe_file).resist.model_dump(mode="json")
    empty = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    files = {f"resist_rank{r:02d}.pt": empty for r in range(2)}
    (ckpt / "epoch0000" / "resist.json").write_text(json.dumps({"world_size": 2, "resist": {**saved, "local_steps": 9}, "files": files}))
    before = _snapshot(tmp_path / "run")
    result = CliRunner().invoke(app, ["train", str(recipe_file), "--nproc", "3", "--resume"])
    assert result.exit_code == 1 and "written by 2 ranks, but this run has 3" in result.output
    result = CliRunner().invoke(app, ["train", str(recipe_file), "--nproc", "2", "--resume"])
    assert result.exit_code == 1 and "different resist section" in result.output
    assert f"resist.local_steps (saved 9, now {saved['local_steps']})" in result.output
    assert _snapshot(tmp_path / "run") == before


def test_cli_version_and_plan():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == "resist-det 0.1.0"
    result = runner.invoke(app, ["plan", "-S", "4", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert "22 partitionable blocks" in result.output and "6 partitioned blocks (min_blocks 5), depth 17 of 33" in " ".join(result.output.split())
    bad = runner.invoke(app, ["plan", "--model", "nosuchnet"])
    assert bad.exit_code == 1 and "--model must be" in bad.output
    local = runner.invoke(app, ["plan", "-S", "2", "--model", "resnet50", "--sections", "layer3", "--min-blocks", "5", "--rounds", "1"])
    assert local.exit_code == 0 and "this is local SGD" in " ".join(local.output.split())
    plain = runner.invoke(app, ["plan", "--model", "vgg11"])  # a torchvision model without residual blocks
    assert plain.exit_code == 1 and "no partitionable blocks" in plain.output


def test_shipped_recipes_validate_and_pair_up():
    from resist_det.config import load_recipe
    from resist_det.train.launch import PACKAGE_RECIPES

    recipes = {p.stem: load_recipe(p) for p in PACKAGE_RECIPES.glob("*.json")}
    assert {"voc_resist", "voc_localsgd", "cifar10_resist", "cifar100_localsgd", "imagenet_resist", "fashion_mnist_resist", "demo_shapes"} <= set(recipes)
    for name, r in recipes.items():
        if name.endswith("_resist"):
            twin = recipes[name.replace("_resist", "_localsgd")]
            assert r.resist.mode == "resist" and twin.resist.mode == "local_sgd"
            assert r.model == twin.model and r.data == twin.data and r.deepspeed == twin.deepspeed
    voc = recipes["voc_resist"]
    assert (voc.model.image_size, voc.batch_size, voc.train.epochs) == (448, 10, 100)  # paper section 5
    assert voc.train.lr_schedule.milestones == [60, 90] and voc.train.lr_schedule.warmup_epochs == 30
    inet = recipes["imagenet_resist"]
    assert (inet.resist.local_steps, inet.resist.min_blocks, inet.resist.bn_sync_rounds) == (15, 10, 1300)


def test_bn_recalibration_uses_training_batches():
    from torch import nn
    from torch.utils.data import TensorDataset

    from resist_det.train.tasks import Task

    x = torch.randn(16, 3, 4, 4) * 3 + torch.tensor([1.0, -2.0, 5.0]).view(1, 3, 1, 1)
    task = Task(kind="classification", train_set=TensorDataset(x, torch.zeros(16, dtype=torch.long)), test_set=None,
                num_classes=1, class_names=["a"], collate=None, make_model=None, loss_fn=None, main_metric="accuracy")
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(100.0)
    assert task.recalibrate_bn(nn.Sequential(bn), batches=4, batch_size=4) == 4
    # Equal batch sizes: the cumulative average of batch means is the mean of all 16 samples.
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)))
    assert bn.momentum == 0.1 and not bn.training
    assert task.recalibrate_bn(nn.Sequential(bn), batches=0, batch_size=4) == 0


def test_deepspeed_scheduler_is_used_or_refused(tmp_path):
    from resist_det.config import load_recipe

    recipe = fmnist_recipe(tmp_path)
    recipe["deepspeed"]["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    assert "scheduler" in load_recipe(recipe).deepspeed  # used: DeepSpeed steps it, the loop leaves the lr alone
    recipe["train"]["lr_schedule"] = {"milestones": [2]}
    with pytest.raises(ValueError, match="deepspeed.scheduler and train.lr_schedule both set the learning rate"):
        load_recipe(recipe)


@pytest.mark.parametrize("content,msg", [
    (b"[1, 2]", "expected a JSON object with sections deepspeed, resist, model, data and train, got a list"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply to be a recipe"),
    (b'\xff\xfe{"train": {}}', "not UTF-8 text, so not a recipe"),
])
def test_a_malformed_recipe_file_is_one_line_naming_it(tmp_path, content, msg):
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["train", str(path), "--nproc", "2"])
    assert result.exit_code == 1 and msg in result.output and str(path) in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
