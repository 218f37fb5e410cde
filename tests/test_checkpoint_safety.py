"""Files a user points the CLI at never run code; damaged checkpoints are refused by name."""

import hashlib
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from distributed import run_on_ranks
from helpers import fmnist_recipe, train_rank, write_idx
from resist_det.cli import app

# One pytest worker runs these: they share one trained run (the module fixture), built once.
pytestmark = pytest.mark.xdist_group("checkpoint_safety")


class _Payload:
    """What a malicious pickle carries: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_manifest(tag_dir):
    """What an attacker would do: make the manifest agree with the planted file."""
    record = json.loads((tag_dir / "resist.json").read_text())
    for name in record["files"]:
        record["files"][name] = {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha(tag_dir / name)}
    (tag_dir / "resist.json").write_text(json.dumps(record))


def _flip(path, n=4096):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")  # session: built once even when other modules' tests run in between
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    write_idx(tmp / "fmnist")
    recipe = fmnist_recipe(tmp, "run")
    recipe["train"]["epochs"] = 1
    run_on_ranks(train_rank, 2, tmp / "ranks", recipe, False, timeout=300)
    path = tmp / "recipe.json"
    path.write_text(json.dumps(recipe))
    return tmp, path


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_global_model_loads_without_code_and_damage_or_payload_is_refused(trained, tmp_path):
    tmp, _ = trained
    model = tmp / "run" / "global_model.pt"
    saved = torch.load(model, weights_only=True)  # plain tensors and values
    assert saved["sha256"].keys() == saved["model"].keys()
    original = model.read_bytes()
    marker = tmp_path / "pwned"
    try:
        _flip(model)
        result = _cli("eval", "--checkpoint", tmp / "run")
        assert result.exit_code == 1 and str(model) in result.output and "Traceback" not in result.output
        torch.save({"model": _Payload(marker), "recipe": {}}, model)
        for args in (("eval", "--checkpoint", tmp / "run"), ("export", tmp / "run", "--out", tmp_path / "m.pt"),
                     ("plot", tmp / "run", "--out", tmp_path / "p.png")):
            result = _cli(*args)
            assert not marker.exists(), args  # nothing executed
            if args[0] != "plot":  # (plot reads metrics.jsonl only)
                assert result.exit_code == 1 and str(model) in result.output, args
    finally:
        model.write_bytes(original)


def test_integrity_checks_cannot_be_switched_off_by_the_file(trained, tmp_path):
    """A file cannot vouch for itself by leaving its checksums out; damage is never taken for an
    interrupted save; a refused pickle gets one line, without torch's advice to unpickle it."""
    tmp, recipe = trained
    model = tmp / "run" / "global_model.pt"
    original = model.read_bytes()
    saved = torch.load(model, weights_only=True)
    try:
        for bad in ({k: v for k, v in saved.items() if k != "sha256"}, {**saved, "sha256": "deadbeef"},
                    {**saved, "model": [1, 2]}):
            torch.save(bad, model)
            result = _cli("eval", "--checkpoint", tmp / "run")
            assert result.exit_code == 1 and str(model) in result.output and "Traceback" not in result.output, result.output
        torch.save({"model": _Payload(tmp_path / "pwned"), "recipe": {}}, model)
        result = _cli("export", tmp / "run", "--out", tmp_path / "m.pt")
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "weights_only=False" not in result.output and not (tmp_path / "pwned").exists()
    finally:
        model.write_bytes(original)
    tag_dir = tmp / "run" / "checkpoints" / "epoch0000"
    record, rank_file = (tag_dir / "resist.json").read_text(), tag_dir / "resist_rank01.pt"
    data = rank_file.read_bytes()
    try:
        (tag_dir / "resist.json").write_text(json.dumps({**json.loads(record), "files": None}))
        result = _cli("train", recipe, "--nproc", "2", "--resume")  # no manifest: nothing to resume from
        assert result.exit_code == 1 and "no complete checkpoint" in result.output, result.output
        (tag_dir / "resist.json").write_text(record)
        rank_file.write_bytes(data[: len(data) // 2])  # truncated under a complete manifest: damage, named
        result = _cli("train", recipe, "--nproc", "2", "--resume")
        assert result.exit_code == 1 and f"damaged: {rank_file} (its size differs" in result.output, result.output
    finally:
        (tag_dir / "resist.json").write_text(record)
        rank_file.write_bytes(data)


@pytest.mark.parametrize("victim", ["resist_rank01.pt", "mp_rank_00_model_states.pt"])
def test_resume_refuses_a_damaged_or_planted_checkpoint_file(trained, tmp_path, victim):
    tmp, recipe = trained
    tag_dir = tmp / "run" / "checkpoints" / "epoch0000"
    path = tag_dir / victim
    original, record = path.read_bytes(), (tag_dir / "resist.json").read_text()
    marker = tmp_path / "pwned"
    try:
        _flip(path)
        result = _cli("train", recipe, "--nproc", "2", "--resume")
        assert result.exit_code == 1 and f"damaged: {path}" in result.output and "Traceback" not in result.output
        torch.save({"module": _Payload(marker)}, path)
        _rewrite_manifest(tag_dir)  # the checksums agree: only the loader's own check stands
        result = _cli("train", recipe, "--nproc", "2", "--resume")
        assert result.exit_code == 1 and f"refusing to load {path}" in result.output, result.output
        assert not marker.exists()
        # The same checks guard the ranks' own loader (torchrun / deepspeed launch paths).
        from resist_det.resist.checkpoint import check_plain_tensors

        with pytest.raises(ValueError, match="refusing to load"):
            check_plain_tensors(tag_dir)
        assert not marker.exists()
    finally:
        path.write_bytes(original)
        (tag_dir / "resist.json").write_text(record)


def test_launcher_path_resume_refuses_a_changed_recipe_and_keeps_recipe_json(trained):
    """``tools/train.py`` / ``python -m resist_det.train`` is what torchrun and deepspeed start on
    every rank; it refuses a changed recipe itself, in one line, before anything is written."""
    import subprocess
    import sys

    tmp, recipe = trained
    saved = (tmp / "run" / "recipe.json").read_text()
    cmd = [sys.executable, "-m", "resist_det.train", str(recipe), "--resume", "--no-progress",
           "--set", "deepspeed.optimizer.params.lr=0.2", "--set", "train.epochs=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.count("the one the checkpoint was trained with (deepspeed.optimizer)") == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert (tmp / "run" / "recipe.json").read_text() == saved


def test_a_moved_run_directory_resumes(trained, tmp_path):
    import shutil

    tmp, recipe = trained
    moved = tmp_path / "moved"
    shutil.copytree(tmp / "run", moved)
    config = json.loads(recipe.read_text())
    config["train"].update(output_dir=str(moved), epochs=2)
    run_on_ranks(train_rank, 2, tmp_path / "ranks", config, True, timeout=300)
    epochs = [json.loads(line)["epoch"] for line in (moved / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert epochs == [0, 1]
    assert (moved / "checkpoints" / "latest").read_text().strip() == "epoch0001"


def test_prune_keeps_the_newest_complete_checkpoints_and_latest(tmp_path):
    from resist_det.resist.checkpoint import prune, resume_tag

    root = tmp_path / "checkpoints"
    for step, tag in enumerate(["epoch0000", "epoch0001", "epoch0002", "epoch0003"]):
        (root / tag).mkdir(parents=True)
        (root / tag / "w.pt").write_bytes(b"x" * step)
        files = {"w.pt": {"bytes": step, "sha256": _sha(root / tag / "w.pt")}}
        (root / tag / "resist.json").write_text(json.dumps({"world_size": 1, "resist": {}, "step": step, "files": files}))
    (root / "epoch0004").mkdir()  # a save that never finished: no record
    (root / "epoch0004" / "w.pt").write_bytes(b"half")
    (root / "latest").write_text("epoch0004")
    os.utime(root / "epoch0000" / "resist.json", (1, 1))  # copied without times: order comes from the step
    assert resume_tag(root)[0] == "epoch0003"
    (root / "latest").write_text("epoch0003")
    assert sorted(prune(root, 2)) == ["epoch0000", "epoch0001"]
    assert sorted(p.name for p in root.iterdir()) == ["epoch0002", "epoch0003", "epoch0004", "latest"]


def test_write_record_sweeps_half_written_files_of_killed_writers(tmp_path):
    """A rank killed while writing its file leaves ``.NAME.*.tmp`` in the tag; rank 0 killed while
    moving ``latest`` leaves ``.latest.*.tmp`` beside it.  The next save of the tag removes both
    and lists neither in the manifest."""
    from resist_det.resist.checkpoint import resume_tag, write_record
    from resist_det.resist.config import ResISTConfig

    root = tmp_path / "checkpoints"
    (root / "epoch0001").mkdir(parents=True)
    (root / "epoch0001" / "w.pt").write_bytes(b"weights")
    (root / "epoch0001" / ".w1.pt.abc.tmp").write_bytes(b"half")
    (root / ".latest.xyz.tmp").write_text("epoch00")
    (root / "notes.tmp").write_text("a user's file")  # not one of ours: kept
    write_record(root, "epoch0001", 1, ResISTConfig(), step=3)
    assert sorted(p.name for p in root.iterdir()) == ["epoch0001", "latest", "notes.tmp"]
    assert sorted(p.name for p in (root / "epoch0001").iterdir()) == ["resist.json", "w.pt"]
    record = json.loads((root / "epoch0001" / "resist.json").read_text())
    assert record["files"] == {"w.pt": {"bytes": 7, "sha256": _sha(root / "epoch0001" / "w.pt")}}
    assert resume_tag(root) == ("epoch0001", None)


def test_resuming_a_finished_run_leaves_it_as_it_was(trained):
    tmp, recipe = trained
    files = {p: p.read_bytes() for p in (tmp / "run").rglob("*") if p.is_file() and p.name != ".resist_det.lock"}
    assert "accuracy" in json.loads((tmp / "run" / "summary.json").read_text()).get("metrics", {})
    result = _cli("train", recipe, "--nproc", "2", "--resume")
    assert result.exit_code == 0 and "has finished (all 1 epochs trained)" in " ".join(result.output.split()), result.output
    assert {p: p.read_bytes() for p in files} == files  # summary, log, checkpoints: untouched


@pytest.mark.parametrize("content,msg", [
    ('[1, 2]', "not a run's recipe"),
    ('{"train": 5}', "not a run's recipe"),
    ('{"train": ', "not valid JSON"),
])
def test_resume_with_a_malformed_run_recipe_is_one_line(trained, content, msg):
    tmp, recipe = trained
    saved = tmp / "run" / "recipe.json"
    original = saved.read_text()
    try:
        saved.write_text(content)
        result = _cli("train", recipe, "--nproc", "2", "--resume")
        assert result.exit_code == 1 and msg in result.output and str(saved) in result.output, result.output
        assert "Traceback" not in result.output
    finally:
        saved.write_text(original)


@pytest.mark.parametrize("lines,msg", [
    (['[1, 2]'], "line 1 is not a metrics record"),
    (['{"event": "epoch", "epoch": 0, "wall": 1.0, "metrics": {"accuracy": 0.5}}'], "has no number for 'bytes'"),
    (['{"event": "epoch", "epoch": 0, "bytes": "x", "wall": 1.0, "metrics": {"accuracy": 0.5}}'], "has no number for 'bytes'"),
    (['{"event": '], "line 1 is not valid JSON"),
])
def test_plot_of_a_malformed_metrics_log_is_one_line(tmp_path, lines, msg):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = _cli("plot", tmp_path, "--out", tmp_path / "p.png")
    assert result.exit_code == 1 and msg in result.output and "metrics.jsonl" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.png").exists()


def test_export_and_shapes_refuse_an_unwritable_out(trained, tmp_path):
    tmp, _ = trained
    result = _cli("export", tmp / "run", "--out", tmp_path)
    assert result.exit_code == 1 and f"--out {tmp_path} is a folder" in result.output, result.output
    result = _cli("data", "shapes", "--out", "/proc/no_such_place", "--images", "2")
    assert result.exit_code == 1 and "--out /proc/no_such_place: cannot write" in result.output, result.output
    assert "Traceback" not in result.output
