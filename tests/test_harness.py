"""The multi-process harness itself, and DeepSpeed on 2 CPU ranks with a tiny pre-activation ResNet."""

import pytest
import torch

from distributed import run_on_ranks


def _sum_ranks(rank, world_size):
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


@pytest.mark.parametrize("world_size", [1, 3])
def test_harness_collective(tmp_path, world_size):
    assert run_on_ranks(_sum_ranks, world_size, tmp_path) == [world_size * (world_size + 1) / 2] * world_size


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    return rank


def test_harness_reports_worker_exception(tmp_path):
    with pytest.raises(AssertionError, match="boom on purpose"):
        run_on_ranks(_fail_on_rank1, 2, tmp_path, timeout=60)


def _hang(rank, world_size):
    import time

    time.sleep(60 if rank == 0 else 0)


def test_harness_times_out_loudly(tmp_path):
    with pytest.raises(TimeoutError, match=r"did not finish within 8 s on ranks \[0"):
        run_on_ranks(_hang, 2, tmp_path, timeout=8)


def _deepspeed_steps(rank, world_size):
    import deepspeed

    from resist_det.models import preact_resnet

    torch.manual_seed(rank)  # different data per rank
    net = preact_resnet(layers=[1, 1, 2, 1], num_classes=4, stem="cifar", seed=0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.05}}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    losses = []
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return engine.global_steps, flat


def test_deepspeed_two_ranks(tmp_path):
    (steps0, w0), (steps1, w1) = run_on_ranks(_deepspeed_steps, 2, tmp_path)
    assert steps0 == steps1 == 3
    assert torch.equal(w0, w1)  # data-parallel: gradients averaged, replicas stay identical
