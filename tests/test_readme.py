"""The README's drop-in example runs, as written, on 2 CPU ranks under torchrun."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("example", ["dropin", "plain"])
def test_readme_example_runs(tmp_path, example):
    """The DeepSpeed drop-in and the plain-PyTorch example, each on 2 ranks under torchrun."""
    text = README.read_text()
    block = re.search(rf"<!-- {example}:start -->\s*```python\n(.*?)```\s*<!-- {example}:end -->", text, re.S)
    assert block, f"README lost its {example} example"
    script = tmp_path / "user_script.py"
    script.write_text(block.group(1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a hang: kill the launcher and its ranks, then fail
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert re.search(r"rounds 4, bytes sent by rank 0: [1-9]\d*", out), out[-2000:]


def test_readme_quickstart_has_two_commands():
    quick = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", quick, re.M)
    assert commands == ["make demo", "make test"]


def test_the_guide_names_every_resist_key():
    """docs/guide.md, the reference, lists every key of the ``resist`` section (and of its compression)."""
    from resist_det.resist.config import CompressionConfig, ResISTConfig

    guide = (README.parent / "docs" / "guide.md").read_text()
    missing = [k for k in [*ResISTConfig.model_fields, *CompressionConfig.model_fields] if f"`{k}`" not in guide]
    assert not missing, f"docs/guide.md does not mention resist keys {missing}"


def test_readme_is_short_and_links_what_it_quotes():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    for target in re.findall(r"\]\(((?:benchmarks|docs|docker)/[^)#]+)", text):
        assert (README.parent / target).exists(), f"README links to a missing file: {target}"
