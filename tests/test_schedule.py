"""The round schedule (pure, table-tested) and the engine's empty-round rule on real ranks."""

import pytest
import torch

from distributed import run_on_ranks
from helpers import ds_config, preact_net, train_steps
from resist_det.resist.schedule import RoundSchedule


def _epochs(schedule, steps_per_epoch, epochs):
    """A training loop with an epoch-end sync; returns the step counts at which rounds ended."""
    ends = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            if schedule.step():
                schedule.end_round()
                ends.append(schedule.steps)
        if schedule.pending:  # engine.synchronize() at the epoch end
            schedule.end_round()
            ends.append(schedule.steps)
    return ends


@pytest.mark.parametrize(
    "steps_per_epoch,local_steps,epochs,rounds",
    [
        (4, 4, 12, 12),  # the multiple case: no extra, empty round per epoch
        (4, 2, 3, 6),
        (4, 8, 3, 3),  # every epoch end cuts a round short
        (5, 2, 2, 6),  # 2, 4, 5 | 7, 9, 10
        (1, 1, 5, 5),
        (3, 50, 2, 2),
    ],
)
def test_rounds_per_epoch_table(steps_per_epoch, local_steps, epochs, rounds):
    ends = _epochs(RoundSchedule(local_steps), steps_per_epoch, epochs)
    assert len(ends) == rounds
    assert len(set(ends)) == len(ends)  # never two rounds at the same step: no empty round


@pytest.mark.parametrize(
    "local_steps,warmup,steps,ends,switch_at",
    [
        (2, 3, 8, [2, 3, 5, 7], 3),  # the switch forces a round end at step 3
        (2, 4, 8, [2, 4, 6, 8], 4),
        (5, 1, 7, [1, 6], 1),
        (3, 0, 7, [3, 6], None),
    ],
)
def test_warmup_switch_table(local_steps, warmup, steps, ends, switch_at):
    s = RoundSchedule(local_steps, warmup)
    got, switched = [], None
    for _ in range(steps):
        if s.step():
            if s.end_round():
                switched = s.steps
            got.append(s.steps)
    assert got == ends and switched == switch_at
    assert not s.in_warmup or warmup == 0 or steps < warmup


def test_schedule_state_round_trip_and_bad_arguments():
    a = RoundSchedule(3, 2)
    for _ in range(4):
        if a.step():
            a.end_round()
    b = RoundSchedule(3, 2)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == {"steps": 4, "local_step": 2, "rounds": 1, "in_warmup": False}
    with pytest.raises(ValueError, match="local_steps must be >= 1, but got 0"):
        RoundSchedule(0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        RoundSchedule(2, -1)


# ---- the engine: an epoch-end sync after a round boundary moves nothing --------------------------
def _epoch_rounds(rank, world, mode, steps_per_epoch, local_steps, epochs):
    import resist_det

    engine, *_ = resist_det.initialize(model=preact_net(), config=ds_config(mode=mode, local_steps=local_steps, min_blocks=2))
    gen = torch.Generator().manual_seed(rank)
    per_round = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            before = engine.bytes_sent
            train_steps(engine, 1, gen)
            if engine.bytes_sent != before:
                per_round.append(engine.bytes_sent - before)
        sent = engine.synchronize()
        if sent:
            per_round.append(sent)
    return engine.round, engine.bytes_sent, per_round


@pytest.mark.parametrize("mode", ["local_sgd", "resist"])
@pytest.mark.parametrize("steps_per_epoch,local_steps,epochs,rounds", [(4, 4, 3, 3), (4, 3, 2, 4)])
def test_epoch_end_sync_is_a_no_op_after_a_round(tmp_path, mode, steps_per_epoch, local_steps, epochs, rounds):
    res = run_on_ranks(_epoch_rounds, 2, tmp_path, mode, steps_per_epoch, local_steps, epochs)
    for got_rounds, total, per_round in res:
        assert got_rounds == rounds
        assert len(per_round) == rounds and total == sum(per_round)
        if mode == "local_sgd":  # every round sends the same: the whole network's all-reduce
            assert len(set(per_round)) == 1
