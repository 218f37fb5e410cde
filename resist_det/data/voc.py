"""Pascal VOC (VOCdevkit layout) detection dataset reader.

Reads ``<root>/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`` for one or more
``(year, split)`` pairs and exposes them as a single map-style torch ``Dataset``.
Datasets are never downloaded: a missing folder is a ``FileNotFoundError``.

Every listed image is checked when the dataset is constructed
(:func:`~resist_det.data.voc_index.index_image_sets`), so bad data fails before training
rather than mid-epoch: all problems are raised together as :class:`BadImagesError`, one
line per image, or with ``skip_bad`` those images are left out (listed in ``dataset.skipped``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .voc_index import (VOC_CLASSES, BadImagesError, ImageSet, _as_image_sets, collect_classes, index_image_sets,
                        resolve_year_dir)
from .voc_xml import VOCRecord, parse_voc_xml

__all__ = [
    "VOC_CLASSES",
    "BadImagesError",
    "VOCDetection",
    "VOCRecord",
    "collate_detection",
    "collect_classes",
    "parse_voc_xml",
    "resolve_year_dir",
]

Transform = Callable[..., tuple[Any, ...]]
"""``transform(image, boxes, labels) -> (image_tensor, boxes, labels)``.

If the callable has a truthy attribute ``carries_difficult`` it is instead called as
``transform(image, boxes, labels, difficult=flags)`` and must return a 4-tuple with the
flags filtered like the boxes (see :mod:`resist_det.data.transforms`).
"""


class VOCDetection(Dataset):
    """Union of VOCdevkit ``(year, split)`` image sets as one detection dataset.

    ``dataset[i]`` returns ``(image, target)``: without ``transform`` the image is an
    ``HxWx3`` uint8 RGB numpy array; ``target`` holds ``boxes`` (float32 [N,4]),
    ``labels`` (int64 [N]), ``difficult`` (bool [N]), ``truncated`` (bool [N]),
    ``image_id`` (str, ``"<year>/<id>"`` when several years are loaded, else the id)
    and ``size`` (original ``(h, w)``). With ``transform`` the image/boxes/labels are
    whatever it returns (e.g. a CHW tensor and resized boxes); ``size`` stays original.
    Difficult objects are kept and transformed like all others.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_sets: ImageSet | Iterable[ImageSet] = (("2007", "trainval"),),
        classes: Sequence[str] = VOC_CLASSES,
        transform: Transform | None = None,
        *,
        skip_unknown: bool = False,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.image_sets = _as_image_sets(image_sets)
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be a non-empty list of unique names, got {self.classes}")
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        index = index_image_sets(self.root, self.image_sets, self.class_to_index, skip_unknown=skip_unknown, skip_bad=skip_bad)
        self._image_paths, self._records, self._ids = index.image_paths, index.records, index.ids
        self.skipped: list[str] = index.skipped  # what was wrong with each image left out (skip_bad)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[str]:
        """Image ids in dataset order (see class doc for the multi-year form)."""
        return list(self._ids)

    def image_path(self, index: int) -> Path:
        """Path of the JPEG for ``index``."""
        return self._image_paths[index]

    def get_annotation(self, index: int) -> dict[str, Any]:
        """Target dict for ``index`` in original image coordinates, without loading pixels."""
        rec = self._records[index]
        return {
            "boxes": rec.boxes.copy(),
            "labels": rec.labels.copy(),
            "difficult": rec.difficult.copy(),
            "truncated": rec.truncated.copy(),
            "image_id": self._ids[index],
            "size": (rec.height, rec.width),
        }

    def load_image(self, index: int) -> np.ndarray:
        """Decode the image for ``index`` as an ``HxWx3`` uint8 RGB array."""
        path = self._image_paths[index]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from None

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        target = self.get_annotation(index)
        image = self.load_image(index)
        if self.transform is None:
            return image, target
        boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
        if getattr(self.transform, "carries_difficult", False):
            image, boxes, labels, difficult = self.transform(image, boxes, labels, difficult=difficult)
        else:
            image, boxes, labels = self.transform(image, boxes, labels)
            if len(boxes) != len(target["boxes"]):
                raise RuntimeError(
                    f"transform changed the number of boxes for {self._image_paths[index]}; "
                    f"a box-dropping transform must set carries_difficult=True and filter the "
                    f"difficult flags too"
                )
        target["boxes"] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        target["labels"] = np.asarray(labels, dtype=np.int64)
        target["difficult"] = np.asarray(difficult, dtype=bool)
        target.pop("truncated")  # not tracked through transforms
        return image, target


def collate_detection(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: stack images into one tensor, keep targets as a list.

    Numpy images (``HxWx3``) are stacked as ``[B, H, W, 3]``; tensors as given (e.g.
    ``[B, 3, H, W]``). Target arrays ``boxes``/``labels``/``difficult`` become tensors.
    """
    if not batch:
        raise ValueError("collate_detection got an empty batch")
    images = [torch.as_tensor(img) if isinstance(img, np.ndarray) else img for img, _ in batch]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(
            f"collate_detection needs equally sized images, got shapes {sorted(shapes)}; "
            f"use a resizing transform such as detection_transform(size)"
        )
    targets = []
    for _, tgt in batch:
        out = dict(tgt)
        for key in ("boxes", "labels", "difficult"):
            if key in out:
                out[key] = torch.as_tensor(out[key])
        targets.append(out)
    return torch.stack(images), targets
