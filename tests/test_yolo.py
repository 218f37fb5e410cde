"""YOLOv2-style ResNet detector: structure, decoding, NMS, loss targets and a tiny overfit."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import box_iou

from resist_det.resist.seeding import network_units, seeded_init_
from resist_det.models.yolo import VOC_ANCHORS, decode_predictions, rescale_boxes, yolo_resnet
from resist_det.models.yolo_loss import YOLOv2Loss, assign_targets
from resist_det.resist.partition import build_block, partitionable_blocks

A, C = len(VOC_ANCHORS), 20
D = 5 + C


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---- structure -------------------------------------------------------------------------------
def test_resnet101_detector_shapes_and_params():
    det = yolo_resnet(101, device="meta")
    out = det(torch.empty(2, 3, 448, 448, device="meta"))
    assert out.shape == (2, 14, 14, 5, 25)
    assert det.head.kernel_size == (1, 1) and det.head.weight.shape == (125, 2048, 1, 1)
    tv = torchvision.models.resnet101()
    backbone = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in det.parameters()) == backbone + 2048 * 125 + 125
    # Non-square inputs that are multiples of 32 work too.
    assert det(torch.empty(1, 3, 320, 416, device="meta")).shape == (1, 10, 13, 5, 25)


def test_partitionable_blocks_of_detector():
    det = yolo_resnet(101, device="meta")
    assert partitionable_blocks(det) == [f"backbone.layer3.{i}" for i in range(1, 23)]


def test_input_size_must_be_multiple_of_32():
    det = yolo_resnet(18, device="meta")
    with pytest.raises(ValueError, match="100x96"):
        det(torch.empty(1, 3, 100, 96, device="meta"))
    with pytest.raises(ValueError, match="450"):
        yolo_resnet(18, image_size=450, device="meta")


def test_seeded_init_blocks_and_head():
    det = yolo_resnet(18, seed=5, image_size=64)
    again = yolo_resnet(18, seed=5, image_size=64)
    other = yolo_resnet(18, seed=6, image_size=64)
    for (n, a), b in zip(det.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(det.head.weight, other.head.weight)
    block = build_block(yolo_resnet(18, device="meta"), "backbone.layer3.1", seed=5)
    for n, t in block.state_dict().items():
        assert torch.equal(t, det.backbone.layer3[1].state_dict()[n]), n
    bias = det.head.bias.detach().view(A, D)
    assert torch.allclose(torch.sigmoid(bias[:, 4]), torch.full((A,), det.objectness_prior))
    assert torch.all(bias[:, :4] == 0) and torch.all(bias[:, 5:] == 0)
    assert det.head.weight.std() < 0.02  # anchors are the initial boxes


def test_meta_materialised_detector_matches_full_build():
    full = yolo_resnet(18, seed=3, image_size=64)
    meta = yolo_resnet(18, seed=3, image_size=64, device="meta").to_empty(device="cpu")
    for name, unit in network_units(meta):
        seeded_init_(unit, 3, name)
    for (n, a), b in zip(full.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), n


# ---- decoding --------------------------------------------------------------------------------
def _empty_predictions(b=1, g=4):
    p = torch.zeros(b, g, g, A, D)
    p[..., 4] = -20.0  # no object anywhere
    return p


def test_decode_hand_computed_box():
    p = _empty_predictions()
    p[0, 2, 1, 0, 4] = 10.0  # cell gy=2, gx=1, anchor 0
    p[0, 2, 1, 0, 5 + 7] = 10.0
    (det,) = decode_predictions(p, VOC_ANCHORS, 128)
    cx, cy = (1 + 0.5) * 32, (2 + 0.5) * 32
    w, h = 1.3221 * 32, 1.73145 * 32
    assert det["labels"].tolist() == [7]
    assert torch.allclose(det["boxes"], torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]))
    score = 1 / (1 + math.exp(-10)) * math.exp(10) / (math.exp(10) + 19)
    assert det["scores"].item() == pytest.approx(score, rel=1e-5)
    # Offsets and scale: sigmoid(tx) = 0.25, exp(tw) = 0.5.
    p[0, 2, 1, 0, 0] = _logit(0.25)
    p[0, 2, 1, 0, 2] = math.log(0.5)
    (det,) = decode_predictions(p, VOC_ANCHORS, 128)
    cx, w = (1 + 0.25) * 32, 0.5 * 1.3221 * 32
    assert torch.allclose(det["boxes"], torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]))


def test_decode_clips_to_image_and_rescales():
    p = _empty_predictions(g=2)
    p[0, 0, 0, 4, 4] = 10.0  # the largest anchor spills over the 64 px image
    p[0, 0, 0, 4, 5] = 10.0
    (det,) = decode_predictions(p, VOC_ANCHORS, 64)
    assert torch.equal(det["boxes"], torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0]])
    out = rescale_boxes(boxes, original_size=(128, 256), input_size=64)
    assert torch.equal(out, torch.tensor([[40.0, 40.0, 120.0, 80.0], [0.0, 0.0, 256.0, 128.0]]))


def test_nms_is_class_aware():
    p = _empty_predictions()
    # Anchor 0 at cell (1, 1), class 3; anchor 1 encodes the very same box, class 3, lower score;
    # anchor 2 the same box again with class 5.
    same = [(0, 3, 5.0), (1, 3, 3.0), (2, 5, 4.0)]
    for a, cls, obj in same:
        p[0, 1, 1, a, 2] = math.log(VOC_ANCHORS[0][0] / VOC_ANCHORS[a][0])
        p[0, 1, 1, a, 3] = math.log(VOC_ANCHORS[0][1] / VOC_ANCHORS[a][1])
        p[0, 1, 1, a, 4] = obj
        p[0, 1, 1, a, 5 + cls] = 12.0
    (det,) = decode_predictions(p, VOC_ANCHORS, 128, conf_threshold=0.01)
    assert det["labels"].tolist() == [3, 5]
    assert det["scores"][0] > det["scores"][1]
    assert torch.allclose(det["boxes"][0], det["boxes"][1])
    (det,) = decode_predictions(p, VOC_ANCHORS, 128, conf_threshold=0.01, max_detections=1)
    assert det["labels"].tolist() == [3]


# ---- loss ------------------------------------------------------------------------------------
# Image 128 px, grid 4x4, stride 32.  Box (40, 70, 100, 120): centre (70, 95) px = (2.1875,
# 2.96875) cells -> cell gx=2, gy=2; size 1.875 x 1.5625 cells.  Shape IoU with anchor 0:
# 1.3221*1.5625 / (1.875*1.5625 + 1.3221*1.73145 - 1.3221*1.5625) = 0.655, anchor 1: 0.229 -> anchor 0.
BOX = [40.0, 70.0, 100.0, 120.0]
# Box (0, 0, 64, 128): centre (1, 2) cells, 2 x 4 cells; shape IoU anchor 1: 8 / 12.80 = 0.625,
# anchor 0: 2.289 / 8 = 0.286, anchor 2: 8 / 40.95 = 0.195 -> cell gx=1, gy=2, anchor 1.
TALL = [0.0, 0.0, 64.0, 128.0]


def test_assignment_hand_computed():
    targets = [{"boxes": np.array([BOX], np.float32), "labels": np.array([4])}, {"boxes": torch.tensor([TALL]), "labels": torch.tensor([9])}]
    asg = assign_targets(targets, (4, 4), VOC_ANCHORS, 32)
    assert asg.batch.tolist() == [0, 1]
    assert asg.gx.tolist() == [2, 1] and asg.gy.tolist() == [2, 2]
    assert asg.anchor.tolist() == [0, 1]
    assert asg.labels.tolist() == [4, 9]
    assert torch.allclose(asg.txy[0], torch.tensor([0.1875, 0.96875]))
    assert torch.allclose(asg.twh[0], torch.tensor([math.log(1.875 / 1.3221), math.log(1.5625 / 1.73145)]))
    assert torch.allclose(asg.txy[1], torch.tensor([0.0, 0.0]))


def test_collision_keeps_larger_box_whatever_the_order():
    small = [45.0, 72.0, 95.0, 118.0]  # same centre, also anchor 0
    for boxes, labels in (([BOX, small], [1, 2]), ([small, BOX], [2, 1])):
        asg = assign_targets([{"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}], (4, 4))
        assert asg.labels.tolist() == [1]


def _encoded(p, asg):
    """Write the encoded targets of ``asg`` into predictions ``p``."""
    for k in range(asg.batch.numel()):
        idx = (asg.batch[k], asg.gy[k], asg.gx[k], asg.anchor[k])
        p[idx][0:2] = torch.logit(asg.txy[k])
        p[idx][2:4] = asg.twh[k]
        p[idx][5 + asg.labels[k]] = 20.0


def test_zero_coordinate_loss_at_encoded_target_and_iou_rescore():
    targets = [{"boxes": torch.tensor([BOX]), "labels": torch.tensor([4])}]
    loss = YOLOv2Loss(C)
    p = _empty_predictions()
    asg = assign_targets(targets, (4, 4))
    _encoded(p, asg)
    _, parts = loss(p, targets)
    assert parts["coord"].item() == pytest.approx(0.0, abs=1e-10)
    assert parts["cls"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["iou"].item() == pytest.approx(1.0, abs=1e-5)
    # Untrained offsets (tx = ty = tw = th = 0): box = anchor 0 centred in cell (2, 2).
    p = _empty_predictions()
    p[0, 2, 2, 0, 4] = 1.0
    t = loss.build_targets(p, targets)
    pred = torch.tensor([[2.5 - 1.3221 / 2, 2.5 - 1.73145 / 2, 2.5 + 1.3221 / 2, 2.5 + 1.73145 / 2]])
    iou = box_iou(pred, torch.tensor([BOX]) / 32).item()
    assert t.obj_target[0, 2, 2, 0].item() == pytest.approx(iou, abs=1e-6)
    assert t.obj_weight[0, 2, 2, 0].item() == 5.0
    assert (t.obj_target > 0).sum() == 1
    _, parts = loss(p, targets)
    sig = 1 / (1 + math.exp(-1.0))
    assert parts["obj"].item() == pytest.approx(0.5 * 5.0 * (sig - iou) ** 2, rel=1e-5)


def test_ignore_rule():
    # A box the shape of anchor 0, centred on the corner (2, 2) cells: assigned to cell (2, 2).
    w, h = VOC_ANCHORS[0][0] * 32, VOC_ANCHORS[0][1] * 32
    targets = [{"boxes": torch.tensor([[64 - w / 2, 64 - h / 2, 64 + w / 2, 64 + h / 2]]), "labels": torch.tensor([0])}]
    loss = YOLOv2Loss(C)
    p = _empty_predictions().requires_grad_(False)
    p[..., 4] = 2.0
    # Cell (1, 1), anchor 0, centre moved to (1.9, 1.9): IoU 0.771 with the box -> ignored.
    p[0, 1, 1, 0, 0:2] = _logit(0.9)
    # Cell (1, 2), anchor 0, centre (2.5, 1.5): IoU 0.284 -> a plain no-object anchor.
    t = loss.build_targets(p, targets)
    assert t.ignored[0, 1, 1, 0] and t.obj_weight[0, 1, 1, 0] == 0.0
    assert not t.ignored[0, 1, 2, 0] and t.obj_weight[0, 1, 2, 0] == 1.0
    assert not t.ignored[0, 2, 2, 0] and t.obj_weight[0, 2, 2, 0] == 5.0  # the assigned one
    assert int(t.ignored.sum()) == 1
    p.requires_grad_(True)
    total, _ = loss(p, targets)
    total.backward()
    assert p.grad[0, 1, 1, 0, 4] == 0.0
    assert p.grad[0, 1, 2, 0, 4] > 0.0  # pushed towards "no object"


def test_loss_batch_normalisation_empty_images_and_gradients():
    loss = YOLOv2Loss(C)
    torch.manual_seed(0)
    p = torch.randn(1, 4, 4, A, D)
    one = [{"boxes": torch.tensor([BOX, TALL]), "labels": torch.tensor([4, 9])}]
    l1, _ = loss(p, one)
    l2, _ = loss(torch.cat([p, p]), one * 2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    empty, parts = loss(p, [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}])
    assert parts["num_targets"] == 0 and empty.item() == pytest.approx(parts["noobj"].item())
    # Gradients reach the backbone's stem through the detector.
    det = yolo_resnet(18, image_size=64)
    total, parts = YOLOv2Loss(C)(det(torch.randn(2, 3, 64, 64)), [{"boxes": torch.tensor([[4.0, 6.0, 36.0, 44.0]]), "labels": torch.tensor([3])}] * 2)
    total.backward()
    assert set(parts) == {"coord", "obj", "noobj", "cls", "iou", "num_targets"}
    assert sum(parts[k] for k in ("coord", "obj", "noobj", "cls")).item() == pytest.approx(total.item(), rel=1e-5)
    for name in ("backbone.conv1.weight", "backbone.layer3.1.conv1.weight", "head.weight", "head.bias"):
        g = dict(det.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_tiny_overfit():
    """Depth-18 detector, 64 px, two synthetic images with one box each: learns both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on this tiny workload
    try:
        det = yolo_resnet(18, image_size=64, seed=0)
        images = torch.zeros(2, 3, 64, 64)
        images[0, 0, 6:44, 4:36] = 2.0
        images[1, 2, 20:52, 28:60] = 2.0
        boxes = [torch.tensor([[4.0, 6.0, 36.0, 44.0]]), torch.tensor([[28.0, 20.0, 60.0, 52.0]])]
        labels = [torch.tensor([3]), torch.tensor([7])]
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
        loss = YOLOv2Loss(C)
        opt = torch.optim.Adam(det.parameters(), lr=1e-3)
        det.train()
        for _ in range(50):
            total, _ = loss(det(images), targets)
            opt.zero_grad()
            total.backward()
            opt.step()
        det.eval()
        dets = det.predict(images)
    finally:
        torch.set_num_threads(threads)
    for d, b, lab in zip(dets, boxes, labels):
        assert d["labels"][0] == lab[0]
        assert d["scores"][0] > 0.5
        assert box_iou(d["boxes"][:1], b).item() > 0.5
