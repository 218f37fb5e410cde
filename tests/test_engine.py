"""The ResIST engine on real gloo ranks, checked against plain training, DDP and exact means."""


import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from helpers import LAYERS, batch as _batch, block_snapshot, ds_config as _cfg, preact_net as _net, shared_snapshot, stock_net
from helpers import train_steps as _train


#: A stock ResNet whose partitionable blocks lie in every section: layer1.1, layer2.1-2, layer3.1-3,
#: layer4.1 (layer1.0 stays shared: its section has no strided block to keep it non-empty).
SECTIONS_LAYERS = (2, 3, 4, 2)
SECTIONS_BLOCKS = ["layer1.1", "layer2.1", "layer2.2", "layer3.1", "layer3.2", "layer3.3", "layer4.1"]


def _build(kind, seed, meta=False):
    """This project's pre-activation net (on the meta device if asked), or a stock torchvision
    ResNet (``sections``: partitioned in every section)."""
    if kind == "preact":
        return _net(seed=seed, device="meta" if meta else None)
    if kind == "sections":
        return stock_net(seed=seed, layers=SECTIONS_LAYERS)
    return stock_net(seed=seed, layers=LAYERS)


# ---- S = 1 equals plain training -------------------------------------------------------------
def _s1_vs_plain(rank, world, kind):
    import resist_det

    ref = _build(kind, 1)
    engine, *_ = resist_det.initialize(
        model=_build(kind, 1, meta=True), config=_cfg(lr=0.05, sgd_momentum=0.9, local_steps=3, min_blocks=1, momentum="keep", seed=1)
    )
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    _train(engine, 7, g1)
    for _ in range(7):
        x, y = _batch(g2)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    engine.synchronize()
    net = engine.global_model()
    return engine.round, net.state_dict(), ref.state_dict()


@pytest.mark.parametrize("kind", ["preact", "stock", "sections"])
def test_single_worker_equals_plain_training(tmp_path, kind):
    [(rounds, got, want)] = run_on_ranks(_s1_vs_plain, 1, tmp_path, kind)
    assert rounds == 3  # syncs after steps 3 and 6, and the explicit one
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- local SGD with L = 1 equals DDP ---------------------------------------------------------
def _local_sgd_vs_ddp(rank, world, kind):
    import resist_det

    from torchvision.ops import FrozenBatchNorm2d

    def build():
        # Train-mode BatchNorm over 4 samples at 1x1 resolution (the stock stem downsamples 8x8
        # inputs 32x) amplifies float rounding about 1000x per step, so two exact-in-theory
        # reductions drift apart; the stock net uses detection's FrozenBatchNorm2d here instead.
        if kind == "stock":
            return stock_net(seed=2, layers=LAYERS, norm_layer=FrozenBatchNorm2d)
        return _build(kind, 2)

    out = {}
    for mode in ("local_sgd", "ddp"):
        engine, *_ = resist_det.initialize(model=build(), config=_cfg(lr=0.1, mode=mode, local_steps=1))
        _train(engine, 4, torch.Generator().manual_seed(100 + rank))  # different data per rank
        out[mode] = {k: v.clone() for k, v in engine.module.named_parameters()}
    return out


@pytest.mark.parametrize("kind", ["preact", "stock"])
def test_local_sgd_one_step_equals_ddp(tmp_path, kind):
    results = run_on_ranks(_local_sgd_vs_ddp, 2, tmp_path, kind)
    for out in results:
        for k in out["ddp"]:
            torch.testing.assert_close(out["local_sgd"][k], out["ddp"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(torch.equal(results[0]["ddp"][k], results[1]["ddp"][k]) for k in results[0]["ddp"])


# ---- invariants of a synchronisation round ---------------------------------------------------
def _snapshot(engine):
    return shared_snapshot(engine), block_snapshot(engine)


def _sync_rounds(rank, world, rounds, min_blocks, kind):
    import resist_det
    from resist_det.resist.engine import memory_footprint

    engine, optimizer, *_ = resist_det.initialize(
        model=_build(kind, 3, meta=True), config=_cfg(sgd_momentum=0.9, local_steps=10_000, min_blocks=min_blocks, seed=4)
    )
    gen = torch.Generator().manual_seed(rank)
    history = []
    for _ in range(rounds):
        _train(engine, 2, gen)
        before = _snapshot(engine)
        plan_before = engine.plan.groups
        engine.synchronize()
        history.append((plan_before, engine.plan.groups, before, _snapshot(engine)))
    # What this rank holds: module, gradients and optimizer state cover only its own tensors.
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    all_params = {id(p) for p in engine.module.parameters()}
    module_params = {id(p) for p in engine.module.parameters() if p.numel()}  # empty slots hold nothing
    _train(engine, 1, gen)  # momentum buffers exist now
    x, y = _batch(gen)
    engine.backward(F.cross_entropy(engine(x), y))  # gradients exist now (until the next step)
    state_params = {id(p) for p in optimizer.state}
    grad_params = {id(p) for p in engine.module.parameters() if p.grad is not None}
    n_params = sum(p.numel() for p in engine.module.parameters())
    return dict(
        history=history,
        opt_is_module=opt_params == all_params,
        state_in_module=state_params <= module_params and grad_params == module_params,
        n_params=n_params,
        n_slots=len(engine.strategy.slots),
        names=engine.block_names,
        memory=memory_footprint(engine),
        scale=engine.residual_scale(),
    )


@pytest.mark.parametrize("world,min_blocks,kind", [(2, 2, "preact"), (4, 2, "preact"), (2, 2, "stock"),
                                                   (2, 2, "sections"), (4, 2, "sections")])
def test_sync_invariants(tmp_path, world, min_blocks, kind):
    res = run_on_ranks(_sync_rounds, world, tmp_path, 3, min_blocks, kind, timeout=300)
    names = SECTIONS_BLOCKS if kind == "sections" else [f"layer3.{i}" for i in range(1, LAYERS[2])]
    assert res[0]["names"] == names
    n_blocks = len(names)
    k = max(-(-n_blocks // world), min_blocks)
    ref = _build(kind, 0)
    full = sum(p.numel() for p in ref.parameters())
    size = [sum(p.numel() for p in ref.get_submodule(n).parameters()) for n in names]
    for t in range(3):
        old_plans = {r["history"][t][0] for r in res}
        new_plans = {r["history"][t][1] for r in res}
        assert len(old_plans) == 1 and len(new_plans) == 1  # identical on every rank
        old, new = old_plans.pop(), new_plans.pop()
        assert set().union(*new) == set(range(n_blocks))  # every block held by someone
        assert all(len(g) == k >= min_blocks for g in new)
        pre = [r["history"][t][2] for r in res]
        post = [r["history"][t][3] for r in res]
        # Shared tensors: identical on all ranks, equal to the mean of the pre-sync copies.
        for name in pre[0][0]:
            mean = torch.stack([p[0][name] for p in pre]).mean(0)
            for q in post:
                torch.testing.assert_close(q[0][name], post[0][0][name], rtol=0, atol=0)
                torch.testing.assert_close(q[0][name], mean, rtol=1e-6, atol=1e-7, msg=name)
        # Each block now equals the mean over the ranks that held it before.
        for rank, q in enumerate(post):
            assert sorted(q[1]) == list(new[rank])
            for b, value in q[1].items():
                holders = [h for h in range(world) if b in old[h]]
                mean = torch.stack([pre[h][1][b] for h in holders]).mean(0)
                torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)
        if world > 1:
            assert any(len([h for h in range(world) if b in old[h]]) > 1 for b in range(n_blocks)) or world * k == n_blocks
    last = res[0]["history"][-1][1]
    for rank, r in enumerate(res):
        # A rank holds the shared layers plus exactly its k blocks: never a block it does not hold.
        assert r["n_slots"] == (k if kind != "sections" else sum(min(k, [n.split(".")[0] for n in names].count(s))
                                                                   for s in ("layer1", "layer2", "layer3", "layer4")))
        assert r["n_params"] == full - sum(size[b] for b in range(n_blocks) if b not in last[rank])
        assert r["opt_is_module"] and r["state_in_module"]
        assert r["memory"]["parameters"] == 4 * r["n_params"]
        assert r["memory"]["gradients"] == 4 * r["n_params"]
        assert r["memory"]["optimizer_state"] == 4 * r["n_params"]  # SGD momentum buffers
        assert r["scale"] == k / n_blocks


# ---- the assembled global network ------------------------------------------------------------
def _global(rank, world):
    import resist_det
    from resist_det.resist.adapters import branch_scale

    engine, *_ = resist_det.initialize(model=_net(seed=5, device="meta"), config=_cfg(local_steps=2, min_blocks=2))
    _train(engine, 4, torch.Generator().manual_seed(rank))  # ends right after the 2nd sync
    hooked = engine.global_model(dst=0, fold=False)
    folded = engine.global_model(dst=0)
    mine = {engine.block_names[b]: s.state_dict() for b, s in zip(engine.section.slot_blocks, engine.section.slots)}
    if hooked is None:
        return mine, None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    plain = _net()  # a fresh instance of the user's class takes the folded weights
    plain.load_state_dict(folded.state_dict())
    return mine, dict(
        hooked_out=hooked.eval()(x), folded_out=folded.eval()(x), plain_out=plain.eval()(x),
        hooked_state=hooked.state_dict(), folded_state=folded.state_dict(), folded_type=type(folded).__name__,
        hooked_scales={n: branch_scale(m) for n, m in hooked.layer3.named_children()},
        folded_scales={n: branch_scale(m) for n, m in folded.layer3.named_children()},
    )


def test_global_model(tmp_path):
    res = run_on_ranks(_global, 3, tmp_path)
    g = res[0][1]
    assert res[1][1] is None and res[2][1] is None  # only on dst
    ref = _net()
    assert g["folded_type"] == type(ref).__name__
    assert list(g["folded_state"]) == list(ref.state_dict()) == list(g["hooked_state"])  # the original keys
    for rank, (mine, _) in enumerate(res):
        for name, block_state in mine.items():
            for k, v in block_state.items():
                if v.is_floating_point():  # (the integer BN step counter stays local)
                    assert torch.equal(g["hooked_state"][f"{name}.{k}"], v), (rank, name, k)
    k = 2
    assert g["hooked_scales"] == {"0": 1.0, **{str(i): k / 6 for i in range(1, 7)}}
    assert set(g["folded_scales"].values()) == {1.0}  # folded: no hooks left
    # The scale sits in each partitioned block's last conv (pre-activation branch), nowhere else.
    for key, v in g["folded_state"].items():
        scaled = key.startswith("layer3.") and not key.startswith("layer3.0.") and key.endswith("conv2.weight")
        if scaled:
            torch.testing.assert_close(v, g["hooked_state"][key] * (k / 6), rtol=1e-6, atol=0, msg=key)
        else:
            assert torch.equal(v, g["hooked_state"][key]), key
    assert torch.isfinite(g["hooked_out"]).all()
    torch.testing.assert_close(g["folded_out"], g["hooked_out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g["plain_out"], g["hooked_out"], rtol=1e-5, atol=1e-6)


# ---- a degenerate plan is local SGD ----------------------------------------------------------
def _degenerate_vs_local_sgd(rank, world):
    import warnings

    import resist_det

    out = {}
    # 6 of 6 blocks: every rank holds every block.  "resist_meta": built on the meta device, as the
    # training loop builds ResIST models, materialised from resist.seed.
    for mode, min_blocks in (("resist", 6), ("local_sgd", None), ("resist_meta", 6)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net = _net(seed=5, device="meta") if mode == "resist_meta" else _net(seed=5)
            cfg = _cfg(mode=mode.removesuffix("_meta"), local_steps=2, min_blocks=min_blocks, seed=5)
            engine, *_ = resist_det.initialize(model=net, config=cfg)
        _train(engine, 5, torch.Generator().manual_seed(rank))
        engine.synchronize()
        out[mode] = dict(bytes=engine.bytes_sent, rounds=engine.round, state=engine.module.state_dict(),
                         warned=[str(w.message) for w in caught if "degenerates" in str(w.message)])
    return out


def test_degenerate_plan_syncs_exactly_as_local_sgd(tmp_path):
    res = run_on_ranks(_degenerate_vs_local_sgd, 2, tmp_path)
    for rank, r in enumerate(res):
        resist, local = r["resist"], r["local_sgd"]
        assert r["resist_meta"]["bytes"] == local["bytes"]
        assert all(torch.equal(r["resist_meta"]["state"][k], local["state"][k]) for k in local["state"])
        assert resist["rounds"] == local["rounds"] == 3
        assert resist["bytes"] == local["bytes"] > 0  # one all-reduce of everything, no routing
        assert resist["state"].keys() == local["state"].keys()  # the user's module, unchanged
        assert all(torch.equal(resist["state"][k], local["state"][k]) for k in local["state"])
        assert bool(resist["warned"]) == (rank == 0) and "this is local SGD" in "".join(resist["warned"] or ["this is local SGD"])


# ---- several sections: the global network -----------------------------------------------------
def _global_sections(rank, world):
    import resist_det

    engine, *_ = resist_det.initialize(model=_build("sections", 6), config=_cfg(local_steps=2, min_blocks=2, seed=3))
    _train(engine, 4, torch.Generator().manual_seed(rank))
    s = engine.strategy
    mine = {engine.block_names[b]: m.state_dict() for b, m in zip(s.slot_blocks, s.slots) if b is not None}
    net = engine.global_model(fold=False)
    return mine, (None if net is None else net.state_dict()), engine.residual_scale()


def test_global_model_with_several_sections(tmp_path):
    res = run_on_ranks(_global_sections, 2, tmp_path)
    state = res[0][1]
    fresh = _build("sections", 0)
    fresh.load_state_dict(state)  # the user's class and keys: every section whole again
    held = set()
    for mine, _, scale in res:
        assert scale == 4 / 7  # k / n: 4 of the 7 blocks per sub-ResNet
        for name, block_state in mine.items():
            held.add(name)
            for k, v in block_state.items():
                if v.is_floating_point():
                    assert torch.equal(state[f"{name}.{k}"], v), (name, k)
    assert held == set(SECTIONS_BLOCKS)


def _adam_sections(rank, world):
    import resist_det

    cfg = {**_cfg(local_steps=1, min_blocks=2, seed=3), "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, optimizer, *_ = resist_det.initialize(model=_build("sections", 6), config=cfg)
    gen = torch.Generator().manual_seed(rank)
    moved = 0
    for _ in range(6):  # six rounds: Adam's moments are averaged and routed with their blocks
        before = list(engine.strategy.slot_blocks)
        _train(engine, 1, gen)
        moved += sum(a != b for a, b in zip(before, engine.strategy.slot_blocks))
    s = engine.strategy
    moments = {b: torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in m.parameters()])
               for b, m in zip(s.slot_blocks, s.slots) if b is not None}
    empty_state = [p for b, m in zip(s.slot_blocks, s.slots) if b is None for p in m.parameters() if p in optimizer.state]
    return moved, moments, shared_snapshot(engine), empty_state


def test_adam_moments_travel_with_blocks_of_several_sections(tmp_path):
    res = run_on_ranks(_adam_sections, 2, tmp_path)
    assert sum(r[0] for r in res) > 0  # blocks changed slots (and empty slots filled) along the way
    for name, v in res[0][2].items():
        assert torch.equal(res[1][2][name], v), name
    common = set(res[0][1]) & set(res[1][1])
    assert common  # 2 x 4 slots over 7 blocks: one block is shared
    for b in common:  # a shared block's moments: the same average on both holders
        assert torch.equal(res[0][1][b], res[1][1][b]), b
    assert res[0][3] == [] and res[1][3] == []  # empty slots keep no optimizer state


# ---- bad input, before any training ---------------------------------------------------------
def _expect_error(rank, world, cfg_by_rank, layers):
    import resist_det

    try:
        resist_det.initialize(model=_net(layers=layers), config=cfg_by_rank[rank % len(cfg_by_rank)])
    except (ValueError, TypeError) as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "cfgs,layers,world,msg",
    [
        ([_cfg(min_blocks=7)], LAYERS, 2, "min_blocks must be between 1 and the number of partitionable blocks \\(6\\)"),
        ([_cfg(local_steps=0)], LAYERS, 1, "resist.local_steps: Input should be greater than or equal to 1"),
        ([_cfg(sections=["layer9"])], LAYERS, 1, "resist.sections: 'layer9' names no module"),
        ([_cfg(sections=["layer2", "layer3"])], LAYERS, 1, "resist.sections: 'layer2' has no partitionable block"),
        ([_cfg(sections=["layer3"], block_pattern="layer3.1")], LAYERS, 1, "give one of them"),
        ([_cfg(local_stepz=3)], LAYERS, 1, "resist.local_stepz: unknown key"),
        ([_cfg(mode="fast")], LAYERS, 1, "resist.mode"),
        ([_cfg(local_steps=5), _cfg(local_steps=6)], LAYERS, 2, "different 'resist' config sections"),
        ([_cfg()], [1, 1, 1, 1], 1, "no partitionable blocks.*use resist.mode 'local_sgd'"),
        ([{**_cfg(), "bf16": {"enabled": True}}], LAYERS, 1, "bf16.enabled is not supported.*BF16_Optimizer partitions.*torch.autocast"),
        ([{**_cfg(), "fp16": {"enabled": True}}], LAYERS, 1, "fp16.enabled is not supported.*stale master copies"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, cfgs, layers, world, msg):
    import re

    errors = run_on_ranks(_expect_error, world, tmp_path, cfgs, layers)
    assert all(e is not None and re.search(msg, e) for e in errors), errors


# ---- evaluation through the engine scores the whole network -----------------------------------
def _test_through_engine(model_engine, gen):
    """As DeepSpeed's CIFAR example's test(): eval(), forward through the engine, train()."""
    model_engine.eval()
    x, _ = _batch(gen, n=16)
    with torch.no_grad():
        out = model_engine(x)
    model_engine.train()
    return out


def _eval_through_engine(rank, world):
    import resist_det

    engine, *_ = resist_det.initialize(model=_build("stock", 3), config=_cfg(local_steps=2, min_blocks=1, seed=3))
    _train(engine, 3, torch.Generator().manual_seed(rank))  # mid-round
    through = _test_through_engine(engine, torch.Generator().manual_seed(9))
    training = engine.module.training
    whole = [engine.global_model(dst=d) for d in range(world)][rank]  # evaluated separately, on this rank
    x = _batch(torch.Generator().manual_seed(9), n=16)[0]
    whole.eval()
    engine.module.eval()  # this rank's sub-network, for contrast (eval: its BN statistics stay)
    with torch.no_grad():
        direct, sub = whole(x), engine.module(x)
    return through, direct, sub, training


def test_eval_through_the_engine_scores_the_global_network(tmp_path):
    """A script that evaluates through the engine (model_engine.eval(); model_engine(x)) gets the
    whole network on every rank, equal to global_model() evaluated separately; train() returns
    to the sub-network."""
    res = run_on_ranks(_eval_through_engine, 2, tmp_path)
    for through, direct, sub, training in res:
        assert torch.equal(through, direct)
        assert not torch.allclose(through, sub)
        assert training
    assert torch.equal(res[0][0], res[1][0])
