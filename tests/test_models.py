"""Pre-activation ResNets, torchvision ResNets with scalable blocks, partitionable blocks, seeded init."""

import pytest
import torch

from resist_det.models import cifar_preact_resnet101, preact_resnet, resnet
from resist_det.resist.adapters import branch_scale, fold_branch_scale, set_branch_scale
from resist_det.resist.partition import build_block, partitionable_blocks


# ---- hand-computed parameter counts (He et al. 2016 layouts) ---------------------------------
def _bn(c):
    return 2 * c


def _basic(inp, planes):
    proj = inp * planes if inp != planes else 0  # 1x1 projection shortcut
    return _bn(inp) + 9 * inp * planes + _bn(planes) + 9 * planes * planes + proj


def _bottleneck(inp, planes):
    out = 4 * planes
    proj = inp * out if inp != out else 0
    return _bn(inp) + inp * planes + _bn(planes) + 9 * planes * planes + _bn(planes) + planes * out + proj


def _preact_count(kind, layers, num_classes, in_ch=3):
    exp = 1 if kind == "basic" else 4
    block = _basic if kind == "basic" else _bottleneck
    total = 9 * in_ch * 64  # CIFAR stem: one 3x3 conv, no bias
    inp = 64
    for planes, n in zip((64, 128, 256, 512), layers):
        for _ in range(n):
            total += block(inp, planes)
            inp = planes * exp
    return total + _bn(inp) + inp * num_classes + num_classes


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize(
    "depth,kind,layers",
    [(18, "basic", (2, 2, 2, 2)), (50, "bottleneck", (3, 4, 6, 3)), (101, "bottleneck", (3, 4, 23, 3))],
)
def test_parameter_counts_cifar_stem(depth, kind, layers, num_classes):
    net = preact_resnet(depth, num_classes=num_classes, stem="cifar", device="meta")
    assert sum(p.numel() for p in net.parameters()) == _preact_count(kind, layers, num_classes)


def test_paper_cifar_resnet101_count():
    # The paper's CIFAR ResNet101: basic blocks, [3, 4, 23, 3]; "about 41.4 M" with 100 classes.
    net = cifar_preact_resnet101(100, device="meta")
    n = sum(p.numel() for p in net.parameters())
    assert n == _preact_count("basic", (3, 4, 23, 3), 100)
    assert 41.3e6 < n < 41.5e6
    # Same arithmetic, written out once by hand for the layer3 block (256 channels):
    # 2*256 + 9*256*256 + 2*256 + 9*256*256 = 1,180,672 parameters per block.
    assert sum(p.numel() for p in net.layer3[1].parameters()) == 1_180_672


def test_torchvision_resnet101_matches_torchvision():
    import torchvision

    ours, theirs = resnet(101, device="meta"), torchvision.models.resnet101()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours = resnet(18)
    ours.load_state_dict(torchvision.models.resnet18().state_dict())  # torchvision weights load unchanged


@pytest.mark.parametrize("in_ch,size,stem", [(1, 32, "cifar"), (3, 32, "cifar"), (3, 224, "imagenet")])
def test_forward_shapes(in_ch, size, stem):
    net = preact_resnet(18, num_classes=7, in_channels=in_ch, stem=stem).eval()
    assert net(torch.zeros(2, in_ch, size, size)).shape == (2, 7)
    feats = net.forward_features(torch.zeros(1, in_ch, size, size))
    assert feats.shape[1] == 512 and feats.shape[-1] == (4 if stem == "cifar" else 7)


@pytest.mark.parametrize("build", [lambda: preact_resnet(34, stem="cifar", num_classes=10), lambda: resnet(34), lambda: resnet(50)])
def test_branch_scale_and_fold(build):
    net = build().eval()
    name = partitionable_blocks(net)[2]
    block = dict(net.named_modules())[name]
    channels = block.conv1.in_channels
    x = torch.relu(torch.randn(2, channels, 8, 8))  # post-ReLU input, as inside a post-activation net
    ref = block(x.clone())
    set_branch_scale(block, 0.0)
    assert torch.equal(block(x.clone()), x)  # scale 0 is exactly the identity
    set_branch_scale(block, 1.0)
    assert torch.equal(block(x.clone()), ref) and branch_scale(block) == 1.0  # scale 1 reproduces the block
    set_branch_scale(block, 0.25)
    quarter = block(x.clone())
    assert branch_scale(block) == 0.25 and not torch.equal(quarter, ref) and not torch.equal(quarter, x)
    keys = list(block.state_dict())
    fold_branch_scale(block, 0.25)  # the same function, as plain weights of the same class
    assert branch_scale(block) == 1.0 and list(block.state_dict()) == keys
    torch.testing.assert_close(block(x.clone()), quarter, rtol=1e-5, atol=1e-6)


def test_partitionable_blocks_resnet101():
    # The project's pre-activation network names its section (the paper's section 3) ...
    names = partitionable_blocks(cifar_preact_resnet101(device="meta"))
    assert names == [f"layer3.{i}" for i in range(1, 23)]
    assert "layer3.0" not in names  # the strided block stays shared
    # ... a stock torchvision ResNet101 partitions every section (each keeps its strided first block).
    tv = resnet(101, device="meta")
    assert partitionable_blocks(tv) == [f"layer{s}.{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 23, 3)) for i in range(1, n)]
    assert partitionable_blocks(tv, sections=["layer3"]) == names


def test_sections_errors():
    net = preact_resnet(50, device="meta")
    assert partitionable_blocks(net, sections=["layer2", "layer4"]) == ["layer2.1", "layer2.2", "layer2.3", "layer4.1", "layer4.2"]
    with pytest.raises(ValueError, match="resist.sections: 'layer7' names no module"):
        partitionable_blocks(net, sections=["layer7"])
    with pytest.raises(TypeError, match="'layer3.0' is a .*nn.Sequential"):
        partitionable_blocks(net, sections=["layer3.0"])
    with pytest.raises(ValueError, match="give one of them"):
        partitionable_blocks(net, r"layer2\.1", sections=["layer2"])
    one_block = preact_resnet(layers=[1, 1, 3, 1], device="meta")
    with pytest.raises(ValueError, match="resist.sections: 'layer4' has no partitionable block"):
        partitionable_blocks(one_block, sections=["layer3", "layer4"])


def test_block_pattern_errors():
    net = preact_resnet(50, device="meta")
    with pytest.raises(ValueError, match="matches no module"):
        partitionable_blocks(net, r"^layer7\.\d+$")
    with pytest.raises(ValueError, match="strided block 'layer3.0'"):
        partitionable_blocks(net, r"^layer3\.\d+$")
    with pytest.raises(ValueError, match="which is not a residual block"):
        partitionable_blocks(net, r"^layer3$")
    assert partitionable_blocks(net, r"^layer[23]\.[1-2]$") == ["layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert partitionable_blocks(net, r"^layer2\.[1-3]$") == ["layer2.1", "layer2.2", "layer2.3"]


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        preact_resnet(42)
    with pytest.raises(ValueError, match=r"layers\[2\] \(section 3\)"):
        preact_resnet(layers=[2, 2, 0, 2])
    with pytest.raises(ValueError, match="stem"):
        preact_resnet(18, stem="tiny")
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet(77)


@pytest.mark.parametrize("build", [lambda d, s: cifar_preact_resnet101(seed=s, device=d), lambda d, s: resnet(50, seed=s, device=d)])
def test_per_block_init_is_bit_identical(build):
    full = build(None, 7)
    template = build("meta", 7)
    for name in ["layer3.3", "layer3.0", "layer1.1"]:
        alone = build_block(template, name, seed=7)
        inside = dict(full.named_modules())[name]
        a, b = alone.state_dict(), inside.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_block(template, "layer3.3", seed=8)
    assert not torch.equal(other.state_dict()["conv1.weight"], dict(full.named_modules())["layer3.3"].conv1.weight)
