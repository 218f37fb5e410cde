"""Pascal VOC detection AP, computed in memory and vectorised with numpy.

Matching follows the VOCdevkit rules:

* IoU uses the inclusive pixel convention (width = x2 - x1 + 1).
* Per class, detections from all images are sorted by score, descending (ties keep
  input order: image order, then order within the image; VOCdevkit's unstable sort
  leaves ties arbitrary).
* Each detection looks at the GT box of its class in its image with the highest IoU
  (first one on ties), among all of them, matched or not, difficult or not. If that
  IoU is strictly greater than ``iou_threshold`` (VOCdevkit: ``ovmax > ovthresh``):
  a difficult GT makes the detection ignored (neither TP nor FP); otherwise it is a
  TP if that GT is still unmatched, else a FP (duplicate). Below the threshold: FP.
* ``npos`` counts non-difficult GT. A class with ``npos == 0`` has AP = NaN and is
  left out of the mAP; a class with GT but no detections has AP = 0.

Because a detection's best GT does not depend on the matching state, the greedy
assignment reduces to "the first detection, in score order, that picks a given GT
is its TP", which is computed without per-detection Python loops.

The 11-point metric (VOC2007) uses the recall thresholds ``k / 10`` exactly; the
widespread ``np.arange(0, 1.1, 0.1)`` gives 0.30000000000000004 etc., which differs only
when a recall is exactly 0.3, 0.6 or 0.7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["VOCEvalResult", "box_iou_voc", "evaluate_detections", "voc_ap"]

_ELEVEN_POINTS = np.arange(11) / 10.0


def voc_ap(recall: np.ndarray | Sequence[float], precision: np.ndarray | Sequence[float], use_07_metric: bool = False) -> float:
    """Average precision from a recall/precision curve (points in score order).

    ``use_07_metric=True``: VOC2007 11-point interpolated AP, the mean over
    ``t in {0, 0.1, ..., 1}`` of ``max(precision[recall >= t])`` (0 if no such point).
    ``False``: VOC2010+ all-point AP, the area under the monotone precision envelope
    of the curve extended with ``(0, 0)`` and ``(1, 0)``. ``recall`` must be
    non-decreasing (as cumulative TP counts give). An empty curve has AP 0.
    """
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise ValueError(f"recall and precision must be 1-D of equal length, got {rec.shape} and {prec.shape}")
    if rec.size == 0:
        return 0.0
    if np.any(np.diff(rec) < 0):
        raise ValueError("recall must be non-decreasing (points in descending score order)")
    if use_07_metric:
        envelope = np.maximum.accumulate(prec[::-1])[::-1]  # envelope[i] = max(prec[i:])
        first = np.searchsorted(rec, _ELEVEN_POINTS, side="left")  # first i with rec[i] >= t
        reached = first < rec.size
        values = np.where(reached, envelope[np.minimum(first, rec.size - 1)], 0.0)
        return float(values.sum() / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    return float(np.sum(np.diff(mrec) * mpre[1:]))


def box_iou_voc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of ``xmin, ymin, xmax, ymax`` boxes, inclusive (+1) convention."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    return _iou_inclusive(a, b)


def _iou_inclusive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise (broadcast) IoU of boxes in the last axis, inclusive convention."""
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
    area_b = (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where(union > 0, iou, 0.0)


@dataclass(frozen=True)
class VOCEvalResult:
    """Per-class AP under both VOC definitions, plus mAPs (NaN classes excluded)."""

    ap_07: np.ndarray  # float64 [C], 11-point AP; NaN where npos == 0
    ap_all: np.ndarray  # float64 [C], all-point AP; NaN where npos == 0
    npos: np.ndarray  # int64 [C], non-difficult GT boxes per class
    num_detections: np.ndarray  # int64 [C], detections per class (ignored ones included)
    map_07: float
    map_all: float
    use_07_metric: bool  # which definition ``ap`` / ``map`` report
    iou_threshold: float
    class_names: tuple[str, ...] | None = None

    @property
    def ap(self) -> np.ndarray:
        """Per-class AP under the requested metric."""
        return self.ap_07 if self.use_07_metric else self.ap_all

    @property
    def map(self) -> float:
        """mAP under the requested metric."""
        return self.map_07 if self.use_07_metric else self.map_all

    def to_dict(self) -> dict[str, Any]:
        """Plain-python view (class names as keys when known)."""
        names = self.class_names or tuple(str(i) for i in range(len(self.npos)))
        return {
            "map": self.map,
            "map_07": self.map_07,
            "map_all": self.map_all,
            "metric": "voc07_11point" if self.use_07_metric else "voc_allpoint",
            "iou_threshold": self.iou_threshold,
            "per_class": {
                n: {"ap_07": float(a7), "ap_all": float(aa), "npos": int(p), "num_detections": int(d)}
                for n, a7, aa, p, d in zip(names, self.ap_07, self.ap_all, self.npos, self.num_detections)
            },
        }

    def summary(self) -> str:
        """Fixed-width table of per-class AP and the mAPs."""
        names = self.class_names or tuple(str(i) for i in range(len(self.npos)))
        width = max(12, *(len(n) for n in names))
        lines = [f"{'class':<{width}} {'npos':>7} {'dets':>8} {'AP07':>7} {'APall':>7}"]
        for n, a7, aa, p, d in zip(names, self.ap_07, self.ap_all, self.npos, self.num_detections):
            lines.append(f"{n:<{width}} {p:>7d} {d:>8d} {a7:>7.4f} {aa:>7.4f}")
        lines.append(f"{'mAP':<{width}} {int(self.npos.sum()):>7d} {int(self.num_detections.sum()):>8d} "
                     f"{self.map_07:>7.4f} {self.map_all:>7.4f}")
        return "\n".join(lines)


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _stack(
    items: Sequence[Mapping[str, Any]], what: str, num_classes: int, fields: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-image boxes/labels/<third field> with an image-index column."""
    boxes, labels, extra, image = [], [], [], []
    third = fields[2]
    for i, item in enumerate(items):
        b = _numpy(item["boxes"], np.float64).reshape(-1, 4)
        lab = _numpy(item["labels"], np.int64).reshape(-1)
        if third == "difficult":
            e = item.get("difficult")
            e = np.zeros(len(b), bool) if e is None else _numpy(e, bool).reshape(-1)
        else:
            e = _numpy(item[third], np.float64).reshape(-1)
        if not (len(b) == len(lab) == len(e)):
            raise ValueError(
                f"{what}[{i}]: boxes ({len(b)}), labels ({len(lab)}) and {third} ({len(e)}) lengths differ"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"{what}[{i}]: labels must be in [0, {num_classes}), got {lab.min()}..{lab.max()}")
        if not np.isfinite(b).all() or (third == "scores" and not np.isfinite(e).all()):
            raise ValueError(f"{what}[{i}]: non-finite boxes or {third}")
        boxes.append(b)
        labels.append(lab)
        extra.append(e)
        image.append(np.full(len(b), i, np.int64))
    if not items:
        return np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool if third == "difficult" else np.float64), np.zeros(0, np.int64)
    return np.concatenate(boxes), np.concatenate(labels), np.concatenate(extra), np.concatenate(image)


def _match(
    det_boxes: np.ndarray,
    det_key: np.ndarray,
    gt_boxes: np.ndarray,
    gt_key: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection: max IoU over GT with the same key and that GT's index (-1 if none)."""
    ndet = len(det_key)
    ovmax = np.full(ndet, -np.inf)
    jmax = np.full(ndet, -1, np.int64)
    if ndet == 0 or len(gt_key) == 0:
        return ovmax, jmax
    gt_order = np.argsort(gt_key, kind="stable")  # keeps annotation order within a key
    sorted_keys = gt_key[gt_order]
    start = np.searchsorted(sorted_keys, det_key, side="left")
    counts = np.searchsorted(sorted_keys, det_key, side="right") - start
    total = int(counts.sum())
    if total == 0:
        return ovmax, jmax
    has = counts > 0
    pair_det = np.repeat(np.arange(ndet), counts)
    seg_start = np.cumsum(counts) - counts  # first pair of each detection
    within = np.arange(total) - np.repeat(seg_start, counts)
    pair_gt = gt_order[np.repeat(start, counts) + within]
    iou = _iou_inclusive(det_boxes[pair_det], gt_boxes[pair_gt])
    best = np.maximum.reduceat(iou, seg_start[has])
    ovmax[has] = best
    is_best = np.flatnonzero(iou == np.repeat(best, counts[has]))
    first_det, first_pos = np.unique(pair_det[is_best], return_index=True)  # first max, as argmax
    jmax[first_det] = pair_gt[is_best[first_pos]]
    return ovmax, jmax


def _class_aps(det_labels: np.ndarray, det_scores: np.ndarray, ovmax: np.ndarray, jmax: np.ndarray,
               gt_difficult: np.ndarray, npos: np.ndarray, num_classes: int, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP (VOC07 11-point, all-point) from each detection's best match (NaN: no positives)."""
    # Group by class, descending score within a class, ties in input order: a stable
    # score sort followed by a stable (radix, for small ints) sort on the label.
    order = np.argsort(-det_scores, kind="stable")
    label_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int64
    order = order[np.argsort(det_labels[order].astype(label_dtype), kind="stable")]
    det_labels, ovmax, jmax = det_labels[order], ovmax[order], jmax[order]
    hit = ovmax > iou_threshold
    hit_difficult = np.zeros_like(hit)
    hit_difficult[hit] = gt_difficult[jmax[hit]]
    candidate = np.flatnonzero(hit & ~hit_difficult)  # in score order within each class
    tp = np.zeros(len(order), bool)
    _, first = np.unique(jmax[candidate], return_index=True)  # first claimer of each GT wins
    tp[candidate[first]] = True
    counted = ~hit_difficult  # ignored detections are dropped from the curve

    ap_07 = np.full(num_classes, np.nan)
    ap_all = np.full(num_classes, np.nan)
    bounds = np.searchsorted(det_labels, np.arange(num_classes + 1))
    for c in range(num_classes):
        if npos[c] == 0:
            continue
        sl = slice(bounds[c], bounds[c + 1])
        tp_c = tp[sl][counted[sl]]
        ctp = np.cumsum(tp_c)
        cfp = np.cumsum(~tp_c)
        rec = ctp / npos[c]
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        ap_07[c] = voc_ap(rec, prec, use_07_metric=True)
        ap_all[c] = voc_ap(rec, prec, use_07_metric=False)

    return ap_07, ap_all


def evaluate_detections(
    detections: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    class_names: Sequence[str] | None = None,
) -> VOCEvalResult:
    """VOC AP of per-image detections against per-image ground truth (rules in module doc).

    ``detections[i]`` has ``boxes`` [N, 4], ``scores`` [N], ``labels`` [N] for image i;
    ``ground_truths[i]`` has ``boxes`` [M, 4], ``labels`` [M] and optionally
    ``difficult`` [M] (e.g. :meth:`VOCDetection.get_annotation`). Boxes are
    ``xmin, ymin, xmax, ymax`` in the same (VOC pixel) frame; arrays may be numpy or
    torch. Both AP definitions are always computed; ``use_07_metric`` chooses which one
    ``result.ap`` / ``result.map`` report (default VOC2007 11-point, the VOC07 test protocol).
    """
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"detections has {len(detections)} images but ground_truths has {len(ground_truths)}; "
            f"they must be aligned per image"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")

    gt_boxes, gt_labels, gt_difficult, gt_image = _stack(ground_truths, "ground_truths", num_classes, ("boxes", "labels", "difficult"))
    det_boxes, det_labels, det_scores, det_image = _stack(detections, "detections", num_classes, ("boxes", "labels", "scores"))

    npos = np.bincount(gt_labels[~gt_difficult], minlength=num_classes).astype(np.int64)
    ndet = np.bincount(det_labels, minlength=num_classes).astype(np.int64)

    # Best GT per detection does not depend on the order, so match before sorting.
    ovmax, jmax = _match(det_boxes, det_image * num_classes + det_labels, gt_boxes, gt_image * num_classes + gt_labels)

    ap_07, ap_all = _class_aps(det_labels, det_scores, ovmax, jmax, gt_difficult, npos, num_classes, iou_threshold)

    def _mean(ap: np.ndarray) -> float:
        valid = ~np.isnan(ap)
        return float(ap[valid].mean()) if valid.any() else float("nan")

    return VOCEvalResult(
        ap_07=ap_07,
        ap_all=ap_all,
        npos=npos,
        num_detections=ndet,
        map_07=_mean(ap_07),
        map_all=_mean(ap_all),
        use_07_metric=use_07_metric,
        iou_threshold=float(iou_threshold),
        class_names=tuple(class_names) if class_names is not None else None,
    )
