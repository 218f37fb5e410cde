"""The plain-PyTorch shell (resist_det.torch.prepare) against references: plain training (S = 1),
torch's DistributedDataParallel (local SGD, L = 1), the means of a sync, the DeepSpeed engine
bit for bit, the global network for evaluation, and GradScaler's skipped steps.  Real gloo ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from helpers import batch, block_snapshot, ds_config, preact_net, shared_snapshot


def _loop(model, optimizer, steps, gen, scaler=None, inf_at=None):
    """A plain training loop: ``steps`` iterations of cross-entropy on random batches."""
    for i in range(steps):
        x, y = batch(gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
            continue
        scaler.scale(loss).backward()
        if i == inf_at:  # an overflow on this rank only
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()


def _prepared(resist, seed=1, momentum=0.9, lr=0.05, **net_kwargs):
    import resist_det.torch

    net = preact_net(seed=seed, **net_kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    return resist_det.torch.prepare(net, opt, resist=resist)


def _s1_vs_plain(rank, world):
    model, opt = _prepared({"local_steps": 3, "min_blocks": 1, "momentum": "keep", "seed": 1})
    ref = preact_net(seed=1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _loop(model, opt, 7, torch.Generator().manual_seed(0))
    _loop(ref, ref_opt, 7, torch.Generator().manual_seed(0))
    model.synchronize()
    return model.core.schedule.rounds, model.global_model().state_dict(), ref.state_dict()


def test_single_worker_equals_plain_training(tmp_path):
    [(rounds, got, want)] = run_on_ranks(_s1_vs_plain, 1, tmp_path)
    assert rounds == 3
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def _local_sgd_vs_ddp(rank, world, momentum, rule="auto"):
    from torch.nn.parallel import DistributedDataParallel

    model, opt = _prepared({"mode": "local_sgd", "local_steps": 1, "momentum": rule}, seed=2, momentum=momentum, lr=0.1)
    _loop(model, opt, 4, torch.Generator().manual_seed(100 + rank))
    ddp = DistributedDataParallel(preact_net(seed=2))
    _loop(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=momentum), 4, torch.Generator().manual_seed(100 + rank))
    return dict(model.module.named_parameters()), dict(ddp.module.named_parameters())


def test_local_sgd_one_step_equals_ddp(tmp_path):
    for ours, ddp in run_on_ranks(_local_sgd_vs_ddp, 2, tmp_path, 0.0):
        assert ours.keys() == ddp.keys()
        for k in ddp:
            torch.testing.assert_close(ours[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)


def test_local_sgd_one_step_with_momentum_equals_ddp(tmp_path):
    """SGD's step is linear in its momentum buffer, so averaging the weights every step gives DDP's
    trajectory whether the buffers are averaged or kept per rank; restarting them does not."""
    # Averaged buffers and DDP's buffer of averaged gradients round differently (1.8e-6 after 4
    # steps at lr 0.1), so the tolerance is wider than above.
    tol = dict(rtol=1e-4, atol=1e-5)
    for rule in ("average", "keep", "auto", "restart"):  # auto: keep, for SGD
        res = run_on_ranks(_local_sgd_vs_ddp, 2, tmp_path / rule, 0.9, rule)
        close = all(torch.allclose(ours[k], ddp[k], **tol) for ours, ddp in res for k in ddp)
        assert close == (rule != "restart"), rule


def _view(model, opt=None):
    """What the engine helpers read (module, strategy, optimizer), from the plain shell."""
    return SimpleNamespace(module=model.module, strategy=model.core.strategy, optimizer=opt and opt.optim)


def _sync_rounds(rank, world, amp):
    from resist_det.resist.engine import memory_footprint

    model, opt = _prepared({"local_steps": 10**6, "min_blocks": 2, "seed": 4})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    gen = torch.Generator().manual_seed(rank)
    history = []
    for t in range(3):
        steps_before = model.core.schedule.steps
        _loop(model, opt, 2, gen, scaler=scaler, inf_at=1 if (amp and t == 1 and rank == 1) else None)
        taken = model.core.schedule.steps - steps_before
        before = (shared_snapshot(_view(model)), block_snapshot(_view(model)))
        old = model.core.strategy.plan.groups
        model.synchronize()
        history.append((taken, old, model.core.strategy.plan.groups, before,
                        (shared_snapshot(_view(model)), block_snapshot(_view(model)))))
    held = {id(p) for p in model.module.parameters() if p.numel()}
    _loop(model, opt, 1, gen)
    return dict(history=history, memory=memory_footprint(_view(model, opt)),
                n_params=sum(p.numel() for p in model.module.parameters()),
                state_in_module={id(p) for p in opt.state} <= held)


@pytest.mark.parametrize("world,amp", [(2, False), (4, False), (2, True)])
def test_sync_invariants(tmp_path, world, amp):
    """After each sync: shared tensors identical everywhere and the mean of the pre-sync copies;
    each block the mean over its previous holders; a rank holds only its blocks.  With a
    GradScaler and an inf gradient on rank 1 in round 1, that step is skipped on every rank."""
    res = run_on_ranks(_sync_rounds, world, tmp_path, amp, timeout=300)
    full = sum(p.numel() for p in preact_net().parameters())
    for t in range(3):
        taken = {r["history"][t][0] for r in res}
        assert taken == ({1} if amp and t == 1 else {2}), taken
        old, new = res[0]["history"][t][1], res[0]["history"][t][2]
        pre = [r["history"][t][3] for r in res]
        post = [r["history"][t][4] for r in res]
        for name in pre[0][0]:
            mean = torch.stack([p[0][name] for p in pre]).mean(0)
            for q in post:
                assert torch.equal(q[0][name], post[0][0][name]), name
            torch.testing.assert_close(post[0][0][name], mean, rtol=1e-6, atol=1e-7, msg=name)
        for rank, q in enumerate(post):
            assert sorted(q[1]) == list(new[rank])
            for b, value in q[1].items():
                holders = [h for h in range(world) if b in old[h]]
                torch.testing.assert_close(value, torch.stack([pre[h][1][b] for h in holders]).mean(0), rtol=1e-6, atol=1e-7)
    for r in res:
        assert r["n_params"] < full and r["state_in_module"]
        assert r["memory"]["parameters"] == r["memory"]["gradients"] == r["memory"]["optimizer_state"] == 4 * r["n_params"]


def _shell_vs_engine(rank, world):
    import resist_det

    cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=3, min_blocks=2, seed=7)
    engine, *_ = resist_det.initialize(model=preact_net(seed=3), config=cfg)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(8):
        x, y = batch(gen)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    model, opt = _prepared(cfg["resist"], seed=3, lr=0.05)
    _loop(model, opt, 8, torch.Generator().manual_seed(rank))
    return engine.module.state_dict(), model.module.state_dict()


def test_plain_shell_trains_what_the_deepspeed_engine_trains(tmp_path):
    for engine_weights, shell_weights in run_on_ranks(_shell_vs_engine, 2, tmp_path):
        assert engine_weights.keys() == shell_weights.keys()
        for k, v in engine_weights.items():
            assert torch.equal(v, shell_weights[k]), k


def _evaluate(model, gen):
    x, y = batch(gen, n=16)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item(), model(x)


def _eval_through_the_model(rank, world):
    # Two partitioned sections: a rank's share of each changes between rounds, so the sync that
    # ends the round inside evaluate() gives empty slots new storage (not inference tensors).
    model, opt = _prepared({"local_steps": 2, "min_blocks": 2, "seed": 3, "sections": ["layer2", "layer3"]},
                           layers=[1, 4, 4, 1])
    _loop(model, opt, 3, torch.Generator().manual_seed(rank))  # mid-round
    with torch.inference_mode():  # as torchvision's detection reference evaluates
        model.eval()
        _, through = _evaluate(model, torch.Generator().manual_seed(9))
    model.train()
    whole = model.global_model(dst=0)
    sub_out = model.module(batch(torch.Generator().manual_seed(9), n=16)[0])
    _loop(model, opt, 3, torch.Generator().manual_seed(rank))  # training (and a sync) go on after that evaluation
    if whole is None:
        return None
    whole.eval()
    _, direct = _evaluate(whole, torch.Generator().manual_seed(9))
    return through, direct, sub_out.detach()


def test_eval_through_the_model_scores_the_global_network(tmp_path):
    res = run_on_ranks(_eval_through_the_model, 2, tmp_path)
    through, direct, sub = res[0]
    assert res[1] is None
    assert torch.equal(through, direct)
    assert not torch.allclose(through, sub)  # rank 0's sub-network answers differently


def _bad(rank, world, case):
    import resist_det.torch
    from torch.nn.parallel import DistributedDataParallel

    net = preact_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    try:
        if case == "ddp-wrapped":
            resist_det.torch.prepare(DistributedDataParallel(net), opt)
        elif case == "foreign":
            resist_det.torch.prepare(net, torch.optim.SGD(preact_net().parameters(), lr=0.1))
        elif case == "node":
            resist_det.torch.prepare(net, opt, resist={"topology": "node"})
        elif case == "bad-key":
            resist_det.torch.prepare(net, opt, resist={"local_step": 5})
    except (ValueError, TypeError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("case,msg", [
    ("ddp-wrapped", "prepare(model): got a DistributedDataParallel-wrapped model; pass the bare module"),
    ("foreign", "of its parameters are not the model's; build the optimizer over model.parameters()"),
    ("node", "resist.topology 'node' needs DeepSpeed's data-parallel groups"),
    ("bad-key", "resist.local_step: unknown key"),
])
def test_bad_input_is_one_line(tmp_path, case, msg):
    res = run_on_ranks(_bad, 2, tmp_path, case)
    assert all(r is not None and msg in r for r in res), res
