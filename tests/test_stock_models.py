"""Stock networks adopt ResIST by changing one call: torchvision ResNets, detection models, a ViT.

Each distributed test is the user's own DeepSpeed script with ``deepspeed.initialize``
replaced by ``resist_det.initialize`` and a ``resist`` section added, on real gloo ranks.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from helpers import shared_digest


# ---- torchvision resnet50, unmodified ---------------------------------------------------------
def _resnet50_script(rank, world):
    import torchvision

    import resist_det

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
        "resist": {"mode": "resist", "local_steps": 2, "min_blocks": 2},  # the added section
    }
    # was: deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    engine, optimizer, _, _ = resist_det.initialize(model=net, model_parameters=net.parameters(), config=config)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(4):  # two rounds
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    out = dict(rounds=engine.round, shared=shared_digest(engine), held=[b for b in engine.strategy.slot_blocks if b is not None],
               names=engine.block_names, params=sum(p.numel() for p in engine.module.parameters()))
    hooked = engine.global_model(fold=False)
    folded = engine.global_model()
    if rank == 0:
        stock = torchvision.models.resnet50(num_classes=10)
        stock.load_state_dict(folded.state_dict())  # strict: the original keys, nothing else
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out.update(stock_out=stock.eval()(x), hooked_out=hooked.eval()(x), folded_type=type(folded).__name__)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_stock_resnet50_drop_in(tmp_path, world):
    import torchvision

    res = run_on_ranks(_resnet50_script, world, tmp_path, timeout=400)
    names = res[0]["names"]
    # Every section's non-strided blocks: 2 + 3 + 5 + 2 of resnet50's 16.
    assert names == [f"layer{s}.{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for i in range(1, n)]
    for r in res:
        assert r["rounds"] == 2
        assert 0 < len(r["held"]) < len(names)  # no rank holds every block
        assert r["shared"] == res[0]["shared"]  # after the sync: shared layers identical on every rank
    full = torchvision.models.resnet50(num_classes=10)
    size = [sum(p.numel() for p in full.get_submodule(n).parameters()) for n in names]
    for r in res:  # exactly the shared layers and the blocks held: empty slots hold nothing
        assert r["params"] == sum(p.numel() for p in full.parameters()) - sum(size[b] for b in range(len(names)) if b not in r["held"])
    assert res[0]["folded_type"] == "ResNet"
    torch.testing.assert_close(res[0]["stock_out"], res[0]["hooked_out"], rtol=1e-4, atol=1e-5)


# ---- torchvision detection models through the user's own loop ----------------------------------
def _detector(arch):
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    if arch == "fasterrcnn":
        # As with a pretrained backbone: FrozenBatchNorm2d, conv1 and layer1 frozen.
        backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
        # Fewer proposals and sampled RoIs than the defaults (sized for 800-px images): the
        # box head on 512 RoIs per image was most of this test's CPU time.
        return torchvision.models.detection.FasterRCNN(
            backbone, num_classes=4, min_size=96, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)
    return torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                              min_size=96, max_size=96, topk_candidates=100)


def _shapes(root, split):
    from resist_det.data.shapes import SHAPES_CLASSES
    from resist_det.data.voc import VOCDetection

    ds = VOCDetection(root, [("2007", split)], classes=SHAPES_CLASSES)
    items = []
    for i in range(len(ds)):
        image, target = ds[i]
        items.append((torch.from_numpy(image).permute(2, 0, 1).float() / 255,
                      {"boxes": torch.as_tensor(target["boxes"]), "labels": torch.as_tensor(target["labels"]) + 1}))
    return items


def _detection_script(rank, world, root, arch):
    import resist_det
    from resist_det.eval.voc_ap import evaluate_detections

    model = _detector(arch)
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
              "resist": {"local_steps": 3, "min_blocks": 2}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = resist_det.initialize(model=model, model_parameters=params, config=config)
    train = _shapes(root, "trainval")[rank * 4:(rank + 1) * 4]
    engine.train()
    losses = []
    for step in range(12):
        batch = [train[(2 * step + j) % len(train)] for j in range(2)]
        loss_dict = engine([b[0] for b in batch], [b[1] for b in batch])
        loss = sum(loss_dict.values())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.synchronize()
    out = dict(losses=losses, rounds=engine.round, sections=sorted({n.rpartition(".")[0] for n in engine.block_names}))
    net = engine.global_model()
    if rank == 0:
        plain = _detector(arch)
        plain.load_state_dict(net.state_dict())  # the user's class, the original keys
        plain.eval()
        test = _shapes(root, "test")[:8]
        with torch.no_grad():
            preds = plain([t[0] for t in test])
        dets = [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"] - 1} for p in preds]
        gts = [{"boxes": t[1]["boxes"], "labels": t[1]["labels"] - 1} for t in test]
        out["map"] = evaluate_detections(dets, gts, num_classes=3).map
        out["type"] = type(net).__name__
    return out


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from resist_det.data.shapes import write_shapes_dataset

    return str(write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 40, image_size=96, seed=3))


@pytest.mark.parametrize("arch,cls", [("fasterrcnn", "FasterRCNN"), ("retinanet", "RetinaNet")])
def test_torchvision_detector_trains_with_resist(tmp_path, shapes_root, arch, cls):
    res = run_on_ranks(_detection_script, 2, tmp_path, shapes_root, arch, timeout=400)
    # Every trainable section (Faster R-CNN's layer1 is frozen, as with a pretrained backbone: left shared).
    lowest = 2 if arch == "fasterrcnn" else 1
    for r in res:
        assert r["sections"] == [f"backbone.body.layer{s}" for s in range(lowest, 5)]
        assert r["rounds"] == 4  # 12 steps, local_steps 3; the epoch-end sync has nothing to do
        first, last = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
        assert last < first, r["losses"]
    assert res[0]["type"] == cls
    assert 0.0 <= res[0]["map"] <= 1.0  # evaluated by the project's VOC AP


# ---- a torchvision ViT: every encoder layer is partitionable -----------------------------------
def _tiny_vit(num_classes=10):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=8, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=num_classes)


def _vit_script(rank, world):
    import resist_det

    net = _tiny_vit()
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
              "resist": {"local_steps": 2, "min_blocks": 2}}
    engine, *_ = resist_det.initialize(model=net, model_parameters=net.parameters(), config=config)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(4):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    out = dict(names=engine.block_names, held=[b for b in engine.strategy.slot_blocks if b is not None], shared=shared_digest(engine))
    hooked, folded = engine.global_model(fold=False), engine.global_model()
    if rank == 0:
        plain = _tiny_vit()
        plain.load_state_dict(folded.state_dict())
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out.update(plain_out=plain.eval()(x), hooked_out=hooked.eval()(x))
    return out


def test_vit_partitions_encoder_layers(tmp_path):
    res = run_on_ranks(_vit_script, 2, tmp_path)
    assert res[0]["names"] == [f"encoder.layers.encoder_layer_{i}" for i in range(8)]
    for r in res:
        assert len(r["held"]) == 4
        assert r["shared"] == res[0]["shared"]
    torch.testing.assert_close(res[0]["plain_out"], res[0]["hooked_out"], rtol=1e-4, atol=1e-5)


def test_plan_cli_for_vit():
    from typer.testing import CliRunner

    from resist_det.cli import app

    result = CliRunner().invoke(app, ["plan", "-S", "4", "--model", "vit-tiny", "--min-blocks", "2", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert "8 partitionable blocks" in result.output
    ratio = float(result.output.split("ratio ")[1].split(")")[0])
    # By hand: 4 ranks all-reduce the shared layers (ring: 2 (S-1)/S of the message each) and the
    # blocks that change rank between rounds 0 and 1 travel once; local SGD all-reduces everything.
    from resist_det.resist.plan import make_plan, p2p_sends

    vit = _tiny_vit(num_classes=100)  # the plan command's default class count
    total = sum(p.numel() for p in vit.parameters())
    block = sum(p.numel() for p in vit.encoder.layers[0].parameters())
    moved = sum(p2p_sends(make_plan(0, 0, 4, 8, 2), make_plan(0, 1, 4, 8, 2)))
    allreduce = lambda n: 4 * 2 * 3 / 4 * n  # noqa: E731  (summed over the 4 ranks)
    assert ratio == pytest.approx((allreduce(total - 8 * block) + moved * block) / allreduce(total), abs=5e-4)


# ---- adapters without ranks: folding, registry, bad input ---------------------------------------
def test_fold_frozen_batchnorm_and_vit_block():
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from resist_det.resist.adapters import fold_branch_scale, set_branch_scale

    net = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    for p in net.layer3[2].bn3.parameters(recurse=False):
        raise AssertionError("FrozenBatchNorm2d holds buffers only")
    cases = [(net.layer3[2], torch.relu(torch.randn(2, 1024, 4, 4))), (_tiny_vit().encoder.layers[3], torch.randn(2, 65, 128))]
    for block, x in cases:
        block.eval()
        set_branch_scale(block, 0.3)
        want = block(x)
        fold_branch_scale(block, 0.3)
        torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-6)


def test_registered_block_partitions_and_unknown_block_is_refused():
    from torch import nn

    from resist_det.resist import partitionable_blocks, register_block

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    class Net(nn.Module):
        def __init__(self, section):
            super().__init__()
            self.layer3 = section

    net = Net(nn.Sequential(Gated(), Gated()))
    with pytest.raises(TypeError, match=r"'layer3.0' is a .*Gated.*register_block\(.*Gated, branch="):
        partitionable_blocks(net)
    register_block(Gated, branch="conv")
    assert partitionable_blocks(net) == ["layer3.0", "layer3.1"]
    with pytest.raises(TypeError, match=r"'layer3' is a ModuleList.*nn.Sequential"):
        partitionable_blocks(Net(nn.ModuleList([Gated()])))


def test_block_pattern_on_stock_resnet():
    import torchvision

    from resist_det.resist import partitionable_blocks

    net = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="strided block 'layer3.0'"):
        partitionable_blocks(net, r"layer3\.\d+")
    with pytest.raises(ValueError, match="'layer3.1.conv1', a Conv2d, which is not a residual block"):
        partitionable_blocks(net, r"layer3\.1\.conv1")
    assert partitionable_blocks(net, r"layer4\.1") == ["layer4.1"]


def _surface(rank, world):
    import resist_det
    from helpers import ds_config, preact_net

    engine, *_ = resist_det.initialize(model=preact_net(), config=ds_config(local_steps=2, min_blocks=2))
    out = {"before": engine.deepspeed_engine.enable_backward_allreduce}
    engine.enable_backward_allreduce = True  # a write reaches DeepSpeed's engine, as a read does
    out["after"] = (engine.deepspeed_engine.enable_backward_allreduce, "enable_backward_allreduce" in engine.__dict__)
    out["copy"] = copy.copy(engine).module is engine.module
    try:
        engine.no_such_attribute
        out["missing"] = None
    except AttributeError as e:
        out["missing"] = str(e)
    out["forwarded"] = engine.gradient_accumulation_steps() == 1 and engine.module is engine.deepspeed_engine.module
    from helpers import train_steps

    train_steps(engine, 1, torch.Generator().manual_seed(0))  # mid-round: one of two local steps
    out["mid_round"] = (engine.round, type(engine.global_model()).__name__, engine.round, engine.local_step)
    return out


def test_engine_surface_forwards_symmetrically(tmp_path):
    [out] = run_on_ranks(_surface, 1, tmp_path)
    assert out["before"] is False and out["after"] == (True, False)
    assert out["copy"] and out["forwarded"]
    assert "no_such_attribute" in out["missing"]
    assert out["mid_round"] == (0, "PreActResNet", 1, 0)  # the round ended first, then the network was assembled


def test_resist_imports_alone():
    import subprocess
    import sys

    code = (
        "import sys, resist_det.resist\n"
        "bad = [m for m in sys.modules if m.startswith(('resist_det.models', 'resist_det.data', 'resist_det.train',"
        " 'resist_det.cli', 'torchvision.models.detection'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_timm_resnet_blocks():
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install resist-det[timm])")
    from resist_det.resist import partitionable_blocks
    from resist_det.resist.adapters import fold_branch_scale, set_branch_scale

    torch.manual_seed(0)
    for name, foldable in (("resnet26", True), ("seresnet18", False)):
        net = timm.create_model(name, pretrained=False, num_classes=3).eval()
        names = partitionable_blocks(net)
        assert names and "layer3.1" in names and "layer3.0" not in names
        block = net.get_submodule(names[0])
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 4, 4))
        set_branch_scale(block, 0.0)
        assert torch.equal(block(x.clone()), x)  # skipping the block is the identity
        set_branch_scale(block, 0.4)
        want = block(x.clone())
        if foldable:
            fold_branch_scale(block, 0.4)
            torch.testing.assert_close(block(x.clone()), want, rtol=1e-5, atol=1e-6)
        else:  # squeeze-excitation after the last BN is not linear in the scale: refuse to fold
            with pytest.raises(ValueError, match="cannot be folded"):
                fold_branch_scale(block, 0.4)
