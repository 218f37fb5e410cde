"""Albumentations pipelines for detection: resize, ImageNet normalisation, optional
bbox-safe augmentation, CHW float tensor output.

Box convention. Input boxes are VOC ``xmin, ymin, xmax, ymax`` as written in the XML
(1-based, inclusive pixel indices, so a full-image box is ``1, 1, W, H``). They are
converted to continuous pixel-edge coordinates (``xmin - 1, ymin - 1, xmax, ymax``;
full image = ``0, 0, W, H``) before augmentation, which keeps every valid VOC box
(including one-pixel wide ones) non-degenerate. Output boxes are continuous pixel-edge
coordinates of the resized ``size x size`` image. :func:`boxes_to_original` maps such
boxes (e.g. model predictions) back to VOC coordinates of the original image.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectionTransform",
    "boxes_to_original",
    "detection_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class DetectionTransform:
    """Callable ``(image, boxes, labels[, difficult=]) -> (tensor, boxes, labels[, difficult])``.

    ``image`` is ``HxWx3`` uint8 RGB; ``boxes`` float ``[N, 4]`` VOC coordinates;
    ``labels`` int ``[N]``. Returns a float32 ``[3, size, size]`` tensor, float32
    ``[N', 4]`` boxes (resized frame, see module doc) and int64 ``[N']`` labels; when
    ``difficult`` is given it is filtered like the boxes and returned fourth.
    """

    carries_difficult = True  # VOCDetection passes difficult flags through us

    def __init__(self, pipeline: A.Compose, size: int) -> None:
        self.pipeline = pipeline
        self.size = size

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        difficult: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray] | tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
        h, w = image.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        flags = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
        if not (len(boxes) == len(labels) == len(flags)):
            raise ValueError(
                f"boxes ({len(boxes)}), labels ({len(labels)}) and difficult ({len(flags)}) lengths differ"
            )
        edges = boxes.copy()
        edges[:, :2] -= 1.0  # inclusive 1-based -> pixel edges
        edges[:, [0, 2]] = edges[:, [0, 2]].clip(0, w)
        edges[:, [1, 3]] = edges[:, [1, 3]].clip(0, h)
        keep = (edges[:, 2] > edges[:, 0]) & (edges[:, 3] > edges[:, 1])
        out = self.pipeline(image=image, bboxes=edges[keep], labels=labels[keep], difficult=flags[keep])
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        tensor = out["image"]
        if difficult is None:
            return tensor, out_boxes, out_labels
        return tensor, out_boxes, out_labels, np.asarray(out["difficult"], dtype=bool).reshape(-1)


def detection_transform(
    size: int,
    augment: bool = False,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_visibility: float = 0.2,
    seed: int | None = None,
) -> DetectionTransform:
    """Build the detection pipeline: [augment] -> resize to ``size x size`` -> normalise -> tensor.

    ``size`` must be a positive multiple of 32 (the detector's stride). Augmentation
    (bbox-safe random crop, horizontal flip, mild colour jitter; hue is barely touched
    so colour stays informative) is applied if and only if ``augment=True``. Boxes that an augmentation leaves less than
    ``min_visibility`` visible are dropped with their labels/flags.
    """
    if not isinstance(size, int) or size <= 0 or size % 32:
        raise ValueError(f"size must be a positive multiple of 32, got {size!r}")
    steps: list[A.BasicTransform] = []
    if augment:
        steps += [
            A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    steps += [
        A.Resize(height=size, width=size),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ToTensorV2(),
    ]
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["labels", "difficult"],
        clip=True,
        min_visibility=min_visibility if augment else 0.0,
    )
    pipeline = A.Compose(steps, bbox_params=bbox_params, seed=seed)
    return DetectionTransform(pipeline, size)


def boxes_to_original(
    boxes: np.ndarray | torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> np.ndarray:
    """Map pixel-edge boxes in the resized frame to VOC (1-based inclusive) original coords.

    ``input_size`` and ``original_size`` are ``(h, w)``. Inverse of the conversion done
    by :class:`DetectionTransform` (up to clipping), so predictions can be scored
    against :meth:`VOCDetection.get_annotation` ground truth.
    """
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    b = b.reshape(-1, 4).copy()
    sy = original_size[0] / input_size[0]
    sx = original_size[1] / input_size[1]
    b[:, [0, 2]] *= sx
    b[:, [1, 3]] *= sy
    b[:, :2] += 1.0
    return b.astype(np.float32)
