"""resist.topology: one sub-network per machine, its ranks data-parallel replicas of it.

Real gloo processes told (as torchrun tells them) which machine they run on; references:
topology ``rank`` (bit for bit, one rank per machine), the mean over machines of the copies
before a sync, and bit-identical replicas inside a machine after every step."""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from helpers import block_snapshot, ds_config, preact_net, shared_snapshot, train_steps


def _engine(topology, mode="resist", **resist):
    import resist_det

    cfg = ds_config(sgd_momentum=0.9, local_steps=3, min_blocks=2, seed=5, topology=topology, mode=mode, **resist)
    engine, *_ = resist_det.initialize(model=preact_net(seed=1), config=cfg)
    return engine


def _weights(engine):
    return {n: t.clone() for n, t in engine.module.state_dict().items()}


def _rank_vs_node(rank, world):
    out = {}
    for topology in ("rank", "node"):
        engine = _engine(topology)
        train_steps(engine, 7, torch.Generator().manual_seed(rank))  # two syncs, one round under way
        engine.synchronize()
        out[topology] = (engine.topology.kind, engine.plan.groups, _weights(engine))
    return out


def test_node_with_one_rank_per_machine_trains_what_rank_trains(tmp_path):
    res = run_on_ranks(_rank_vs_node, 2, tmp_path, nodes=2, timeout=300)
    for r in res:
        assert r["rank"][0] == "rank" and r["node"][0] == "node"
        assert r["rank"][1] == r["node"][1]
        assert r["rank"][2].keys() == r["node"][2].keys()
        for name, t in r["rank"][2].items():
            assert torch.equal(t, r["node"][2][name]), name


def _two_by_two(rank, world, mode, bits):
    engine = _engine("node", mode=mode, bn="average", compression={"bits": bits})
    top = engine.topology
    gen = torch.Generator().manual_seed(rank)
    steps, syncs = [], []
    for _ in range(2):  # rounds
        for _ in range(2):  # local steps (the round ends at the sync below)
            train_steps(engine, 1, gen)
            steps.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
        before = (shared_snapshot(engine), block_snapshot(engine) if mode == "resist" else {})
        plan_before = engine.plan.groups if mode == "resist" else None
        engine.synchronize()
        after = (shared_snapshot(engine), block_snapshot(engine) if mode == "resist" else {})
        syncs.append((plan_before, engine.plan.groups if mode == "resist" else None, before, after))
    return dict(machine=top.machine, kind=top.kind, workers=top.workers, steps=steps, syncs=syncs,
                nic=engine.nic_bytes, sent=engine.bytes_sent)


@pytest.mark.parametrize("mode,bits", [("resist", 32), ("local_sgd", 32), ("resist", 8)])
def test_two_machines_of_two_ranks(tmp_path, mode, bits):
    """Replicas of a machine equal after every step; after a sync, shared tensors are the mean over
    machines (BN statistics: over every rank) and each block the mean over the machines that held it."""
    res = run_on_ranks(_two_by_two, 4, tmp_path, mode, bits, nodes=2, timeout=300)
    assert [r["machine"] for r in res] == [0, 0, 1, 1] and {r["kind"] for r in res} == {"node"}
    assert {r["workers"] for r in res} == {2}
    for a, b in ((0, 1), (2, 3)):  # replicas of one machine: bit-identical after every step
        for sa, sb in zip(res[a]["steps"], res[b]["steps"]):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    tol = dict(rtol=1e-6, atol=1e-7) if bits == 32 else dict(rtol=0, atol=0.05)
    machines = ([0, 1], [2, 3])
    for t in range(2):
        pre = [r["syncs"][t][2] for r in res]
        post = [r["syncs"][t][3] for r in res]
        for name in pre[0][0]:  # shared: identical everywhere, the mean over machines (of the machines' means)
            by_machine = [torch.stack([pre[r][0][name] for r in m]).mean(0) for m in machines]
            for q in post:
                assert torch.equal(q[0][name], post[0][0][name]), name
            torch.testing.assert_close(post[0][0][name], torch.stack(by_machine).mean(0), msg=name, **tol)
        if mode != "resist":
            continue
        old, new = res[0]["syncs"][t][0], res[0]["syncs"][t][1]
        assert len(old) == len(new) == 2  # plans over machines
        for r, q in enumerate(post):
            m = r // 2
            assert sorted(q[1]) == list(new[m])
            for b, value in q[1].items():
                assert torch.equal(value, post[machines[m][0]][1][b])  # both replicas hold the same copy
                holders = [h for h in range(2) if b in old[h]]
                copies = [torch.stack([pre[r2][1][b] for r2 in machines[h]]).mean(0) for h in holders]
                torch.testing.assert_close(value, torch.stack(copies).mean(0), **tol)
    # Cross-machine bytes were counted, and only part of what the ranks sent crossed.
    assert all(0 < r["nic"] < r["sent"] for r in res)


def _global_and_checkpoint(rank, world, tmp):
    engine = _engine("node")
    gen = torch.Generator().manual_seed(rank)
    train_steps(engine, 4, gen)
    engine.synchronize()
    blocks = block_snapshot(engine)
    net = engine.global_model(dst=0, fold=False)  # scale as a hook: the weights as the holders have them
    engine.save_checkpoint(tmp, tag="t")
    saved = _weights(engine)
    train_steps(engine, 3, gen)
    fresh = _engine("node")
    fresh.load_checkpoint(tmp, tag="t")
    return dict(net=None if net is None else net.state_dict(), blocks=blocks, names=engine.block_names,
                loaded=_weights(fresh), saved=saved, scale=engine.residual_scale())


def test_global_model_and_checkpoint_with_node(tmp_path):
    from resist_det.resist.sync import block_tensors

    res = run_on_ranks(_global_and_checkpoint, 4, tmp_path, str(tmp_path / "ckpt"), nodes=2, timeout=300)
    for r in res:  # each rank resumes its own sub-network exactly
        assert r["loaded"].keys() == r["saved"].keys()
        assert all(torch.equal(r["loaded"][n], r["saved"][n]) for n in r["saved"])
    assert res[0]["net"] is not None and all(r["net"] is None for r in res[1:])
    # Every block of the global network is its holder machine's copy; its inclusion scale is that of
    # 2 workers (machines) holding 3 of 6 blocks each, not of 4 ranks.
    assert res[0]["scale"] == 0.5
    net = preact_net(seed=1)
    net.load_state_dict(res[0]["net"])
    for b, name in enumerate(res[0]["names"]):
        holders = [r for r in res if b in r["blocks"]]
        assert len(holders) == 2  # both ranks of the holder machine
        got = torch.cat([t.flatten() for t in block_tensors(net.get_submodule(name))])
        assert all(torch.equal(got, h["blocks"][b]) for h in holders), name


def _bad(rank, world, topology, resist):
    import resist_det

    try:
        resist_det.initialize(model=preact_net(), config=ds_config(topology=topology, **resist))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("topology,resist,msg", [
    ("machines", {}, "resist.topology: Input should be 'rank', 'node' or 'auto'"),
    ("node", {"min_blocks": 7}, "resist.min_blocks must be between 1 and the number of partitionable blocks (6), but got 7"),
])
def test_bad_topology_is_one_line(tmp_path, topology, resist, msg):
    res = run_on_ranks(_bad, 2, tmp_path, topology, resist, nodes=2)
    assert all(r is not None and msg in r for r in res), res


def _warned(rank, world):
    import warnings

    import resist_det

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, *_ = resist_det.initialize(model=preact_net(), config=ds_config(topology="node", min_blocks=2))
    return engine.topology.kind, engine.topology.workers, [str(w.message) for w in caught]


def test_node_on_one_machine_warns_that_it_is_data_parallel(tmp_path):
    res = run_on_ranks(_warned, 2, tmp_path)  # one machine of 2 ranks
    assert [r[:2] for r in res] == [("node", 1), ("node", 1)]
    assert any("resist.topology 'node' on one machine" in w for w in res[0][2]), res[0][2]


def test_choose_topology():
    from resist_det.resist.topology import choose_topology

    assert choose_topology("auto", [0, 0, 1, 1], "resist") == "node"
    assert choose_topology("auto", [0, 1], "resist") == "rank"  # one rank per machine: the same thing
    assert choose_topology("auto", [0, 0, 0, 0], "resist") == "rank"  # one multi-GPU box keeps today's behaviour
    assert choose_topology("auto", [0, 0, 1], "resist") == "rank"  # unequal machines
    assert choose_topology("node", [0, 0, 1, 1], "ddp") == "rank"  # ddp stays flat
    with pytest.raises(ValueError, match=r"resist.topology 'node' needs the same number of ranks on every machine.*\[2, 1\]"):
        choose_topology("node", [0, 0, 1], "resist")


def _counted_per_sync(rank, world, rounds):
    out = {}
    for topology in ("rank", "node"):
        engine = _engine(topology)
        gen = torch.Generator().manual_seed(rank)
        counted = []
        for _ in range(rounds):
            train_steps(engine, 1, gen)
            before = engine.nic_bytes
            engine.synchronize()
            counted.append(engine.nic_bytes - before)
        out[topology] = (engine.topology.machine, counted)
    return out


def test_nic_bytes_counted_equal_the_planners_prediction(tmp_path):
    """What the engines count as crossing each machine's NIC, per sync, for rank and node on 2 x 2
    ranks, equals resist-det plan --nodes 2 --gpus-per-node 2 (accounting.machine_report)."""
    from resist_det.resist.accounting import machine_report

    rounds = 3
    res = run_on_ranks(_counted_per_sync, 4, tmp_path, rounds, nodes=2, timeout=300)
    predicted = machine_report(preact_net(device="meta"), 2, 2, min_blocks=2, seed=5, rounds=rounds)
    for topology in ("rank", "node"):
        per_machine = [[0, 0] for _ in range(rounds)]
        for r in res:
            machine, counted = r[topology]
            for t, c in enumerate(counted):
                per_machine[t][machine] += c
        assert per_machine == predicted[topology]["nic_rounds"], topology
    node = sum(map(max, predicted["node"]["nic_rounds"]))
    rank = sum(map(max, predicted["rank"]["nic_rounds"]))
    assert node < rank


def test_training_loop_with_node_resumes_to_the_uninterrupted_result(tmp_path):
    """The recipe loop on 2 machines x 2 ranks with topology node: 2 epochs straight, against 1
    epoch then --resume for the 2nd: equal global models; epoch records carry NIC bytes per machine."""
    import json

    from helpers import write_idx
    from helpers import final_model, fmnist_recipe, train_rank

    write_idx(tmp_path / "fmnist", n_train=64, n_test=16)
    straight = fmnist_recipe(tmp_path, "straight", topology="node")
    straight["train"]["epochs"] = 2
    run_on_ranks(train_rank, 4, tmp_path / "a", straight, False, nodes=2, timeout=300)
    first = {**straight, "train": {**straight["train"], "output_dir": str(tmp_path / "resumed"), "epochs": 1}}
    run_on_ranks(train_rank, 4, tmp_path / "b", first, False, nodes=2, timeout=300)
    second = {**first, "train": {**first["train"], "epochs": 2}}
    run_on_ranks(train_rank, 4, tmp_path / "c", second, True, nodes=2, timeout=300)
    (want, rounds_a), (got, rounds_b) = final_model(tmp_path, "straight"), final_model(tmp_path, "resumed")
    assert rounds_a == rounds_b
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    epochs = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    nic = [r["nic_bytes"] for r in epochs if r["event"] == "epoch"]
    assert all(len(n) == 2 and all(b > 0 for b in n) for n in nic) and nic[1][0] > nic[0][0]
