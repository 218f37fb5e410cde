"""The partition plan: coverage, depth, equal shares, determinism, keep-blocks assignment."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_det.resist.plan import blocks_per_worker, inclusion_probability, iter_plans, make_plan


@st.composite
def plan_args(draw):
    n = draw(st.integers(1, 40))
    s = draw(st.integers(1, 8))
    m = draw(st.integers(1, n))
    return draw(st.integers(0, 1000)), s, n, m


@settings(max_examples=150, deadline=None)
@given(plan_args(), st.integers(0, 4))
def test_plan_properties(args, rnd):
    seed, s, n, m = args
    plan = make_plan(seed, rnd, s, n, m)
    k = max(-(-n // s), m)
    assert len(plan.groups) == s
    for g in plan.groups:
        assert len(g) == k >= m  # equal shares, at least the minimum depth
        assert len(set(g)) == len(g) and list(g) == sorted(g)  # no block twice in one sub-ResNet
        assert all(0 <= b < n for b in g)
    held = set(itertools.chain.from_iterable(plan.groups))
    assert held == set(range(n))  # every block is held by someone
    counts = [sum(b in g for g in plan.groups) for b in range(n)]
    assert max(counts) - min(counts) <= 1  # sharing is spread evenly
    assert plan == make_plan(seed, rnd, s, n, m)  # pure: same on every rank


def test_no_sharing_when_not_needed():
    plan = make_plan(0, 0, 2, 22, 5)
    assert [len(g) for g in plan.groups] == [11, 11]
    assert not set(plan.groups[0]) & set(plan.groups[1])
    assert inclusion_probability(2, 22, 5) == 0.5  # = 1/S, the paper's rule
    assert blocks_per_worker(8, 22, 5) == 5 and inclusion_probability(8, 22, 5) == 5 / 22


def test_rounds_differ_and_keep_blocks():
    plans = list(itertools.islice(iter_plans(3, 4, 22, 5), 30))
    assert len({p.groups for p in plans}) > 25  # fresh randomness every round
    kept = []
    for a, b in zip(plans, plans[1:]):
        # The keep-blocks assignment is at least as good as any other rank order, e.g. identity.
        best = sum(len(set(x) & set(y)) for x, y in zip(a.groups, b.groups))
        for perm in itertools.permutations(range(4)):
            assert best >= sum(len(set(a.groups[i]) & set(b.groups[j])) for i, j in enumerate(perm))
        kept.append(best)
    assert sum(kept) / len(kept) > 24 * 6 / 22  # better than a random rank order on average


def test_make_plan_matches_sequence_and_seed():
    seq = list(itertools.islice(iter_plans(5, 3, 10, 4), 6))
    assert [make_plan(5, t, 3, 10, 4) for t in range(6)] == seq
    assert make_plan(6, 0, 3, 10, 4) != seq[0]


@pytest.mark.parametrize(
    "s,n,m,msg",
    [(0, 22, 5, "num_workers"), (2, 0, 1, "no partitionable blocks"), (2, 22, 23, "min_blocks"), (2, 22, 0, "min_blocks")],
)
def test_bad_plan_arguments(s, n, m, msg):
    with pytest.raises(ValueError, match=msg):
        make_plan(0, 0, s, n, m)


def test_degenerate_plan_is_named():
    from resist_det.resist.plan import degenerate_plan

    assert "this is local SGD" in degenerate_plan(2, 5, 5)  # torchvision resnet50 with the default min_blocks
    assert degenerate_plan(2, 5, 2) is None and degenerate_plan(1, 5, 5) is None  # S = 1 is plain training


@settings(max_examples=150, deadline=None)
@given(plan_args(), st.integers(0, 3), st.lists(st.sampled_from([1, 4, 16, 64]), min_size=40, max_size=40))
def test_plan_over_blocks_of_several_sizes(args, rnd, pool):
    """Several sections: blocks of unequal size are dealt in equal numbers, each held, balanced in size."""
    seed, s, n, m = args
    sizes = pool[:n]
    plan = make_plan(seed, rnd, s, n, m, sizes)
    k = max(-(-n // s), m)
    assert all(len(g) == k and len(set(g)) == k for g in plan.groups)
    assert set(itertools.chain.from_iterable(plan.groups)) == set(range(n))
    assert plan == make_plan(seed, rnd, s, n, m, sizes)
    if s * k == n:  # one lap: every block exactly once, and no worker above the mean by more than one block
        loads = [sum(sizes[b] for b in g) for g in plan.groups]
        assert max(loads) <= sum(sizes) / s + max(sizes)


def test_blocks_of_one_size_keep_the_papers_plan():
    assert [make_plan(3, t, 4, 22, 5, [7] * 22) for t in range(3)] == [make_plan(3, t, 4, 22, 5) for t in range(3)]


def test_stock_backbones_partition_every_section():
    from resist_det.models.zoo import build_named_model
    from resist_det.resist.accounting import plan_report

    r50 = plan_report(build_named_model("resnet50", 10), 4, rounds=2)
    assert [s["name"] for s in r50.sections] == ["layer1", "layer2", "layer3", "layer4"]
    assert r50.rounds[1].bytes / r50.local_sgd_bytes <= 0.55
    assert max(r50.rounds[0].rank_params) / r50.total_params <= 0.6
    for workers in (2, 4):
        r18 = plan_report(build_named_model("resnet18", 10), workers, rounds=2)
        assert not r18.degenerate and r18.blocks_per_worker < r18.num_blocks == 4
    # Section 3 alone with the paper's minimum depth degenerates on resnet50: reported as local SGD's bytes.
    only3 = plan_report(build_named_model("resnet50", 10), 4, rounds=2, sections=["layer3"], min_blocks=5)
    assert only3.degenerate and only3.rounds[1].bytes == only3.local_sgd_bytes


def test_plan_of_a_torchvision_detector_opens_no_socket(monkeypatch):
    import socket

    from typer.testing import CliRunner

    from resist_det.cli import app

    def refuse(*args, **kwargs):
        raise AssertionError("resist-det plan opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    res = CliRunner().invoke(app, ["plan", "-S", "4", "--model", "fasterrcnn_resnet50_fpn", "--rounds", "1"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "12 partitionable blocks" in out and "backbone.body.layer4" in out and "partitioned)" in out
    bad = CliRunner().invoke(app, ["plan", "--model", "resnet50", "--min-blocks", "99"])
    assert bad.exit_code == 1 and "--min-blocks" in bad.output


def test_plan_nodes_compares_rank_and_node_topologies():
    """``plan --nodes N --gpus-per-node g``: local SGD's NIC bytes per sync by hand (a ring over all
    ranks crosses each machine's NIC once: 2 (W-1)/W of the network; with node, 2 (N-1)/N of it,
    split over the g ranks), and the CLI prints the same report."""
    from typer.testing import CliRunner

    from resist_det.cli import app
    from resist_det.models.zoo import build_named_model
    from resist_det.resist.accounting import machine_report, split_sizes

    net = build_named_model("preact-resnet101")
    total = split_sizes(net)["total"]
    both = machine_report(net, 2, 8, rounds=2)
    assert both["rank"]["local_sgd_nic_round"] == round(2 * 15 / 16 * total * 4)
    assert both["node"]["local_sgd_nic_round"] == round(8 * 1.0 * -(-total // 8) * 4)
    assert (both["rank"]["workers"], both["node"]["workers"]) == (16, 2)
    assert both["node"]["depth"] > both["rank"]["depth"]
    assert both["node"]["nic_round"] < both["rank"]["nic_round"]
    assert both["rank"]["inside_step"] == 0 < both["node"]["inside_step"]
    res = CliRunner().invoke(app, ["plan", "--nodes", "2", "--gpus-per-node", "8", "--model", "preact-resnet101", "--rounds", "2",
                                   "--rate", "1gbit"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert f"{both['rank']['nic_round'] / 2**20:,.1f} MiB" in out and f"{both['node']['nic_round'] / 2**20:,.1f} MiB" in out
    assert f"node / rank ResIST bytes over the slow link: {both['node']['nic_round'] / both['rank']['nic_round']:.3f}" in out
    bad = CliRunner().invoke(app, ["plan", "-S", "4", "--nodes", "2"])
    assert bad.exit_code == 1 and "give -S (sub-networks) or --nodes (machines), not both" in " ".join(bad.output.split())


def test_bench_runs_a_checkout_script_and_names_what_is_missing(tmp_path):
    """``resist-det bench`` runs a benchmark of a checkout with the extra arguments (here one its
    argparse refuses, exit 2, which the command passes on);
    an unknown name or a folder without the script is one line naming it."""
    import subprocess
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from resist_det.cli import app

    repo = Path(__file__).resolve().parent.parent
    ok = subprocess.run([sys.executable, "-m", "resist_det.cli", "bench", "engine", "--scripts", str(repo / "benchmarks"), "no-such-bench"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 2 and "bench_engine.py: error: argument which: invalid choice: 'no-such-bench'" in ok.stderr, ok.stderr
    bad = CliRunner().invoke(app, ["bench", "nope"])
    assert bad.exit_code == 1 and "unknown benchmark 'nope'" in bad.output
    gone = CliRunner().invoke(app, ["bench", "engine", "--scripts", str(tmp_path)])
    assert gone.exit_code == 1 and f"--scripts: {tmp_path / 'bench_engine.py'} not found" in " ".join(gone.output.split())
