"""``resist_det.initialize`` takes every way ``deepspeed.initialize`` is called (2 gloo ranks).

In each form the rank ends up holding only its own blocks: module, optimizer groups, gradients
and optimizer state are counted against the sub-ResNet's parameters.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from helpers import LAYERS, batch, ds_config, preact_net

N_BLOCKS, MIN_BLOCKS = LAYERS[2] - 1, 2


def _holdings(engine, optimizer, micro=1):
    """Counts of what the rank holds after one optimizer step (``micro`` micro-batches) and one more backward."""
    gen = torch.Generator().manual_seed(engine.rank)
    for i in range(micro + 1):
        x, y = batch(gen)
        engine.backward(F.cross_entropy(engine(x), y))
        if i < micro:
            engine.step()
    module = {id(p) for p in engine.module.parameters()}
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    return dict(
        params=sum(p.numel() for p in engine.module.parameters()),
        groups_are_module=set(in_groups) == module and len(in_groups) == len(module),
        grads_in_module={id(p) for p in engine.module.parameters() if p.grad is not None} <= module,
        state_in_module={id(p) for p in optimizer.state} <= module and len(optimizer.state) > 0,
        slots=len(engine.section.slots),
    )


def _forms(rank, world, cfg_path):
    import resist_det

    out = {}
    cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=2, min_blocks=MIN_BLOCKS)

    # DeepSpeed's positional order, config from args.deepspeed_config (the --deepspeed_config flag).
    net = preact_net()
    args = argparse.Namespace(deepspeed_config=cfg_path, local_rank=rank)
    engine, opt, _, _ = resist_det.initialize(args, net, None, net.parameters())
    out["positional_args"] = _holdings(engine, opt)
    out["args_untouched"] = args.deepspeed_config == cfg_path

    # The older flag name, keyword style.
    net = preact_net()
    engine, opt, _, _ = resist_det.initialize(args=argparse.Namespace(deepscale_config=cfg_path), model=net,
                                              model_parameters=net.parameters())
    out["deepscale_config"] = _holdings(engine, opt)

    # Parameter groups: weight decay on weights, none on norms and biases; options survive.
    net = preact_net()
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    engine, opt, _, _ = resist_det.initialize(model=net, model_parameters=groups, config_params=cfg)
    out["groups"] = _holdings(engine, opt)
    out["group_decay"] = [g["weight_decay"] for g in opt.param_groups]

    # A client optimizer and scheduler: filtered in place, the scheduler still drives it.
    net = preact_net()
    client = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(client, step_size=1, gamma=0.5)
    no_opt_cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    engine, opt, _, lr_sched = resist_det.initialize(model=net, optimizer=client, lr_scheduler=sched, config=no_opt_cfg)
    out["client"] = _holdings(engine, opt)
    out["client_same"] = opt is client and lr_sched is sched and sched.optimizer is client
    lr_sched.step()
    out["client_lr"] = [g["lr"] for g in client.param_groups]

    # DeepSpeed's WarmupLR from the config, and gradient accumulation (rounds count optimizer steps).
    net = preact_net()
    acc_cfg = {**cfg, "gradient_accumulation_steps": 2,
               "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05, "warmup_num_steps": 4}}}
    engine, opt, _, lr_sched = resist_det.initialize(model=net, model_parameters=net.parameters(), config=acc_cfg)
    gen, lrs = torch.Generator().manual_seed(rank), []
    for _ in range(8):  # 8 micro-batches = 4 optimizer steps = 2 rounds of 2 local steps
        x, y = batch(gen)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
        lrs.append(opt.param_groups[0]["lr"])
    out["accumulation"] = (engine.global_steps, engine.round, lrs)
    out["accumulation_holdings"] = _holdings(engine, opt, micro=2)
    return out


def test_every_call_form(tmp_path):
    cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=2, min_blocks=MIN_BLOCKS)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    res = run_on_ranks(_forms, 2, tmp_path, str(path), timeout=300)
    full = sum(p.numel() for p in preact_net().parameters())
    block = sum(p.numel() for p in preact_net().layer3[1].parameters())
    k = max(-(-N_BLOCKS // 2), MIN_BLOCKS)
    for r in res:
        for form in ("positional_args", "deepscale_config", "groups", "client", "accumulation_holdings"):
            h = r[form]
            assert h["slots"] == k and h["params"] == full - (N_BLOCKS - k) * block, form
            assert h["groups_are_module"] and h["grads_in_module"] and h["state_in_module"], form
        assert r["args_untouched"]
        assert r["group_decay"] == [5e-4, 0.0]
        assert r["client_same"] and r["client_lr"] == [0.025]  # 0.1, halved at DeepSpeed's step and at ours
        steps, rounds, lrs = r["accumulation"]
        assert (steps, rounds) == (4, 2)
        assert lrs[1] < lrs[3] < lrs[5] and lrs[0] == lrs[1]  # WarmupLR moves at optimizer steps only


# ---- optimizer state at a sync, by optimizer kind; ResIST's figures in DeepSpeed's monitor --------
def _state_at_sync(rank, world, log_dir):
    import warnings

    import resist_det
    from helpers import train_steps

    out = {}
    adam = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    runs = (("sgd_auto", None, "auto"), ("adam_auto", adam, "auto"), ("adam_keep", adam, "keep"), ("adam_restart", adam, "restart"))
    for name, optimizer, momentum in runs:
        cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=2, min_blocks=MIN_BLOCKS, momentum=momentum)
        if optimizer:
            cfg["optimizer"] = optimizer
        if name == "sgd_auto":
            cfg["csv_monitor"] = {"enabled": True, "output_path": log_dir, "job_name": "resist"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, opt, *_ = resist_det.initialize(model=preact_net(), config=cfg)
        out[f"{name}_warned"] = any("wipes the optimizer's moment estimates" in str(w.message) for w in caught)
        gen = torch.Generator().manual_seed(rank)
        train_steps(engine, 1, gen)
        before = list(engine.section.slot_blocks)
        train_steps(engine, 1, gen)  # the round ends: a sync
        slot_params = {id(p) for p in engine.section.slots.parameters()}
        shared = [p for p in engine.module.parameters() if id(p) not in slot_params]
        out[name] = dict(
            empty=len(opt.state) == 0,
            shared_with_state=all(p in opt.state for p in shared),
            # per slot: (the block changed at the sync, its parameters have optimizer state)
            slots=[(a != b, all(p in opt.state for p in s.parameters()))
                   for a, b, s in zip(before, engine.section.slot_blocks, engine.section.slots)],
            shared_exp_avg=[opt.state[p]["exp_avg"].clone() for p in shared if p in opt.state] if optimizer else [],
        )
    return out


def test_optimizer_state_by_kind_and_monitor(tmp_path):
    import csv

    res = run_on_ranks(_state_at_sync, 2, tmp_path, str(tmp_path / "monitor"))
    for rank, r in enumerate(res):
        assert r["adam_restart"]["empty"]  # the paper's momentum restart: everything cleared
        # keep (SGD's auto, and Adam's when asked): state kept for everything that stayed, fresh for
        # blocks that arrived.
        for name in ("sgd_auto", "adam_keep"):
            assert r[name]["shared_with_state"] and not r[name]["empty"]
            assert all(has_state == (not changed) for changed, has_state in r[name]["slots"])
        # Adam with auto (= average): every parameter has moments, arrived blocks included, and the
        # shared layers' moments are the same on every rank.
        assert r["adam_auto"]["shared_with_state"] and all(has_state for _, has_state in r["adam_auto"]["slots"])
        assert all(torch.equal(a, b) for a, b in zip(r["adam_auto"]["shared_exp_avg"], res[0]["adam_auto"]["shared_exp_avg"]))
        assert r["adam_restart_warned"] == (rank == 0) and not r["adam_auto_warned"] and not r["sgd_auto_warned"]
    for name in ("sgd_auto", "adam_keep"):  # the checks above saw an arrival
        assert any(changed for r in res for changed, _ in r[name]["slots"])
    assert len(res[0]["adam_auto"]["shared_exp_avg"]) > 0
    rows = list(csv.reader(open(tmp_path / "monitor" / "resist" / "ResIST_bytes_sent_round.csv")))
    assert rows[0] == ["step", "bytes_sent_round"] and len(rows) == 2 and int(rows[1][1]) > 0
    assert (tmp_path / "monitor" / "resist" / "ResIST_sync_seconds.csv").is_file()


def _autocast_bf16(rank, world):
    import resist_det
    from helpers import shared_snapshot

    engine, *_ = resist_det.initialize(model=preact_net(), config=ds_config(local_steps=2, min_blocks=MIN_BLOCKS))
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = batch(gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
    return engine.round, shared_snapshot(engine), {n: p.dtype for n, p in engine.module.named_parameters()}


def test_bf16_autocast_keeps_sync_invariants(tmp_path):
    res = run_on_ranks(_autocast_bf16, 2, tmp_path)
    assert all(r[0] == 1 for r in res)
    assert set(res[0][2].values()) == {torch.float32}  # fp32 weights, bf16 compute
    assert all(torch.equal(v, res[0][1][k]) for r in res for k, v in r[1].items())


def _moments_travel(rank, world):
    import resist_det
    from helpers import train_steps

    cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=10**6, min_blocks=4, momentum="average")
    engine, opt, *_ = resist_det.initialize(model=preact_net(), config=cfg)
    train_steps(engine, 2, torch.Generator().manual_seed(rank))

    def snapshot():
        slot_ids = {id(p) for p in engine.section.slots.parameters()}
        blocks = {b: torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in s.parameters()]).clone()
                  for b, s in zip(engine.section.slot_blocks, engine.section.slots)}
        shared = [opt.state[p]["momentum_buffer"].clone() for p in engine.module.parameters() if id(p) not in slot_ids]
        return blocks, shared

    before, plan = snapshot(), engine.plan.groups
    engine.synchronize()
    return plan, before, snapshot()


def test_average_moves_moments_with_the_weights(tmp_path):
    res = run_on_ranks(_moments_travel, 2, tmp_path)
    old = res[0][0]
    for plan, before, after in res:
        for b, value in after[0].items():  # each block's momentum = the mean over its previous holders
            holders = [h for h in range(2) if b in old[h]]
            torch.testing.assert_close(value, torch.stack([res[h][1][0][b] for h in holders]).mean(0), rtol=1e-6, atol=1e-8)
        for mine, ref in zip(after[1], res[0][2][1]):  # shared momentum: identical, the mean of the ranks'
            assert torch.equal(mine, ref)
    assert any(len([h for h in range(2) if b in old[h]]) == 2 for b in range(N_BLOCKS))  # some block was shared
