"""COCO-style AP (AP@[.5:.95], AP50, ...) via pycocotools, as a second opinion to VOC AP.

The COCO ground-truth and detection objects are built in memory from the same
per-image structures as :func:`resist_det.eval.voc_ap.evaluate_detections`.
Boxes ``xmin, ymin, xmax, ymax`` (VOC, inclusive pixels) become COCO
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` for both GT and detections,
so IoUs equal the VOC "+1" IoUs. Remaining differences from VOC AP: 101-point
interpolation, ``IoU >= t`` instead of ``>``, at most 100 detections per image and class.

Difficult GT (``difficult=`` argument):

* ``"crowd"`` (default): sent as ``iscrowd=1``, so detections on them are ignored as in
  VOC. Caveat: pycocotools scores a crowd region by intersection over the
  *detection's* area and lets it absorb several detections.
* ``"drop"``: removed; detections on them count as false positives.
* ``"keep"``: treated as ordinary GT (counted in recall).

pycocotools' console output is captured and returned as ``CocoStats.log``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_STAT_NAMES", "CocoStats", "coco_evaluate"]

COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


@dataclass(frozen=True)
class CocoStats:
    """COCOeval summary stats (NaN where pycocotools reports -1, i.e. nothing to score)."""

    stats: dict[str, float]  # keys COCO_STAT_NAMES
    per_class_ap: np.ndarray  # [C] AP@[.5:.95], NaN for classes without GT
    per_class_ap50: np.ndarray  # [C] AP@.5
    log: str = field(default="", repr=False)  # captured pycocotools output

    @property
    def ap(self) -> float:
        """AP@[.5:.95]."""
        return self.stats["AP"]

    @property
    def ap50(self) -> float:
        """AP@.5 (101-point)."""
        return self.stats["AP50"]


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    out[:, 0] = boxes[:, 0] - 1.0
    out[:, 1] = boxes[:, 1] - 1.0
    out[:, 2] = boxes[:, 2] - boxes[:, 0] + 1.0
    out[:, 3] = boxes[:, 3] - boxes[:, 1] + 1.0
    return out


def _make_coco(images: list[dict[str, Any]], categories: list[dict[str, Any]], anns: list[dict[str, Any]]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    coco.createIndex()
    return coco


def _class_mean(p: np.ndarray) -> np.ndarray:
    """Mean over every axis but the last (classes) of COCOeval's precision, ignoring its -1 (no data)."""
    valid = p > -1
    total = np.where(valid, p, 0.0).sum(axis=tuple(range(p.ndim - 1)))
    count = valid.sum(axis=tuple(range(p.ndim - 1)))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _annotations(detections: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]], num_classes: int,
                 difficult: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO ``images``, ground-truth and detection annotations (1-based ids, category = label + 1)."""
    images: list[dict[str, Any]] = []
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for i, (gt, dt) in enumerate(zip(ground_truths, detections)):
        h, w = gt.get("size", (0, 0))
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        boxes = _numpy(gt["boxes"], np.float64).reshape(-1, 4)
        labels = _numpy(gt["labels"], np.int64).reshape(-1)
        flags = gt.get("difficult")
        flags = np.zeros(len(boxes), bool) if flags is None else _numpy(flags, bool).reshape(-1)
        for box, lab, flag in zip(_xywh(boxes).tolist(), labels.tolist(), flags.tolist()):
            if not 0 <= lab < num_classes:
                raise ValueError(f"ground_truths[{i}]: label {lab} not in [0, {num_classes})")
            if flag and difficult == "drop":
                continue
            crowd = int(flag and difficult == "crowd")
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": lab + 1,
                            "bbox": box, "area": box[2] * box[3], "iscrowd": crowd})
        boxes = _numpy(dt["boxes"], np.float64).reshape(-1, 4)
        labels = _numpy(dt["labels"], np.int64).reshape(-1)
        scores = _numpy(dt["scores"], np.float64).reshape(-1)
        if not (len(boxes) == len(labels) == len(scores)):
            raise ValueError(f"detections[{i}]: boxes, labels and scores lengths differ")
        for box, lab, score in zip(_xywh(boxes).tolist(), labels.tolist(), scores.tolist()):
            if not 0 <= lab < num_classes:
                raise ValueError(f"detections[{i}]: label {lab} not in [0, {num_classes})")
            dt_anns.append({"id": len(dt_anns) + 1, "image_id": i + 1, "category_id": lab + 1,
                            "bbox": box, "area": box[2] * box[3], "score": score, "iscrowd": 0})

    return images, gt_anns, dt_anns


def coco_evaluate(
    detections: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    *,
    difficult: Literal["crowd", "drop", "keep"] = "crowd",
) -> CocoStats:
    """Run pycocotools' bbox COCOeval on per-image detections / ground truth.

    Same inputs as :func:`evaluate_detections`: ``detections[i]`` with ``boxes``,
    ``scores``, ``labels``; ``ground_truths[i]`` with ``boxes``, ``labels`` and optional
    ``difficult``, plus optional ``size`` ``(h, w)`` (only informational for COCO).
    """
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"detections has {len(detections)} images but ground_truths has {len(ground_truths)}"
        )
    if difficult not in ("crowd", "drop", "keep"):
        raise ValueError(f"difficult must be 'crowd', 'drop' or 'keep', got {difficult!r}")
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    images, gt_anns, dt_anns = _annotations(detections, ground_truths, num_classes, difficult)

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_gt = _make_coco(images, categories, gt_anns)
        coco_dt = _make_coco(images, categories, dt_anns)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = {n: (float(v) if v >= 0 else float("nan")) for n, v in zip(COCO_STAT_NAMES, evaluator.stats)}
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max-dets]
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    iou_thrs = evaluator.params.iouThrs

    per_class_ap = _class_mean(precision)
    per_class_ap50 = _class_mean(precision[np.isclose(iou_thrs, 0.5)][0])
    return CocoStats(stats=stats, per_class_ap=per_class_ap, per_class_ap50=per_class_ap50, log=buffer.getvalue())
