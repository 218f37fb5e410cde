"""Box decoding for the YOLOv2-style detector (:mod:`resist_det.models.yolo`).

Anchor priors, :func:`decode_boxes`, :func:`decode_predictions` (score threshold +
class-aware NMS) and :func:`rescale_boxes`.  Input: raw (un-activated) predictions
``[B, H, W, A, 5 + C]``, channel order ``tx, ty, tw, th, to, class logits...``.
Decoding (grid-cell units, anchors in grid cells as YOLOv2's VOC priors)::

    x = (sigmoid(tx) + cx) * stride_x      w = anchor_w * exp(tw) * stride_x
    y = (sigmoid(ty) + cy) * stride_y      h = anchor_h * exp(th) * stride_y
    score[c] = sigmoid(to) * softmax(class logits)[c]

Boxes are continuous pixel-edge ``x1, y1, x2, y2`` of the network input (the frame of
:mod:`resist_det.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor

__all__ = [
    "VOC_ANCHORS",
    "cxcywh_to_xyxy",
    "decode_boxes",
    "decode_predictions",
    "rescale_boxes",
]

# YOLOv2's VOC anchor priors (width, height) in grid cells of a 13x13 (416 px) grid.
VOC_ANCHORS: tuple[tuple[float, float], ...] = (
    (1.3221, 1.73145),
    (3.19275, 4.00944),
    (5.05587, 8.09892),
    (9.47112, 4.84053),
    (11.2364, 10.0071),
)


def _check_anchors(anchors: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    try:
        out = tuple((float(w), float(h)) for w, h in anchors)
    except (TypeError, ValueError):
        out = ()
    if not out or any(w <= 0 or h <= 0 for w, h in out):
        raise ValueError(f"anchors must be a non-empty sequence of positive (w, h) pairs, got {anchors!r}")
    return out


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"{what} must be an int or (h, w), got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return h, w


def decode_boxes(predictions: Tensor, anchors: Sequence[Sequence[float]]) -> Tensor:
    """Boxes ``[..., H, W, A, 4]`` as ``cx, cy, w, h`` in grid cells from raw predictions
    ``[..., H, W, A, 5 + C]`` (differentiable; ``tw, th`` are clamped at 10 against overflow)."""
    h, w, a = predictions.shape[-4:-1]
    anchor_wh = torch.as_tensor(_check_anchors(anchors), dtype=predictions.dtype, device=predictions.device)
    if anchor_wh.shape[0] != a:
        raise ValueError(f"predictions have {a} anchors per cell but {anchor_wh.shape[0]} anchors were given")
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=predictions.dtype, device=predictions.device),
        torch.arange(w, dtype=predictions.dtype, device=predictions.device),
        indexing="ij",
    )
    cx = torch.sigmoid(predictions[..., 0]) + gx[:, :, None]
    cy = torch.sigmoid(predictions[..., 1]) + gy[:, :, None]
    bw = anchor_wh[:, 0] * torch.exp(predictions[..., 2].clamp(max=10.0))
    bh = anchor_wh[:, 1] * torch.exp(predictions[..., 3].clamp(max=10.0))
    return torch.stack((cx, cy, bw, bh), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2`` (last dimension)."""
    c, s = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((c - s, c + s), dim=-1)


@torch.no_grad()
def decode_predictions(
    predictions: Tensor,
    anchors: Sequence[Sequence[float]],
    image_size: int | Sequence[int],
    conf_threshold: float = 0.005,
    nms_iou: float = 0.45,
    max_detections: int = 100,
    pre_nms_top_k: int | None = 5000,
) -> list[dict[str, Tensor]]:
    """Detections per image from raw predictions ``[B, H, W, A, 5 + C]``.

    Every (anchor, class) pair whose score ``sigmoid(to) * softmax(cls)[c]`` exceeds
    ``conf_threshold`` is a candidate (as darknet's VOC evaluation, an anchor may yield
    several classes); boxes are clipped to the image, then class-aware NMS
    (``torchvision.ops.batched_nms``, IoU ``nms_iou``) keeps the best ``max_detections``.
    ``pre_nms_top_k`` bounds the candidates per image fed to NMS (``None``: no bound).

    Returns, per image, ``{"boxes": float32 [N, 4] x1, y1, x2, y2 pixels of the network
    input of size image_size (int or (h, w)), "scores": float32 [N], "labels": int64 [N]}``,
    sorted by decreasing score.
    """
    if predictions.dim() != 5:
        raise ValueError(f"predictions must be [B, H, W, A, 5 + C], got shape {tuple(predictions.shape)}")
    if not 0.0 <= conf_threshold < 1.0:
        raise ValueError(f"conf_threshold must be in [0, 1), got {conf_threshold}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    if pre_nms_top_k is not None and pre_nms_top_k < 1:
        raise ValueError(f"pre_nms_top_k must be >= 1 or None, got {pre_nms_top_k}")
    if predictions.shape[-1] < 6:
        raise ValueError(f"predictions' last dimension must be 5 + num_classes >= 6, got {predictions.shape[-1]}")
    img_h, img_w = _pair(image_size, "image_size")
    p = predictions.detach().float()
    bsz, gh, gw = p.shape[:3]
    stride = p.new_tensor([img_w / gw, img_h / gh, img_w / gw, img_h / gh])
    boxes = cxcywh_to_xyxy(decode_boxes(p, anchors)) * stride
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0.0, float(img_w))
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0.0, float(img_h))
    scores = torch.sigmoid(p[..., 4:5]) * torch.softmax(p[..., 5:], dim=-1)
    num_classes = scores.shape[-1]
    boxes, scores = boxes.reshape(bsz, -1, 4), scores.reshape(bsz, -1, num_classes)
    results = []
    for b in range(bsz):
        idx, cls = torch.nonzero(scores[b] > conf_threshold, as_tuple=True)
        s = scores[b, idx, cls]
        if pre_nms_top_k is not None and s.numel() > pre_nms_top_k:
            s, top = s.topk(pre_nms_top_k)
            idx, cls = idx[top], cls[top]
        bx = boxes[b, idx]
        keep = torchvision.ops.batched_nms(bx, s, cls, nms_iou)[:max_detections]
        results.append({"boxes": bx[keep], "scores": s[keep], "labels": cls[keep].long()})
    return results


def rescale_boxes(
    boxes: Tensor,
    original_size: Sequence[int],
    input_size: int | Sequence[int],
) -> Tensor:
    """Map ``x1, y1, x2, y2`` pixel-edge boxes of the resized network input (``input_size``,
    int or ``(h, w)``) to the original image of ``original_size`` ``(h, w)``, clipped to it.

    Continuous pixel-edge coordinates in and out; for VOC 1-based inclusive coordinates use
    :func:`resist_det.data.transforms.boxes_to_original`.
    """
    oh, ow = _pair(tuple(original_size), "original_size")
    ih, iw = _pair(input_size, "input_size")
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [..., 4], got shape {tuple(boxes.shape)}")
    boxes = boxes.float() if not boxes.is_floating_point() else boxes
    scale = boxes.new_tensor([ow / iw, oh / ih, ow / iw, oh / ih])
    out = boxes * scale
    out[..., 0::2] = out[..., 0::2].clamp(0.0, float(ow))
    out[..., 1::2] = out[..., 1::2].clamp(0.0, float(oh))
    return out
