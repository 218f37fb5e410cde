"""Compressed transport (resist.compression): the codec, the compressed average and the engine's
sync on real gloo ranks, against exact fp32 means and DeepSpeed's comms logger."""

import pytest
import torch

from distributed import run_on_ranks
from helpers import ds_config, preact_net, train_steps
from resist_det.resist.transport import Codec, error_bound


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_codec_roundtrip_within_bound_and_exact_size(bits, stochastic):
    codec = Codec(bits, chunk=256, stochastic=stochastic)
    x = torch.randn(3000) * torch.linspace(0.01, 10, 3000)  # chunks of very different scales
    message = codec.encode(x, torch.Generator().manual_seed(0))
    assert message.dtype == torch.uint8 and message.numel() == codec.encoded_size(3000)
    assert codec.encoded_size(3000) == 12 * 4 + -(-3000 * bits // 8)  # 12 fp32 scales + packed codes
    y = codec.decode(message, 3000)
    assert bool(((y - x).abs() <= error_bound(codec, x)).all())
    assert torch.equal(codec.decode(codec.encode(torch.zeros(10)), 10), torch.zeros(10))


def test_stochastic_rounding_is_unbiased():
    codec = Codec(4, chunk=64, stochastic=True)
    x = torch.rand(64) * 2 - 1
    gen = torch.Generator().manual_seed(1)
    mean = torch.stack([codec.roundtrip(x, gen) for _ in range(4000)]).mean(0)
    step = x.abs().max() / codec.levels
    assert (mean - x).abs().max() < 0.05 * step  # nearest rounding is off by up to half a step


# ---- the compressed average and the engine on real ranks --------------------------------------
def _average(rank, world, bits):
    import deepspeed.comm as dist

    from resist_det.resist.sync import average_tensors

    dist.init_distributed(dist_backend="gloo")
    torch.manual_seed(rank)
    tensors = [torch.randn(1000) * (rank + 1), torch.randn(7, 5), torch.randn(3)]
    before = [t.clone() for t in tensors]
    sent = average_tensors(tensors, bucket_bytes=2000, codec=Codec(bits, chunk=128))  # 3 buckets
    return before, tensors, sent


@pytest.mark.parametrize("bits", [8, 5])
def test_compressed_average_identical_on_all_ranks_and_near_the_mean(tmp_path, bits):
    world = 3
    res = run_on_ranks(_average, world, tmp_path, bits)
    L = 2 ** (bits - 1) - 1
    for i in range(3):
        inputs = torch.stack([r[0][i] for r in res])
        mean = inputs.mean(0)
        for r in res:
            assert torch.equal(r[1][i], res[0][1][i])  # replicas do not diverge
        # Each value is quantised twice (its shard at the sender, the mean at the owner), each time
        # off by at most half a step of its chunk, and a step is at most max|x| / L.
        bound = inputs.abs().max() / L
        assert (res[0][1][i] - mean).abs().max() <= bound
        assert (res[0][1][i] - mean).abs().max() > 0  # it was compressed
    n = [1000, 35, 3]
    codec = Codec(bits, chunk=128)
    buckets = [1000, 38]  # 4000 bytes alone, then 140 + 12 bytes together (bucket_bytes 2000)
    want = sum(2 * (world - 1) * codec.encoded_size(-(-b // world)) for b in buckets)
    assert sum(n) == sum(buckets) and all(r[2] == want for r in res)


def _engine_sync(rank, world):
    import resist_det
    from helpers import block_snapshot, shared_snapshot
    from resist_det.resist.comm_cost import bytes_sent, gather_comms_logs, reset_comms_log, with_comms_logger

    result = {}
    for mode in ("resist", "local_sgd"):
        for bits in (8, 32):
            cfg = with_comms_logger(ds_config(lr=0.05, sgd_momentum=0.9, local_steps=10**6, min_blocks=3, seed=2, mode=mode,
                                              compression={"bits": bits}))
            engine, *_ = resist_det.initialize(model=preact_net(seed=1, device="meta" if mode == "resist" else None), config=cfg)
            gen = torch.Generator().manual_seed(rank)
            out = []
            for _ in range(2):
                train_steps(engine, 2, gen)
                reset_comms_log()
                before = (shared_snapshot(engine), block_snapshot(engine) if mode == "resist" else {})
                plan = engine.plan.groups if mode == "resist" else None
                sent = engine.synchronize()
                logged = bytes_sent(gather_comms_logs()).total
                out.append(dict(before=before, plan=plan, sent=sent, logged=logged,
                                after=(shared_snapshot(engine), block_snapshot(engine) if mode == "resist" else {})))
            result[mode, bits] = out
    return result


def test_engine_sync_with_8_bits(tmp_path):
    world, bits = 3, 8
    L = 2 ** (bits - 1) - 1
    ranks = run_on_ranks(_engine_sync, world, tmp_path, timeout=240)
    for mode in ("resist", "local_sgd"):
        res, fp32 = [r[mode, 8] for r in ranks], [r[mode, 32] for r in ranks]
        for t in range(2):
            rounds = [r[t] for r in res]
            # bytes: the comms logger agrees with the engines; 8 bits send about a quarter of fp32
            assert rounds[0]["logged"] == sum(r["sent"] for r in rounds) > 0
            ratio = sum(r["sent"] for r in rounds) / sum(r[t]["sent"] for r in fp32)
            assert 0.25 <= ratio < 0.30, (mode, ratio)
            # A chunk spans several tensors of a bucket, so the step is bounded by the largest
            # magnitude anywhere in the shared tensors, not by the tensor's own.
            largest = max(r["before"][0][n].abs().max() for r in rounds for n in rounds[0]["before"][0])
            for name in rounds[0]["after"][0]:  # shared: identical everywhere, near the exact mean
                inputs = torch.stack([r["before"][0][name] for r in rounds])
                for r in rounds:
                    assert torch.equal(r["after"][0][name], rounds[0]["after"][0][name]), name
                err = (rounds[0]["after"][0][name] - inputs.mean(0)).abs().max()
                assert err <= largest / L + 1e-7, name
            if mode == "resist":  # every copy of a block is identical and near the mean of its holders
                old = rounds[0]["plan"]
                copies = {}
                for r in rounds:
                    for b, v in r["after"][1].items():
                        copies.setdefault(b, []).append(v)
                for b, vs in copies.items():
                    assert all(torch.equal(v, vs[0]) for v in vs)
                    inputs = torch.stack([rounds[h]["before"][1][b] for h in range(world) if b in old[h]])
                    assert (vs[0] - inputs.mean(0)).abs().max() <= inputs.abs().max() / L + 1e-7
                assert any(len(vs) > 1 for vs in copies.values())


def test_compression_config_errors():
    from resist_det.resist.config import split_config

    with pytest.raises(ValueError, match=r"resist\.compression\.bits"):
        split_config({"resist": {"compression": {"bits": 3}}})
    with pytest.raises(ValueError, match="use mode 'local_sgd'"):
        split_config({"resist": {"mode": "ddp", "compression": {"bits": 8}}})
    for bad in (0, 1.5, -0.25):
        with pytest.raises(ValueError, match=r"resist\.compression\.topk"):
            split_config({"resist": {"compression": {"topk": bad}}})
    with pytest.raises(ValueError, match="use mode 'local_sgd'"):
        split_config({"resist": {"mode": "ddp", "compression": {"topk": 0.25}}})
    assert split_config({"resist": {"compression": {"topk": 0.25, "bits": 8}}})[1].compression.topk == 0.25


# ---- top-k sparsified averaging ----------------------------------------------------------------
def _sparse(rank, world, bits):
    import deepspeed.comm as dist

    from resist_det.resist.sparse import SparseAverager
    from resist_det.resist.sync import average_tensors

    dist.init_distributed(dist_backend="gloo")
    torch.manual_seed(rank)
    sparse = SparseAverager(0.25, Codec(bits, chunk=64))
    tensors = [torch.randn(1000), torch.randn(7, 5)]
    rounds = []
    for _ in range(3):
        before = [t.clone() for t in tensors]
        sent = average_tensors(tensors, bucket_bytes=10**6, sparse=sparse)
        state = next(iter(sparse.states.values()))
        rounds.append(dict(before=before, after=[t.clone() for t in tensors], sent=sent, residual=state.residual.clone(),
                           owner_residual=state.owner_residual.clone()))
        for t in tensors:  # local training moves every rank differently
            t.add_(torch.randn_like(t) * (rank + 1))
    return rounds


@pytest.mark.parametrize("bits", [32, 8])
def test_sparse_average_conserves_the_mean_and_keeps_replicas_identical(tmp_path, bits):
    world, n = 3, 1035
    shard = -(-n // world)
    k = -(-shard // 4)
    res = run_on_ranks(_sparse, world, tmp_path, bits)
    codec = Codec(bits, chunk=64)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    # first sync: dense, the exact mean (fp32) sets the common baseline
    first = [flat(r[0]["before"]) for r in res]
    if bits == 32:
        assert torch.allclose(flat(res[0][0]["after"]), torch.stack(first).mean(0), atol=1e-6)
    owner_old = torch.zeros(shard * world)
    for t in (1, 2):
        base = flat(res[0][t - 1]["after"])
        after = flat(res[0][t]["after"])
        for r in res:  # replicas identical
            assert torch.equal(flat(r[t]["after"]), after)
        # at most k changed values per shard
        changed = torch.nn.functional.pad(after != base, (0, shard * world - n)).view(world, shard).sum(1)
        assert int(changed.max()) <= k and int(changed.sum()) > 0
        # conservation: nothing a rank trained is lost, only delayed in the residuals
        deltas = torch.stack([flat(r[t]["before"]) - base + r[t - 1]["residual"] * (t > 1) for r in res])
        owner_new = torch.cat([r[t]["owner_residual"] for r in res])
        lhs = after + torch.stack([r[t]["residual"] for r in res]).sum(0) / world + owner_new[:n]
        rhs = base + deltas.mean(0) + owner_old[:n]
        assert torch.allclose(lhs, rhs, atol=1e-5), (lhs - rhs).abs().max()
        owner_old = owner_new
        # bytes: two stages of (world - 1) messages of k indices and k values
        assert all(r[t]["sent"] == 2 * (world - 1) * (4 * k + codec.encoded_size(k)) for r in res)


def _engine_topk(rank, world):
    import resist_det
    from helpers import shared_snapshot

    out = {}
    for mode in ("resist", "local_sgd"):
        cfg = ds_config(lr=0.05, sgd_momentum=0.9, local_steps=10**6, min_blocks=3, seed=2, mode=mode,
                        compression={"topk": 0.25})
        engine, *_ = resist_det.initialize(model=preact_net(seed=1, device="meta" if mode == "resist" else None), config=cfg)
        gen = torch.Generator().manual_seed(rank)
        rounds = []
        for _ in range(3):
            train_steps(engine, 2, gen)
            before = shared_snapshot(engine)
            engine.synchronize()
            rounds.append((before, shared_snapshot(engine)))
        out[mode] = (rounds, sorted(engine.strategy.sparse.states))
    return out


def test_engine_topk_sparsifies_weights_and_averages_bn_statistics_exactly(tmp_path):
    """Weights travel as top-k deltas; BN running statistics (which move towards a target inside
    a round, so error feedback would overshoot) are averaged densely: exactly, in fp32."""
    ranks = run_on_ranks(_engine_topk, 3, tmp_path, timeout=240)
    for mode in ("resist", "local_sgd"):
        for t in range(3):
            after = ranks[0][mode][0][t][1]
            for name in after:
                assert all(torch.equal(r[mode][0][t][1][name], after[name]) for r in ranks), (mode, name)
            stats = [n for n in after if n.endswith(("running_mean", "running_var"))]
            assert stats
            for n in stats:
                mean = torch.stack([r[mode][0][t][0][n] for r in ranks]).mean(0)
                assert torch.allclose(after[n], mean, atol=1e-6), (mode, n)
                if n.endswith("running_var"):
                    assert bool((after[n] > 0).all())
        # one sparse state: the weights' bucket (buffers are not in it)
        assert len(ranks[0][mode][1]) == 1, ranks[0][mode][1]
