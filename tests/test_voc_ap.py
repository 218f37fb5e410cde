"""VOC AP: hand-computed golden cases, a loop-form VOCdevkit-style reference, COCO cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_det.eval.coco import coco_evaluate
from resist_det.eval.voc_ap import box_iou_voc, evaluate_detections, voc_ap

G1 = [0, 0, 9, 9]  # 10 x 10 pixels under the inclusive convention
G2 = [20, 20, 29, 29]
FAR = [50, 50, 59, 59]


def gt(boxes, labels=None, difficult=None) -> dict:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return {"boxes": boxes,
            "labels": np.zeros(len(boxes), int) if labels is None else np.asarray(labels),
            "difficult": np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)}


def det(boxes, scores, labels=None) -> dict:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return {"boxes": boxes, "scores": np.asarray(scores, float),
            "labels": np.zeros(len(boxes), int) if labels is None else np.asarray(labels)}


# ---------------------------------------------------------------- golden cases

def test_basic_curve_both_metrics() -> None:
    # GT: image 0 has G1, G2; image 1 has G1 -> npos = 3.
    # Detections by score: .9 img0 G1 (TP), .8 img0 FAR (FP), .7 img1 G1 (TP),
    #                      .6 img0 G1 again (duplicate -> FP), .5 img0 G2 (TP).
    # cum TP 1,1,2,2,3 ; cum FP 0,1,1,2,2
    # recall    1/3, 1/3, 2/3, 2/3, 1
    # precision 1,   1/2, 2/3, 1/2, 3/5
    # envelope  1,   2/3, 2/3, 3/5, 3/5
    # all-point: 1/3*1 + 1/3*2/3 + 1/3*3/5 = 15/45 + 10/45 + 9/45 = 34/45
    # 11-point: t=0,.1,.2,.3 -> 1 (recall 1/3 >= .3); t=.4,.5,.6 -> 2/3; t=.7,.8,.9,1 -> 3/5
    #           (4*1 + 3*2/3 + 4*3/5) / 11 = 8.4 / 11
    gts = [gt([G1, G2]), gt([G1])]
    dets = [det([G1, FAR, G1, G2], [0.9, 0.8, 0.6, 0.5]), det([G1], [0.7])]
    r = evaluate_detections(dets, gts, num_classes=1)
    assert r.npos.tolist() == [3] and r.num_detections.tolist() == [5]
    assert r.ap_all[0] == pytest.approx(34 / 45)
    assert r.ap_07[0] == pytest.approx(8.4 / 11)
    assert r.map_all == pytest.approx(34 / 45) and r.map_07 == pytest.approx(8.4 / 11)
    assert r.map == r.map_07  # default metric is VOC2007 11-point
    assert evaluate_detections(dets, gts, 1, use_07_metric=False).map == pytest.approx(34 / 45)


def test_voc_ap_direct() -> None:
    rec = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]
    prec = [1.0, 0.5, 2 / 3, 0.5, 0.6]
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(34 / 45)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(8.4 / 11)
    # curve stopping at recall 0.5 with precision 1: all-point 0.5; 11-point t=0..0.5 -> 6/11
    assert voc_ap([0.25, 0.5], [1.0, 1.0], False) == pytest.approx(0.5)
    assert voc_ap([0.25, 0.5], [1.0, 1.0], True) == pytest.approx(6 / 11)
    assert voc_ap([], [], True) == 0.0 and voc_ap([], [], False) == 0.0
    with pytest.raises(ValueError, match="non-decreasing"):
        voc_ap([0.5, 0.2], [1.0, 1.0])
    with pytest.raises(ValueError, match="equal length"):
        voc_ap([0.5], [1.0, 1.0])


def test_eleven_point_threshold_is_exactly_point_three() -> None:
    # 10 GT, 3 correct detections: recall 0.1, 0.2, 0.3 at precision 1.
    # 11-point: t = 0, .1, .2, .3 reached -> 4/11 (np.arange(0, 1.1, .1) would give 3/11).
    # all-point: 0.3 * 1 = 0.3
    boxes = [[20 * k, 0, 20 * k + 9, 9] for k in range(10)]
    r = evaluate_detections([det(boxes[:3], [0.9, 0.8, 0.7])], [gt(boxes)], 1)
    assert r.ap_07[0] == pytest.approx(4 / 11)
    assert r.ap_all[0] == pytest.approx(0.3)


def test_difficult_objects_are_ignored() -> None:
    # G1 normal, G2 difficult -> npos = 1.
    # .9 on G2 -> ignored ; .8 FAR -> FP ; .7 on G1 -> TP ; .6 on G2 again -> ignored (no duplicate FP)
    # counted curve: FP, TP -> recall 0, 1 ; precision 0, 1/2
    # all-point: 1 * 1/2 = 0.5 ; 11-point: every t is reached by recall 1 with envelope 1/2 -> 0.5
    # (treating the ignored ones as FP would give precision 1/3 at recall 1 instead)
    gts = [gt([G1, G2], difficult=[False, True])]
    dets = [det([G2, FAR, G1, G2], [0.9, 0.8, 0.7, 0.6])]
    r = evaluate_detections(dets, gts, 1)
    assert r.npos.tolist() == [1]
    assert r.ap_all[0] == pytest.approx(0.5) and r.ap_07[0] == pytest.approx(0.5)


def test_only_difficult_gt_gives_nan() -> None:
    r = evaluate_detections([det([G1], [0.9])], [gt([G1], difficult=[True])], 1)
    assert r.npos.tolist() == [0] and math.isnan(r.ap_07[0]) and math.isnan(r.map_all)


def test_duplicates_before_and_after_full_recall() -> None:
    # after: G1 .9 TP, G2 .8 TP, G1 .7 dup FP -> recall .5, 1, 1 ; precision 1, 1, 2/3
    #        envelope 1 up to recall 1 -> AP 1 under both metrics
    gts = [gt([G1, G2])]
    r = evaluate_detections([det([G1, G2, G1], [0.9, 0.8, 0.7])], gts, 1)
    assert r.ap_all[0] == pytest.approx(1.0) and r.ap_07[0] == pytest.approx(1.0)
    # before: G1 .9 TP, G1 .8 dup FP, G2 .7 TP -> recall .5, .5, 1 ; precision 1, 1/2, 2/3
    #   all-point: .5 * 1 + .5 * 2/3 = 5/6
    #   11-point: t = 0..0.5 (6 points) -> 1 ; t = 0.6..1 (5 points) -> 2/3 ; (6 + 10/3) / 11 = 28/33
    r = evaluate_detections([det([G1, G1, G2], [0.9, 0.8, 0.7])], gts, 1)
    assert r.ap_all[0] == pytest.approx(5 / 6) and r.ap_07[0] == pytest.approx(28 / 33)


def test_class_without_gt_and_class_without_detections() -> None:
    # class 0: perfect (AP 1); class 1: detections but no GT (NaN, excluded);
    # class 2: GT but no detections (AP 0) -> mAP = (1 + 0) / 2 = 0.5
    gts = [gt([G1, G2], labels=[0, 2])]
    dets = [det([G1, FAR], [0.9, 0.8], labels=[0, 1])]
    r = evaluate_detections(dets, gts, 3, class_names=["a", "b", "c"])
    assert r.ap_all[0] == 1.0 and math.isnan(r.ap_all[1]) and r.ap_all[2] == 0.0
    assert math.isnan(r.ap_07[1]) and r.ap_07[2] == 0.0
    assert r.map_all == pytest.approx(0.5) and r.map_07 == pytest.approx(0.5)
    assert r.npos.tolist() == [1, 0, 1]
    d = r.to_dict()
    assert d["per_class"]["c"]["ap_all"] == 0.0 and "mAP" in r.summary()


def test_perfect_detector_many_images() -> None:
    rng = np.random.default_rng(0)
    gts, dets = [], []
    for _ in range(20):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (n, 2))], 1)
        labels = rng.integers(0, 4, n)
        gts.append(gt(boxes, labels))
        dets.append(det(boxes, rng.random(n), labels))
    r = evaluate_detections(dets, gts, 4)
    valid = r.npos > 0
    assert np.all(r.ap_07[valid] == 1.0) and np.all(r.ap_all[valid] == 1.0)
    assert r.map_07 == 1.0 and r.map_all == 1.0


def test_iou_threshold_is_strict_and_inclusive_pixels() -> None:
    # inclusive areas: G1 = 10*10 = 100 ; [0,0,9,4] = 10*5 = 50, inside G1 -> IoU = 50/100 = 0.5 -> not a TP
    assert box_iou_voc([[0, 0, 9, 4]], [G1])[0, 0] == pytest.approx(0.5)
    r = evaluate_detections([det([[0, 0, 9, 4]], [0.9])], [gt([G1])], 1)
    assert r.ap_all[0] == 0.0
    # "+1" matters: [1,1,2,2] is 2x2 = 4 px, [1,1,2,3] is 2x3 = 6 px -> IoU 4/6 > .5 (TP);
    # without +1 it would be 1/2 = 0.5 -> FP
    assert box_iou_voc([[1, 1, 2, 3]], [[1, 1, 2, 2]])[0, 0] == pytest.approx(4 / 6)
    r = evaluate_detections([det([[1, 1, 2, 3]], [0.9])], [gt([[1, 1, 2, 2]])], 1)
    assert r.ap_all[0] == 1.0


def test_best_gt_already_taken_is_fp_like_vocdevkit() -> None:
    # Two GT: A = [0,0,9,9], B = [0,2,9,11] (IoU(A,B) = 80/120). Detection d2 = [0,0,9,9] overlaps
    # A best (IoU 1) and B by 0.667; A was already taken by d1 -> d2 is FP (VOCdevkit only tries jmax).
    a, b = [0, 0, 9, 9], [0, 2, 9, 11]
    r = evaluate_detections([det([a, a], [0.9, 0.8])], [gt([a, b])], 1)
    # TP, FP -> recall .5, .5 ; precision 1, .5 -> all-point 0.5
    assert r.ap_all[0] == pytest.approx(0.5)


def test_torch_inputs_and_validation() -> None:
    gts = [{"boxes": torch.tensor([G1], dtype=torch.float32), "labels": torch.tensor([0])}]  # no difficult key
    dets = [{"boxes": torch.tensor([G1]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}]
    assert evaluate_detections(dets, gts, 1).map_07 == 1.0
    with pytest.raises(ValueError, match="aligned"):
        evaluate_detections(dets, gts + gts, 1)
    with pytest.raises(ValueError, match=r"detections\[0\].*labels"):
        evaluate_detections([det([G1], [0.5], labels=[3])], [gt([G1])], 2)
    with pytest.raises(ValueError, match=r"detections\[0\].*lengths"):
        evaluate_detections([det([G1], [0.5, 0.4])], [gt([G1])], 1)


# ---------------------------------------------------------------- loop-form reference

def reference_voc_eval(dets: list[dict], gts: list[dict], num_classes: int, thr: float = 0.5):
    """Straightforward VOCdevkit-style evaluation, one detection at a time."""
    ap07, apall = [], []
    for c in range(num_classes):
        recs = {}
        npos = 0
        for i, g in enumerate(gts):
            m = np.asarray(g["labels"]) == c
            recs[i] = {"bbox": np.asarray(g["boxes"], float)[m], "difficult": np.asarray(g["difficult"], bool)[m],
                       "det": [False] * int(m.sum())}
            npos += int((~recs[i]["difficult"]).sum())
        image_ids, conf, bbs = [], [], []
        for i, d in enumerate(dets):
            for b, s, lab in zip(np.asarray(d["boxes"], float), d["scores"], d["labels"]):
                if lab == c:
                    image_ids.append(i), conf.append(s), bbs.append(b)
        order = np.argsort(-np.asarray(conf), kind="stable")
        tp, fp = [], []
        for k in order:
            r, bb = recs[image_ids[k]], bbs[k]
            ovmax, jmax = -np.inf, -1
            for j, g in enumerate(r["bbox"]):
                iw = max(min(bb[2], g[2]) - max(bb[0], g[0]) + 1.0, 0.0)
                ih = max(min(bb[3], g[3]) - max(bb[1], g[1]) + 1.0, 0.0)
                inter = iw * ih
                uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inter
                ov = inter / uni
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax > thr:
                if r["difficult"][jmax]:
                    continue  # ignored
                if not r["det"][jmax]:
                    r["det"][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if npos == 0:
            ap07.append(float("nan")), apall.append(float("nan"))
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        rec = ctp / npos
        prec = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
        # 11-point
        s = 0.0
        for t in [k / 10 for k in range(11)]:
            s += (max(p for p, rr in zip(prec, rec) if rr >= t) if any(rr >= t for rr in rec) else 0.0) / 11
        ap07.append(s)
        # all-point
        mrec = [0.0, *rec, 1.0]
        mpre = [0.0, *prec, 0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        apall.append(sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]))
    return np.array(ap07), np.array(apall)


def random_problem(rng: np.random.Generator, n_images: int, num_classes: int, round_scores: bool = False):
    gts, dets = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(3, 80, (n, 2))], 1)
        labels = rng.integers(0, num_classes, n)
        gts.append(gt(boxes, labels, rng.random(n) < 0.15))
        m = int(rng.integers(0, 12))
        if n:
            src = rng.integers(0, n, m)
            db = boxes[src] + rng.normal(0, 6, (m, 4))
            dl = np.where(rng.random(m) < 0.8, labels[src], rng.integers(0, num_classes, m))
        else:
            xy = rng.uniform(0, 200, (m, 2))
            db = np.concatenate([xy, xy + 30], 1)
            dl = rng.integers(0, num_classes, m)
        scores = rng.random(m)
        dets.append(det(db, np.round(scores, 1) if round_scores else scores, dl))
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("round_scores", [False, True])
def test_matches_loop_reference(seed: int, round_scores: bool) -> None:
    rng = np.random.default_rng(seed)
    dets, gts = random_problem(rng, 60, 5, round_scores)
    ref07, refall = reference_voc_eval(dets, gts, 5)
    r = evaluate_detections(dets, gts, 5)
    np.testing.assert_allclose(r.ap_07, ref07, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.ap_all, refall, rtol=0, atol=1e-12)
    r7 = evaluate_detections(dets, gts, 5, iou_threshold=0.7)
    np.testing.assert_allclose(r7.ap_all, reference_voc_eval(dets, gts, 5, 0.7)[1], rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_images=st.integers(1, 8), num_classes=st.integers(1, 3))
def test_matches_loop_reference_property(seed: int, n_images: int, num_classes: int) -> None:
    dets, gts = random_problem(np.random.default_rng(seed), n_images, num_classes, round_scores=True)
    ref07, refall = reference_voc_eval(dets, gts, num_classes)
    r = evaluate_detections(dets, gts, num_classes)
    np.testing.assert_allclose(r.ap_07, ref07, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.ap_all, refall, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- COCO second opinion

def test_coco_perfect_detector_and_agreement() -> None:
    perfect_gts = [gt([G1, G2], labels=[0, 1]), gt([FAR], labels=[1])]
    perfect = [det([G1, G2], [0.9, 0.8], [0, 1]), det([FAR], [0.7], [1])]
    stats = coco_evaluate(perfect, perfect_gts, 3)
    assert stats.ap == pytest.approx(1.0) and stats.ap50 == pytest.approx(1.0)
    assert stats.per_class_ap[:2].tolist() == pytest.approx([1.0, 1.0]) and math.isnan(stats.per_class_ap[2])
    assert "Average Precision" in stats.log  # pycocotools output captured, not printed

    dets, gts = random_problem(np.random.default_rng(1), 150, 4)
    for g in gts:
        g["difficult"][:] = False  # crowd semantics differ from VOC difficult; compare plain GT
    voc = evaluate_detections(dets, gts, 4)
    coco = coco_evaluate(dets, gts, 4)
    # same IoUs ("+1" boxes); only 101-point vs all-point interpolation differs
    np.testing.assert_allclose(coco.per_class_ap50, voc.ap_all, atol=0.02)
    assert 0 < coco.ap < coco.ap50


def test_coco_difficult_modes() -> None:
    gts = [gt([G1, G2], difficult=[False, True])]
    dets = [det([G2, G1], [0.9, 0.8])]
    # crowd: detection on difficult G2 ignored -> perfect ; drop: it is a FP first -> AP50 < 1 ; keep: both TP
    assert coco_evaluate(dets, gts, 1, difficult="crowd").ap50 == pytest.approx(1.0)
    assert coco_evaluate(dets, gts, 1, difficult="drop").ap50 < 0.9
    assert coco_evaluate(dets, gts, 1, difficult="keep").ap50 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="difficult"):
        coco_evaluate(dets, gts, 1, difficult="bogus")  # type: ignore[arg-type]
