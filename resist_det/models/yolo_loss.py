"""YOLOv2 loss (Redmon & Farhadi 2017, darknet's region layer) for :class:`YOLODetector`.

Predictions are the detector's raw output ``[B, H, W, A, 5 + C]`` (``tx, ty, tw, th, to``,
class logits); targets are, per image, boxes ``x1, y1, x2, y2`` in pixels of the network input
and class labels.  Choices (each reproduces darknet's gradients):

* Assignment: a ground-truth box goes to the grid cell holding its centre and to the anchor
  whose shape best overlaps it (IoU of ``(w, h)`` boxes sharing a centre).  When two boxes of an
  image fall on the same cell and anchor, the larger (by area) is kept, whatever the annotation
  order.  Boxes with no width or height are skipped.
* Coordinates: squared error of ``sigmoid(tx), sigmoid(ty)`` against the centre's offset in
  its cell and of ``tw, th`` against ``log(gt_w / anchor_w), log(gt_h / anchor_h)`` (encoded
  space, as darknet - not the decoded width), weighted ``coord_scale * (2 - w * h)`` with
  ``w, h`` the box's fraction of the image (darknet's small-box boost; ``box_size_weighting``).
* Objectness: for an assigned anchor, squared error of ``sigmoid(to)`` against the IoU of its
  (detached) predicted box with its ground truth (YOLOv2's rescore), weight ``object_scale``.
  Every other anchor gets squared error against 0, weight ``noobject_scale``, unless its
  predicted box already overlaps some ground truth of its image with IoU > ``ignore_iou``
  (then it is ignored).
* Classes: softmax cross-entropy over the class logits of assigned anchors.  Darknet feeds
  ``truth - softmax`` straight back to the logits, which is this cross-entropy's gradient.
* Squared errors carry a factor 1/2 (darknet's deltas ``scale * (t - x)`` are their
  gradients).  Everything is summed over the batch and divided by the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .yolo import YOLO_STRIDE
from .yolo_decode import VOC_ANCHORS, _check_anchors, cxcywh_to_xyxy, decode_boxes

__all__ = ["YOLOv2Loss", "YOLOTargets", "Assignment", "assign_targets", "box_iou_xyxy"]

Target = Mapping[str, Any] | Sequence[Any]


def box_iou_xyxy(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise (broadcast) IoU of ``x1, y1, x2, y2`` boxes in the last dimension."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:4], b[..., 2:4])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:4] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:4] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


@dataclass
class Assignment:
    """Ground truths assigned to (image, cell, anchor), ``K`` of them, all in grid cells.

    ``batch, gy, gx, anchor, labels``: int64 ``[K]``; ``txy``: ``[K, 2]`` centre offsets in
    the cell; ``twh``: ``[K, 2]`` ``log(gt / anchor)``; ``boxes``: ``[K, 4]`` ground truths
    ``x1, y1, x2, y2``; ``area_fraction``: ``[K]`` ``w * h`` as a fraction of the image.
    """

    batch: Tensor
    gy: Tensor
    gx: Tensor
    anchor: Tensor
    labels: Tensor
    txy: Tensor
    twh: Tensor
    boxes: Tensor
    area_fraction: Tensor


@dataclass
class YOLOTargets:
    """Everything the loss compares predictions with.

    ``assignment``: the responsible anchors; ``obj_target``/``obj_weight``: ``[B, H, W, A]``
    objectness targets (IoU at assigned anchors, else 0) and weights (``object_scale`` at
    assigned anchors, ``noobject_scale`` at the others, 0 where ignored); ``ignored``: the
    ``[B, H, W, A]`` mask of unassigned anchors excused by the ``ignore_iou`` rule;
    ``iou``: ``[K]`` IoU of each assigned anchor's predicted box with its ground truth.
    """

    assignment: Assignment
    obj_target: Tensor
    obj_weight: Tensor
    ignored: Tensor
    iou: Tensor


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _gather(targets: Sequence[Target], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-image targets: boxes ``[M, 4]``, labels ``[M]``, image index ``[M]``."""
    boxes, labels, index = [], [], []
    for i, t in enumerate(targets):
        if isinstance(t, Mapping):
            b, lab = t["boxes"], t["labels"]
        elif isinstance(t, Sequence) and len(t) == 2:
            b, lab = t
        else:
            raise TypeError(f"targets[{i}] must be a mapping with 'boxes' and 'labels' or a (boxes, labels) pair, got {type(t).__name__}")
        b = _as_tensor(b, torch.float32, device).reshape(-1, 4)
        lab = _as_tensor(lab, torch.int64, device).reshape(-1)
        if b.shape[0] != lab.shape[0]:
            raise ValueError(f"targets[{i}]: {b.shape[0]} boxes but {lab.shape[0]} labels")
        boxes.append(b)
        labels.append(lab)
        index.append(torch.full((b.shape[0],), i, dtype=torch.int64, device=device))
    if not boxes:
        return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(boxes), torch.cat(labels), torch.cat(index)


def assign_targets(
    targets: Sequence[Target],
    grid_size: tuple[int, int],
    anchors: Sequence[Sequence[float]] = VOC_ANCHORS,
    stride: float | tuple[float, float] = YOLO_STRIDE,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> Assignment:
    """Assign each ground-truth box to its centre's cell and best-shaped anchor (see module doc).

    ``targets[i]`` is ``{"boxes": [N, 4] x1, y1, x2, y2 input pixels, "labels": [N]}`` (or a
    ``(boxes, labels)`` pair; tensors or arrays); ``grid_size`` is ``(H, W)``; ``stride`` the
    pixels per cell (``(sy, sx)`` or one number).
    """
    device = torch.device(device)
    gh, gw = grid_size
    sy, sx = (float(stride), float(stride)) if isinstance(stride, (int, float)) else map(float, stride)
    anchor_wh = torch.tensor(_check_anchors(anchors), dtype=torch.float32, device=device)
    boxes, labels, index = _gather(targets, device)
    if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"target labels must be in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
    if boxes.numel() and not torch.isfinite(boxes).all():
        raise ValueError("target boxes must be finite")
    # Grid units.
    scale = boxes.new_tensor([sx, sy, sx, sy])
    g = boxes / scale
    wh = g[:, 2:] - g[:, :2]
    valid = (wh > 0).all(dim=1)
    g, wh, labels, index = g[valid], wh[valid], labels[valid], index[valid]
    centre = (g[:, :2] + g[:, 2:]) / 2
    cell = centre.floor().long()
    gx = cell[:, 0].clamp(0, gw - 1)
    gy = cell[:, 1].clamp(0, gh - 1)
    # Shape IoU with every anchor (boxes sharing a centre).
    inter = torch.minimum(wh[:, None, :], anchor_wh[None]).prod(-1)
    shape_iou = inter / (wh.prod(-1)[:, None] + anchor_wh.prod(-1)[None] - inter)
    anchor = shape_iou.argmax(dim=1)
    # Collisions: keep the largest box per (image, cell, anchor), independent of order.
    area = wh.prod(-1)
    key = ((index * gh + gy) * gw + gx) * anchor_wh.shape[0] + anchor
    order = torch.argsort(area, stable=True)
    order = order[torch.argsort(key[order], stable=True)]
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    keep = order[counts.cumsum(0) - 1]  # last (largest) of each key group
    keep = keep.sort().values  # annotation order
    gx, gy, anchor, index, labels = gx[keep], gy[keep], anchor[keep], index[keep], labels[keep]
    g, wh, centre = g[keep], wh[keep], centre[keep]
    txy = (centre - torch.stack((gx, gy), dim=1).to(centre.dtype)).clamp(0.0, 1.0)
    twh = torch.log(wh / anchor_wh[anchor])
    return Assignment(
        batch=index,
        gy=gy,
        gx=gx,
        anchor=anchor,
        labels=labels,
        txy=txy,
        twh=twh,
        boxes=g,
        area_fraction=wh.prod(-1) / (gh * gw),
    )


class YOLOv2Loss(nn.Module):
    """YOLOv2 loss; ``loss(predictions, targets) -> (total, components)`` (module docstring).

    ``components`` holds detached tensors: the weighted terms ``coord``, ``obj``, ``noobj``,
    ``cls`` (summing to ``total``), plus ``iou`` (mean IoU of assigned predictions with their
    ground truths) and ``num_targets`` (assigned ground truths in the batch).
    """

    def __init__(
        self,
        num_classes: int = 20,
        anchors: Sequence[Sequence[float]] = VOC_ANCHORS,
        *,
        stride: int = YOLO_STRIDE,
        object_scale: float = 5.0,
        noobject_scale: float = 1.0,
        coord_scale: float = 1.0,
        class_scale: float = 1.0,
        ignore_iou: float = 0.6,
        box_size_weighting: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        if not 0.0 <= ignore_iou <= 1.0:
            raise ValueError(f"ignore_iou must be in [0, 1], got {ignore_iou}")
        for name, v in (("object_scale", object_scale), ("noobject_scale", noobject_scale), ("coord_scale", coord_scale), ("class_scale", class_scale)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.num_classes = int(num_classes)
        self.anchors = _check_anchors(anchors)
        self.stride = stride
        self.object_scale = float(object_scale)
        self.noobject_scale = float(noobject_scale)
        self.coord_scale = float(coord_scale)
        self.class_scale = float(class_scale)
        self.ignore_iou = float(ignore_iou)
        self.box_size_weighting = bool(box_size_weighting)

    def _check(self, predictions: Tensor, targets: Sequence[Target]) -> None:
        a, d = len(self.anchors), 5 + self.num_classes
        if predictions.dim() != 5 or predictions.shape[3] != a or predictions.shape[4] != d:
            raise ValueError(f"predictions must be [B, H, W, {a}, {d}], got shape {tuple(predictions.shape)}")
        if len(targets) != predictions.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {predictions.shape[0]} predictions")

    @torch.no_grad()
    def build_targets(self, predictions: Tensor, targets: Sequence[Target]) -> YOLOTargets:
        """Assignment, objectness targets/weights and the ignore mask for ``predictions``."""
        self._check(predictions, targets)
        p = predictions.detach().float()
        bsz, gh, gw, na = p.shape[:4]
        asg = assign_targets(targets, (gh, gw), self.anchors, self.stride, self.num_classes, p.device)
        pred_boxes = cxcywh_to_xyxy(decode_boxes(p, self.anchors))  # [B, H, W, A, 4] grid cells
        # Ignore rule: best IoU of every predicted box with any ground truth of its image.
        ignored = torch.zeros(bsz, gh, gw, na, dtype=torch.bool, device=p.device)
        if asg.batch.numel():
            gts, gidx = self._all_boxes(targets, p.device, gh, gw)
            if gts.shape[0]:
                counts = torch.bincount(gidx, minlength=bsz)
                nmax = int(counts.max())
                slot = torch.arange(gidx.shape[0], device=p.device) - (counts.cumsum(0) - counts)[gidx]
                padded = gts.new_zeros(bsz, nmax, 4)
                present = torch.zeros(bsz, nmax, dtype=torch.bool, device=p.device)
                padded[gidx, slot] = gts
                present[gidx, slot] = True
                iou = box_iou_xyxy(pred_boxes.reshape(bsz, -1, 1, 4), padded[:, None])  # [B, HWA, N]
                best = iou.masked_fill(~present[:, None], -1.0).amax(dim=-1)
                ignored = (best > self.ignore_iou).view(bsz, gh, gw, na)
        responsible = torch.zeros_like(ignored)
        responsible[asg.batch, asg.gy, asg.gx, asg.anchor] = True
        ignored &= ~responsible
        iou_k = box_iou_xyxy(pred_boxes[asg.batch, asg.gy, asg.gx, asg.anchor], asg.boxes)
        obj_target = p.new_zeros(bsz, gh, gw, na)
        obj_target[asg.batch, asg.gy, asg.gx, asg.anchor] = iou_k
        obj_weight = torch.full_like(obj_target, self.noobject_scale)
        obj_weight[ignored] = 0.0
        obj_weight[responsible] = self.object_scale
        return YOLOTargets(asg, obj_target, obj_weight, ignored, iou_k)

    def _all_boxes(self, targets: Sequence[Target], device: torch.device, gh: int, gw: int) -> tuple[Tensor, Tensor]:
        """Every valid ground truth (not only the assigned ones) in grid cells, with image index."""
        boxes, _, index = _gather(targets, device)
        keep = (boxes[:, 2:] > boxes[:, :2]).all(dim=1)
        return boxes[keep] / float(self.stride), index[keep]

    def forward(self, predictions: Tensor, targets: Sequence[Target]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar, per image) and its detached components."""
        t = self.build_targets(predictions, targets)
        asg = t.assignment
        p = predictions.float()
        bsz = p.shape[0]
        obj_err = 0.5 * t.obj_weight * (torch.sigmoid(p[..., 4]) - t.obj_target) ** 2
        responsible = t.obj_weight.new_zeros(t.obj_weight.shape, dtype=torch.bool)
        responsible[asg.batch, asg.gy, asg.gx, asg.anchor] = True
        obj = obj_err[responsible].sum()
        noobj = obj_err[~responsible].sum()
        pk = p[asg.batch, asg.gy, asg.gx, asg.anchor]  # [K, 5 + C]
        w = self.coord_scale * ((2.0 - asg.area_fraction) if self.box_size_weighting else torch.ones_like(asg.area_fraction))
        coord = 0.5 * (
            w[:, None] * ((torch.sigmoid(pk[:, 0:2]) - asg.txy) ** 2 + (pk[:, 2:4] - asg.twh) ** 2)
        ).sum()
        cls = self.class_scale * F.cross_entropy(pk[:, 5:], asg.labels, reduction="sum")
        total = (coord + obj + noobj + cls) / bsz
        k = asg.batch.numel()
        components = {
            "coord": coord.detach() / bsz,
            "obj": obj.detach() / bsz,
            "noobj": noobj.detach() / bsz,
            "cls": cls.detach() / bsz,
            "iou": t.iou.mean() if k else p.new_zeros(()),
            "num_targets": torch.tensor(k, device=p.device),
        }
        return total, components
