"""Time ``evaluate_detections`` on a VOC-sized synthetic problem and check it against a
loop-form (VOCdevkit-style) reference on a subset.

Default problem: 5,000 images, 100 detections per image spread over 20 classes
(500,000 detections), ~3 GT boxes per image (10% difficult); detections are jittered
GT boxes (70%) or random boxes (30%), with scores favouring the former.

    python benchmarks/bench_voc_ap.py [--images 5000] [--dets 100] [--classes 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from resist_det.eval.voc_ap import evaluate_detections
from resist_det.record import host_line


def make_problem(rng: np.random.Generator, images: int, dets: int, classes: int, gt_mean: float):
    """Per-image GT and detection dicts in VOC pixel coordinates (500 x 375 images)."""
    gts, out = [], []
    for _ in range(images):
        n = int(rng.poisson(gt_mean))
        xy = rng.uniform(0, 400, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n, 2))], 1)
        labels = rng.integers(0, classes, n)
        gts.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.1})
        near = rng.random(dets) < 0.7 if n else np.zeros(dets, bool)
        src = rng.integers(0, max(n, 1), dets)
        db = np.empty((dets, 4))
        dl = rng.integers(0, classes, dets)
        if n:
            size = (boxes[src, 2:] - boxes[src, :2])[near]
            db[near] = boxes[src][near] + rng.normal(0, 0.12, (int(near.sum()), 4)) * np.tile(size, 2)
            dl[near] = np.where(rng.random(int(near.sum())) < 0.85, labels[src][near], dl[near])
        xy = rng.uniform(0, 400, (int((~near).sum()), 2))
        db[~near] = np.concatenate([xy, xy + rng.uniform(10, 200, xy.shape)], 1)
        scores = np.where(near, rng.beta(5, 2, dets), rng.beta(2, 5, dets))
        out.append({"boxes": db, "scores": scores, "labels": dl})
    return out, gts


def reference_map(dets, gts, classes: int, use_07: bool, thr: float = 0.5) -> float:
    """VOCdevkit-style loop evaluation (one detection, one GT at a time)."""
    aps = []
    for c in range(classes):
        recs, npos = {}, 0
        for i, g in enumerate(gts):
            m = g["labels"] == c
            recs[i] = (g["boxes"][m], g["difficult"][m], [False] * int(m.sum()))
            npos += int((~g["difficult"][m]).sum())
        ids, conf, bbs = [], [], []
        for i, d in enumerate(dets):
            m = d["labels"] == c
            ids += [i] * int(m.sum())
            conf += d["scores"][m].tolist()
            bbs += list(d["boxes"][m])
        tp, fp = [], []
        for k in np.argsort(-np.asarray(conf), kind="stable"):
            gb, diff, taken = recs[ids[k]]
            bb = bbs[k]
            ovmax, jmax = -np.inf, -1
            for j, g in enumerate(gb):
                iw = max(min(bb[2], g[2]) - max(bb[0], g[0]) + 1.0, 0.0)
                ih = max(min(bb[3], g[3]) - max(bb[1], g[1]) + 1.0, 0.0)
                inter = iw * ih
                ov = inter / ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter)
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax > thr and diff[jmax]:
                continue
            hit = ovmax > thr and not taken[jmax]
            if hit:
                taken[jmax] = True
            tp.append(hit)
            fp.append(not hit)
        if npos == 0:
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        rec, prec = ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
        if use_07:
            aps.append(sum(max([p for p, r in zip(prec, rec) if r >= t] or [0.0]) for t in np.arange(11) / 10) / 11)
        else:
            mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            aps.append(sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1)))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image (all classes)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--gt-per-image", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-images", type=int, default=5000, help="subset checked against the loop reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(host_line(), flush=True)  # the machine the figures below come from

    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    dets, gts = make_problem(rng, args.images, args.dets, args.classes, args.gt_per_image)
    n_det = sum(len(d["scores"]) for d in dets)
    n_gt = sum(len(g["labels"]) for g in gts)
    print(f"problem: {args.images} images, {n_det} detections, {n_gt} GT boxes, {args.classes} classes "
          f"(generated in {time.perf_counter() - t0:.2f} s)")

    for use_07 in (True, False):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = evaluate_detections(dets, gts, args.classes, use_07_metric=use_07)
            times.append(time.perf_counter() - t0)
        name = "VOC07 11-point" if use_07 else "all-point     "
        print(f"evaluate_detections {name}: best {min(times):.3f} s, median {np.median(times):.3f} s "
              f"over {args.repeats} runs; mAP = {result.map:.4f}")

    k = min(args.reference_images, args.images)
    if k <= 0:
        return
    sub_d, sub_g = dets[:k], gts[:k]
    for use_07 in (True, False):
        t0 = time.perf_counter()
        ref = reference_map(sub_d, sub_g, args.classes, use_07)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = evaluate_detections(sub_d, sub_g, args.classes, use_07_metric=use_07).map
        t_fast = time.perf_counter() - t0
        status = "OK" if abs(ref - fast) < 1e-12 else "MISMATCH"
        print(f"reference check on {k} images ({'07' if use_07 else 'all'}): loop {ref:.10f} ({t_ref:.2f} s) "
              f"vs vectorised {fast:.10f} ({t_fast:.3f} s): {status}")
        if status != "OK":
            sys.exit(1)


if __name__ == "__main__":
    main()
