"""Pascal VOC (VOCdevkit layout) detection dataset reader.

Reads ``<root>/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`` for one or more
``(year, split)`` pairs and exposes them as a single map-style torch ``Dataset``.
Datasets are never downloaded: a missing folder is a ``FileNotFoundError``.

Every listed image is checked when the dataset is constructed, so bad data fails before
training rather than mid-epoch: its annotation is parsed by
:func:`~resist_det.data.voc_xml.parse_voc_xml` (rules in :mod:`resist_det.data.voc_xml`),
its JPEG must exist, end complete and have the size the annotation states
(:func:`~resist_det.data.image_check.image_problem`; header and last bytes only).  All
problems are collected and raised together as :class:`BadImagesError`, one line per image,
or with ``skip_bad`` those images are left out (listed in ``dataset.skipped``).  A missing
split file or year folder raises ``FileNotFoundError``; an empty split file ``ValueError``.
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

from .image_check import image_problem
from .voc_xml import VOCRecord, _read_xml, _text, parse_voc_xml

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

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

ImageSet = tuple[str, str]
"""A ``(year, split)`` pair, e.g. ``("2007", "trainval")``."""

Transform = Callable[..., tuple[Any, ...]]
"""``transform(image, boxes, labels) -> (image_tensor, boxes, labels)``.

If the callable has a truthy attribute ``carries_difficult`` it is instead called as
``transform(image, boxes, labels, difficult=flags)`` and must return a 4-tuple with the
flags filtered like the boxes (see :mod:`resist_det.data.transforms`).
"""


class BadImagesError(ValueError):
    """Some listed images cannot be trained on; the message lists every one and why."""


def resolve_year_dir(root: str | os.PathLike[str], year: str) -> Path:
    """Return ``root/VOC<year>`` (or ``root/VOCdevkit/VOC<year>``); never downloads."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"VOC dataset root not found: expected a VOCdevkit folder at {root} "
            f"(datasets are never downloaded; fetch/extract it there first)"
        )
    for candidate in (root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"VOC year folder not found: expected {root / f'VOC{year}'} "
        f"(datasets are never downloaded; extract VOC{year} into {root})"
    )


def _read_split(year_dir: Path, split: str) -> list[str]:
    split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file is empty: {split_file}")
    return ids


def _as_image_sets(image_sets: ImageSet | Iterable[ImageSet]) -> list[ImageSet]:
    if isinstance(image_sets, tuple) and len(image_sets) == 2 and all(isinstance(s, str) for s in image_sets):
        return [image_sets]  # a single (year, split) pair
    pairs = [(str(y), str(s)) for y, s in image_sets]
    if not pairs:
        raise ValueError("image_sets is empty: expected at least one (year, split) pair")
    return pairs


def collect_classes(
    root: str | os.PathLike[str],
    image_sets: ImageSet | Iterable[ImageSet] = (("2007", "trainval"),),
) -> tuple[str, ...]:
    """Sorted class names found in the annotations of the given splits (custom VOC sets)."""
    names: set[str] = set()
    for year, split in _as_image_sets(image_sets):
        year_dir = resolve_year_dir(root, year)
        for image_id in _read_split(year_dir, split):
            xml_path = year_dir / "Annotations" / f"{image_id}.xml"
            try:
                root_elem = _read_xml(xml_path)
            except (FileNotFoundError, ValueError):
                continue  # the dataset's check lists it with every other bad image
            for k, obj in enumerate(root_elem.iter("object")):
                names.add(_text(obj, "name", xml_path, f"object #{k}"))
    return tuple(sorted(names))


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
        multi_year = len({y for y, _ in self.image_sets}) > 1

        self._image_paths: list[Path] = []
        self._records: list[VOCRecord] = []
        self._ids: list[str] = []
        self.skipped: list[str] = []  # what was wrong with each image left out (skip_bad)
        listed = 0
        for year, split in self.image_sets:
            year_dir = resolve_year_dir(self.root, year)
            for image_id in _read_split(year_dir, split):
                listed += 1
                image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
                try:
                    record = self._check(year_dir, split, image_id, image_path, skip_unknown)
                except (FileNotFoundError, ValueError) as exc:
                    self.skipped.append(str(exc))
                    continue
                self._image_paths.append(image_path)
                self._records.append(record)
                self._ids.append(f"{year}/{image_id}" if multi_year else image_id)
        if self.skipped and not skip_bad:
            sets = ", ".join(f"VOC{y} {s}" for y, s in self.image_sets)
            raise BadImagesError(
                f"{len(self.skipped)} of {listed} images of {sets} cannot be used; set data.skip_bad "
                f"(resist-det train --skip-bad) to train on the other {listed - len(self.skipped)}:\n  "
                + "\n  ".join(self.skipped)
            )
        if not self._records:
            raise BadImagesError(f"none of the {listed} images can be used:\n  " + "\n  ".join(self.skipped))

    def _check(self, year_dir: Path, split: str, image_id: str, image_path: Path, skip_unknown: bool) -> VOCRecord:
        """The image's annotation, after the pre-flight checks (raises naming the file)."""
        if not image_path.is_file():
            raise FileNotFoundError(
                f"image {image_id!r} listed in {year_dir / 'ImageSets' / 'Main' / (split + '.txt')} "
                f"but its JPEG is missing: {image_path}"
            )
        xml_path = year_dir / "Annotations" / f"{image_id}.xml"
        record = parse_voc_xml(xml_path, self.class_to_index, skip_unknown=skip_unknown, image_path=image_path)
        problem = image_problem(image_path, (record.width, record.height))
        if problem is not None:
            raise ValueError(problem)
        return record

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
