"""The local-SGD warm-up of a ResIST run (paper section 2.6 and its footnote 2), on real gloo ranks.

During the warm-up every rank holds the whole network, its partitioned blocks scaled as in
the global network, and a sync averages everything: exactly mode ``local_sgd`` on a network
whose partitionable blocks carry that scale.  At the switch each rank keeps its plan-round-0
group, unscaled, and frees the rest; checkpoints taken on either side of the switch resume
to the weights of an uninterrupted run.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from helpers import LAYERS, block_snapshot, ds_config, preact_net, shared_snapshot

N_BLOCKS = LAYERS[2] - 1
WORLD = 2
MIN_BLOCKS = 4  # k = 4 of 6 per rank: some blocks are shared, scale k/n = 2/3 (not 1/S)
K = 4
SCALE = K / N_BLOCKS
LOCAL_STEPS = 2
WARMUP = 3  # not a multiple of LOCAL_STEPS: a sync is forced at step 3
SEED = 7


def _net(device=None):
    # On the meta device, initialize() materialises each unit from resist.seed: the same weights.
    return preact_net(seed=SEED, device=device, layers=LAYERS)


def _cfg(**resist):
    return ds_config(lr=0.1, sgd_momentum=0.9, **{"local_steps": LOCAL_STEPS, "min_blocks": MIN_BLOCKS, "momentum": "keep",
                                                  "seed": SEED, **resist})


WARMUP_CFG = dict(mode="resist", warmup_local_sgd_steps=WARMUP)


def _step(engine, rank, step):
    """One optimizer step on a batch that depends only on (rank, step): resumable data."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()


def _train(engine, rank, start, stop):
    for step in range(start, stop):
        _step(engine, rank, step)


def _floats(state):
    return {k: v.clone() for k, v in state.items() if v.is_floating_point()}


_blocks, _shared = block_snapshot, shared_snapshot


# ---- warm-up = local SGD with scaled blocks; the switch; ResIST after it ------------------------
def _warmup_and_switch(rank, world):
    from resist_det import initialize
    from resist_det.resist.engine import memory_footprint
    from resist_det.resist.adapters import branch_scale, set_branch_scale
    from resist_det.resist.plan import make_plan

    out = {}
    # The reference: mode local_sgd on the same network, partitionable blocks scaled by k/n.
    ref_net = _net()
    for i in range(1, N_BLOCKS + 1):
        set_branch_scale(ref_net.layer3[i], SCALE)
    ref, *_ = initialize(model=ref_net, config=_cfg(mode="local_sgd"))
    engine, optimizer, *_ = initialize(model=_net(device="meta"), config=_cfg(**WARMUP_CFG))
    block_numel = sum(p.numel() for p in engine.section.slots[0].parameters())

    # Warm-up: the whole network on every rank, blocks scaled, everything averaged at each sync.
    out["warmup_slots"] = list(engine.section.slot_blocks)
    out["warmup_scales"] = [branch_scale(s) for s in engine.section.slots]
    out["warmup_params"] = sum(p.numel() for p in engine.module.parameters())
    _train(engine, rank, 0, 2)
    _train(ref, rank, 0, 2)
    out["after_first_sync"] = (engine.round, engine.in_warmup)
    net = engine.global_model(fold=False)  # every rank holds every block: nothing to gather
    out["warmup_global"] = (_floats(net.state_dict()), branch_scale(net.layer3[1])) if net is not None else None
    out["warmup_ref"] = _floats(ref.module.state_dict())
    out["warmup_slot_values"] = _blocks(engine)
    memory_before = memory_footprint(engine)
    refs = {b: [weakref.ref(p) for p in s.parameters()] for b, s in zip(engine.section.slot_blocks, engine.section.slots)}

    # Step WARMUP = 3: a sync is forced there (mid-round), everything is averaged, then the switch.
    _step(ref, rank, 2)
    ref.synchronize()
    out["ref_at_switch"] = _floats(ref.module.state_dict())
    _step(engine, rank, 2)
    gc.collect()
    memory_at_switch = memory_footprint(engine)
    out["switched"] = (engine.in_warmup, engine.round, engine.resist_start, engine.steps, engine.local_step)
    out["plan0"] = make_plan(SEED, 0, world, N_BLOCKS, MIN_BLOCKS).groups
    out["engine_plan"] = engine.plan.groups
    out["slots"] = list(engine.section.slot_blocks)
    out["switch_values"] = _blocks(engine)
    out["switch_shared"] = _shared(engine)
    out["freed"] = {b: [r() is None for r in rs] for b, rs in refs.items()}
    out["n_params"] = sum(p.numel() for p in engine.module.parameters())
    out["block_numel"] = block_numel
    out["slot_scales"] = [branch_scale(s) for s in engine.section.slots]

    # ResIST rounds: DeepSpeed steps, the sync invariants of a round hold.
    _step(engine, rank, 3)
    before = (_shared(engine), _blocks(engine), engine.plan.groups)
    engine.synchronize()
    out["round1"] = (before, (_shared(engine), _blocks(engine), engine.plan.groups))
    out["plan1"] = make_plan(SEED, 1, world, N_BLOCKS, MIN_BLOCKS).groups
    _train(engine, rank, 4, 6)  # a sync after these two steps
    module_params = {id(p) for p in engine.module.parameters()}
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out["opt_is_module"] = opt_params == module_params and len(opt_params) == len([p for g in optimizer.param_groups for p in g["params"]])
    out["state_in_module"] = set(map(id, optimizer.state)) <= module_params and len(optimizer.state) > 0
    out["names_are_module"] = {n: id(p) for p, n in engine.param_names.items()} == {n: id(p) for n, p in engine.module.named_parameters()}
    out["memory"] = (memory_before, memory_at_switch, memory_footprint(engine))
    out["train_scales"] = [branch_scale(s) for s in engine.section.slots]
    net = engine.global_model(fold=False)
    out["global_scales"] = {f"layer3.{n}": branch_scale(m) for n, m in net.layer3.named_children()} if net is not None else None
    return out


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    return run_on_ranks(_warmup_and_switch, WORLD, tmp_path_factory.mktemp("warmup"), timeout=240)


def test_warmup_equals_local_sgd_with_scaled_blocks(warmup_run):
    res = warmup_run
    full = sum(p.numel() for p in _net().parameters())
    for r in res:
        assert r["warmup_slots"] == list(range(N_BLOCKS))  # the whole network on every rank
        assert r["warmup_scales"] == [SCALE] * N_BLOCKS  # footnote 2: section-3 blocks scaled
        assert r["warmup_params"] == full
        assert r["after_first_sync"] == (1, True)
    # Global network during the warm-up: this rank's network, blocks at the warm-up scale.
    state, scale = res[0]["warmup_global"]
    assert scale == SCALE
    for name, v in res[0]["warmup_ref"].items():
        assert torch.equal(state[name], v), name
    # Every tensor was averaged: identical on both ranks, identical to local SGD, bit for bit.
    for r in res:
        assert r["warmup_ref"].keys() == res[0]["warmup_ref"].keys()
        for name, v in r["warmup_ref"].items():
            assert torch.equal(v, res[0]["warmup_ref"][name]), name
        assert all(torch.equal(v, res[0]["warmup_slot_values"][b]) for b, v in r["warmup_slot_values"].items())
    # At the switch (step WARMUP, forced sync), the kept blocks and the shared layers hold the
    # averaged local-SGD weights.
    for rank, r in enumerate(res):
        ref = r["ref_at_switch"]
        assert len(r["switch_shared"]) == len(ref) - N_BLOCKS * len(_block_keys())
        for name, v in r["switch_shared"].items():
            assert torch.equal(v, ref[name.replace("layer3.fixed.0.", "layer3.0.")]), name
        for b, v in r["switch_values"].items():
            want = torch.cat([ref[f"layer3.{b + 1}.{k}"].flatten() for k in _block_keys()])
            assert torch.equal(v, want), (rank, b)


def _block_keys():
    # The order of sync.block_tensors: parameters, then floating-point buffers.
    blk = _net().layer3[1]
    return [n for n, _ in blk.named_parameters()] + [n for n, b in blk.named_buffers() if b.is_floating_point()]


def test_switch_keeps_round0_group_and_frees_the_rest(warmup_run):
    res = warmup_run
    full = sum(p.numel() for p in _net().parameters())
    for rank, r in enumerate(res):
        plan0 = r["plan0"]
        assert r["switched"] == (False, 2, 2, WARMUP, 0)  # syncs at steps 2 and 3; ResIST round 0 = round 2
        assert r["engine_plan"] == plan0
        assert sorted(r["slots"]) == list(plan0[rank]) and len(r["slots"]) == K
        assert r["n_params"] == full - (N_BLOCKS - K) * r["block_numel"]
        # Every parameter of a dropped block is freed (nothing keeps it alive); kept ones live on.
        assert r["freed"] == {b: [b not in plan0[rank]] * len(r["freed"][b]) for b in range(N_BLOCKS)}
        assert r["slot_scales"] == [1.0] * K  # ResIST trains unscaled blocks
        assert r["train_scales"] == [1.0] * K
        assert r["opt_is_module"] and r["state_in_module"] and r["names_are_module"]
        # Memory counted from the tensors: parameters and momentum of the dropped blocks are gone.
        before, at_switch, later = r["memory"]
        removed_bytes = 4 * (N_BLOCKS - K) * r["block_numel"]
        assert before["parameters"] - at_switch["parameters"] == removed_bytes
        assert before["optimizer_state"] - at_switch["optimizer_state"] == removed_bytes  # SGD momentum buffers
        assert at_switch["parameters"] == later["parameters"] == 4 * r["n_params"]
        assert later["gradients"] <= 4 * r["n_params"]
    # The first ResIST sync: shared tensors = the mean, blocks = the mean over their holders.
    old = res[0]["round1"][0][2]
    assert old == res[0]["plan0"]
    assert all(r["round1"][1][2] == res[0]["plan1"] for r in res)
    pre = [r["round1"][0] for r in res]
    post = [r["round1"][1] for r in res]
    for name in pre[0][0]:
        mean = torch.stack([p[0][name] for p in pre]).mean(0)
        for q in post:
            torch.testing.assert_close(q[0][name], mean, rtol=1e-6, atol=1e-7, msg=name)
            assert torch.equal(q[0][name], post[0][0][name])
    for rank, q in enumerate(post):
        assert sorted(q[1]) == list(res[0]["plan1"][rank])
        for b, value in q[1].items():
            holders = [h for h in range(WORLD) if b in old[h]]
            mean = torch.stack([pre[h][1][b] for h in holders]).mean(0)
            torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)
    scales = res[0]["global_scales"]
    assert scales["layer3.0"] == 1.0 and all(scales[f"layer3.{i}"] == SCALE for i in range(1, N_BLOCKS + 1))


# ---- checkpoints on either side of the switch resume to the same weights ----------------------
STEPS = 9
SAVE_AT = {"warmup": 1, "resist": 6}  # after this many steps: mid-round in the warm-up / after the switch (step 3)


def _sections_net(device=None):
    """A stock torchvision ResNet partitioned in every section (7 blocks of 4 sizes)."""
    from helpers import stock_net

    with torch.device(device or "cpu"):
        return stock_net(seed=SEED, layers=(2, 3, 4, 2))


def _resume(rank, world, ckpt, kind="preact"):
    from resist_det import initialize

    def build():
        net = _net(device="meta") if kind == "preact" else _sections_net(device="meta")
        return initialize(model=net, config=_cfg(**WARMUP_CFG))[0]

    engine = build()
    for step in range(STEPS):
        _step(engine, rank, step)
        for phase, at in SAVE_AT.items():
            if step + 1 == at:
                engine.save_checkpoint(ckpt, tag=phase)
                assert engine.in_warmup == (phase == "warmup")
    want = _floats(engine.module.state_dict())
    want_state = engine.state_dict()
    want_params = sum(p.numel() for p in engine.module.parameters())
    try:
        engine.load_checkpoint(ckpt, tag="warmup")  # refused: this engine has switched
        refused = None
    except ValueError as e:
        refused = str(e)
    got = {}
    for phase, at in SAVE_AT.items():
        engine = build()
        engine.load_checkpoint(ckpt, tag=phase)
        assert engine.steps == at and engine.in_warmup == (phase == "warmup")
        _train(engine, rank, at, STEPS)
        got[phase] = (_floats(engine.module.state_dict()), engine.state_dict(), sum(p.numel() for p in engine.module.parameters()))
    return want, want_state, got, refused, want_params


def test_resume_with_several_sections(tmp_path):
    """Slots of four sections, empty ones among them: a checkpoint on either side of the switch
    resumes bit-identical to the uninterrupted run."""
    res = run_on_ranks(_resume, WORLD, tmp_path, str(tmp_path / "ckpt"), "sections", timeout=240)
    for want, want_state, got, refused, want_params in res:
        assert refused is not None
        assert None in want_state["strategy"]["slot_blocks"] or len(want_state["strategy"]["slot_blocks"]) == K
        for phase, (state, resist_state, n_params) in got.items():
            assert n_params == want_params < sum(p.numel() for p in _sections_net().parameters()), phase
            assert resist_state == want_state, phase
            assert state.keys() == want.keys(), phase
            for k in want:
                assert torch.equal(state[k], want[k]), (phase, k)


def test_resume_on_either_side_of_the_switch(tmp_path):
    res = run_on_ranks(_resume, WORLD, tmp_path, str(tmp_path / "ckpt"), timeout=240)
    block = sum(p.numel() for p in _net().layer3[1].parameters())
    full = sum(p.numel() for p in _net().parameters())
    for want, want_state, got, refused, _ in res:
        assert refused is not None and "saved during the local-SGD warm-up" in refused
        for phase, (state, resist_state, n_params) in got.items():
            assert n_params == full - (N_BLOCKS - K) * block, phase
            assert resist_state == want_state, phase  # round, steps, switch round, slot blocks, bytes
            assert state.keys() == want.keys(), phase
            for k in want:
                assert torch.equal(state[k], want[k]), (phase, k)
