"""Bytes from DeepSpeed's comms logger under the project's costing: hand-made logs, and real gloo ranks."""

import pytest
import torch

from distributed import run_on_ranks
from helpers import ds_config, preact_net, train_steps
from resist_det.resist.comm_cost import (
    DDP_ALLREDUCE_LOG,
    allreduce_cost,
    bytes_sent,
    counts,
    logged_bytes,
    with_comms_logger,
)
from resist_det.resist.comm_cost import ALLREDUCE_LOG, P2P_LOG


def _rec(count):
    """A DeepSpeed-form record: [count, latencies, algbw, busbw]."""
    return [count, [0.1] * count, [1.0] * count, [1.0] * count]


# ---- the costing on hand-made logger dicts ---------------------------------------------------
def test_allreduce_costs_two_g_minus_one_over_g_per_rank():
    log = {ALLREDUCE_LOG: {1000: _rec(3), 400: _rec(1)}}
    cost = bytes_sent([log] * 4)
    assert cost.all_reduce == 4 * (3 * 1500 + 600) and cost.p2p == 0
    assert cost.total == cost.by_log[ALLREDUCE_LOG] == 20400
    assert bytes_sent([log]).total == 0  # a single rank sends nothing
    assert bytes_sent([log], group_size=2).total == 3 * 1000 + 400


def test_allreduce_rounds_like_the_engine():
    # per message, as resist_det.resist.sync.average_tensors rounds each bucket
    assert allreduce_cost(10, 3) == round(4 / 3 * 10) == 13
    assert bytes_sent([{ALLREDUCE_LOG: {10: _rec(2)}}] * 3).total == 3 * 2 * 13
    with pytest.raises(ValueError, match="group_size"):
        allreduce_cost(10, 0)


def test_p2p_total_is_half_the_logged_sends_and_receives():
    # rank 0 sends 40 B to rank 1 and receives 60 B from it in one batch: both log 100 B.
    # rank 2 sends 8 B to rank 1 in a second batch: ranks 1 and 2 log 8 B.
    logs = [{P2P_LOG: {100: _rec(1)}}, {P2P_LOG: {100: _rec(1), 8: _rec(1)}}, {P2P_LOG: {8: _rec(1)}}]
    cost = bytes_sent(logs)
    assert cost.p2p == cost.total == 40 + 60 + 8
    with pytest.raises(ValueError, match="odd"):
        bytes_sent([{P2P_LOG: {7: _rec(1)}}])


def test_mixed_logs_unknown_names_and_counts_form():
    logs = [{ALLREDUCE_LOG: {8: 1}, P2P_LOG: {12: 1}, "barrier": {0: _rec(5)}}, {ALLREDUCE_LOG: {8: 1}, P2P_LOG: {12: 1}}]
    cost = bytes_sent(logs)  # counts form accepted; zero-byte barriers ignored
    assert (cost.all_reduce, cost.p2p, cost.total) == (16, 12, 28)
    assert counts({P2P_LOG: {12: _rec(2)}}) == {P2P_LOG: {12: 2}}
    assert logged_bytes({P2P_LOG: {12: _rec(2), 4: _rec(1)}, ALLREDUCE_LOG: {3: 1}}) == {P2P_LOG: 28, ALLREDUCE_LOG: 3}
    with pytest.raises(ValueError, match="no costing: \\['broadcast'\\]"):
        bytes_sent([{"broadcast": {64: _rec(1)}}])
    assert bytes_sent([{"broadcast": {64: _rec(1)}}], kinds={"broadcast": "p2p"}, group_size=2).total == 32
    with pytest.raises(ValueError, match="at least one rank"):
        bytes_sent([])
    cfg = {"train_micro_batch_size_per_gpu": 1}
    assert with_comms_logger(cfg, prof_all=True)["comms_logger"]["prof_all"] is True and "comms_logger" not in cfg


# ---- real ranks: logger-derived bytes equal the engines' own counters --------------------------
def _net(device=None):
    return preact_net(device=device)


def _cfg(**resist):
    return with_comms_logger(ds_config(lr=0.05, sgd_momentum=0.9, batch=2, **resist), prof_all=resist.get("mode") == "ddp")


def _step(engine, gen):
    train_steps(engine, 1, gen)


def _logger_vs_counter(rank, world):
    import torch.distributed as tdist
    from resist_det.resist.comm_cost import gather_comms_logs, local_comms_log, reset_comms_log
    from resist_det import initialize

    def all_sum(v):
        out = [None] * world
        tdist.all_gather_object(out, v)
        return sum(out)

    gen = torch.Generator().manual_seed(rank)
    res = {"rounds": []}
    # ResIST: 6 blocks, 3 per rank over 3 ranks -> shared blocks, so both p2p phases carry data.
    engine, *_ = initialize(model=_net("meta"), config=_cfg(mode="resist", local_steps=10**6, min_blocks=3, seed=1))
    reset_comms_log()
    for _ in range(3):
        _step(engine, gen)
        mine = engine.synchronize()
        logs = gather_comms_logs()
        res["rounds"].append((bytes_sent(logs), all_sum(mine)))
        reset_comms_log()
    before = engine.bytes_sent
    engine.global_model(dst=0)  # gather_blocks: point-to-point only
    res["gather"] = (bytes_sent(gather_comms_logs()), all_sum(engine.bytes_sent - before))
    reset_comms_log()

    # local SGD: one all-reduce of parameters + float buffers per round, identical on every rank.
    engine, *_ = initialize(model=_net(), config=_cfg(mode="local_sgd", local_steps=2))
    reset_comms_log()
    for _ in range(4):
        _step(engine, gen)
    res["local_sgd"] = (bytes_sent(gather_comms_logs()), all_sum(engine.bytes_sent), local_comms_log())
    res["state_bytes"] = sum(t.numel() * t.element_size() for t in engine.strategy.shared_tensors(with_buffers=True))
    reset_comms_log()

    # DDP: DeepSpeed's own gradient all-reduce, logged only with prof_all.
    engine, *_ = initialize(model=_net(), config=_cfg(mode="ddp"))
    reset_comms_log()
    _step(engine, gen)
    res["ddp"] = (bytes_sent(gather_comms_logs()), local_comms_log())
    res["param_bytes"] = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    return res


def test_logger_bytes_equal_engine_counters(tmp_path):
    res = run_on_ranks(_logger_vs_counter, 3, tmp_path, timeout=150)
    r0 = res[0]
    for cost, counter in r0["rounds"]:
        assert cost.total == counter > 0
        assert cost.all_reduce > 0 and cost.p2p > 0
        assert set(cost.by_log) == {ALLREDUCE_LOG, P2P_LOG}
    assert all(r["rounds"] == r0["rounds"] for r in res)  # the same totals on every rank
    cost, counter = r0["gather"]
    assert cost.total == cost.p2p == counter > 0

    cost, counter, log = r0["local_sgd"]
    assert cost.total == counter == 2 * 3 * allreduce_cost(r0["state_bytes"], 3)  # 2 rounds, 3 ranks
    assert set(log) == {ALLREDUCE_LOG}

    cost, log = r0["ddp"]
    assert set(log) == {DDP_ALLREDUCE_LOG}
    # One step all-reduces every gradient once (one bucket at this size).
    assert logged_bytes(log)[DDP_ALLREDUCE_LOG] == r0["param_bytes"]
    assert cost.total == 3 * allreduce_cost(r0["param_bytes"], 3)
