"""Pascal VOC (VOCdevkit layout) detection dataset reader.

Reads ``<root>/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`` for one or more
``(year, split)`` pairs and exposes them as a single map-style torch ``Dataset``.
Datasets are never downloaded: a missing folder is a ``FileNotFoundError``.

Annotation rules (applied when the dataset is constructed, so bad data fails early):

* Coordinates are parsed as floats and kept as written (VOC uses 1-based, inclusive
  pixel coordinates); ``boxes`` is a float32 ``[N, 4]`` array ``xmin, ymin, xmax, ymax``.
* ``difficult`` and ``truncated`` flags are kept (missing flag = 0); images without
  objects give empty arrays.
* A class outside ``classes`` raises ``ValueError`` naming the XML file and the class,
  unless ``skip_unknown=True`` (then such objects are dropped silently).
* ``xmax < xmin`` or ``ymax < ymin`` raises ``ValueError`` naming the file and object.
* A box reaching outside the image extent ``[0, width] x [0, height]`` (this range
  accepts both 1-based and 0-based files) is clipped to it with a ``warnings.warn``
  naming the file; a box lying entirely outside the image is a ``ValueError``.
* Malformed XML raises ``ValueError`` with the path; an id listed in an ImageSets file
  whose XML or JPEG is missing raises ``FileNotFoundError`` with the path; an empty
  split file raises ``ValueError``.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "VOC_CLASSES",
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


@dataclass(frozen=True)
class VOCRecord:
    """Parsed content of one annotation XML file."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xmin, ymin, xmax, ymax
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]
    truncated: np.ndarray  # bool [N]


def _text(elem: ET.Element, tag: str, xml_path: Path, what: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_path}: {what} has no <{tag}> value")
    return child.text.strip()


def _flag(elem: ET.Element, tag: str, xml_path: Path, what: str) -> bool:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    try:
        return bool(int(float(child.text.strip())))
    except ValueError:
        raise ValueError(f"{xml_path}: {what} has non-numeric <{tag}> {child.text!r}") from None


def _number(elem: ET.Element, tag: str, xml_path: Path, what: str) -> float:
    raw = _text(elem, tag, xml_path, what)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{xml_path}: {what} has non-numeric <{tag}> {raw!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{xml_path}: {what} has non-finite <{tag}> {raw!r}")
    return value


def _read_xml(xml_path: Path) -> ET.Element:
    if not xml_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {xml_path}")
    try:
        return ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml_path}: malformed XML ({exc})") from None


def parse_voc_xml(
    xml_path: str | os.PathLike[str],
    class_to_index: dict[str, int],
    *,
    skip_unknown: bool = False,
    image_path: str | os.PathLike[str] | None = None,
) -> VOCRecord:
    """Parse one VOC annotation file into a :class:`VOCRecord` (rules in module doc).

    ``image_path`` is only read (header only) when the XML lacks a usable ``<size>``.
    """
    xml_path = Path(xml_path)
    root = _read_xml(xml_path)
    image_id = xml_path.stem

    width = height = 0
    size = root.find("size")
    if size is not None:
        try:
            width = int(float(_text(size, "width", xml_path, "<size>")))
            height = int(float(_text(size, "height", xml_path, "<size>")))
        except ValueError:
            width = height = 0
    if width <= 0 or height <= 0:
        if image_path is None:
            raise ValueError(f"{xml_path}: missing or invalid <size> and no image to read it from")
        with Image.open(image_path) as im:  # reads the header only
            width, height = im.size

    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    truncated: list[bool] = []
    for k, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", xml_path, f"object #{k}")
        what = f"object #{k} ({name!r})"
        if name not in class_to_index:
            if skip_unknown:
                continue
            raise ValueError(
                f"{xml_path}: {what} has class {name!r} which is not in the class list "
                f"({len(class_to_index)} classes); pass classes=collect_classes(...) for a "
                f"custom dataset or skip_unknown=True to drop such objects"
            )
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{xml_path}: {what} has no <bndbox>")
        x1, y1, x2, y2 = (_number(bnd, t, xml_path, what) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise ValueError(
                f"{xml_path}: {what} has an inverted box "
                f"(xmin={x1}, ymin={y1}, xmax={x2}, ymax={y2}); expected xmax >= xmin and ymax >= ymin"
            )
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise ValueError(
                f"{xml_path}: {what} box ({x1}, {y1}, {x2}, {y2}) lies entirely outside "
                f"the {width}x{height} image"
            )
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            warnings.warn(
                f"{xml_path}: {what} box ({x1}, {y1}, {x2}, {y2}) extends outside the "
                f"{width}x{height} image; clipped to ({cx1}, {cy1}, {cx2}, {cy2})",
                stacklevel=2,
            )
        boxes.append([cx1, cy1, cx2, cy2])
        labels.append(class_to_index[name])
        difficult.append(_flag(obj, "difficult", xml_path, what))
        truncated.append(_flag(obj, "truncated", xml_path, what))

    return VOCRecord(
        image_id=image_id,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
    )


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
            for k, obj in enumerate(_read_xml(xml_path).iter("object")):
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
        for year, split in self.image_sets:
            year_dir = resolve_year_dir(self.root, year)
            for image_id in _read_split(year_dir, split):
                xml_path = year_dir / "Annotations" / f"{image_id}.xml"
                image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
                if not image_path.is_file():
                    raise FileNotFoundError(
                        f"image {image_id!r} listed in {year_dir / 'ImageSets' / 'Main' / (split + '.txt')} "
                        f"but its JPEG is missing: {image_path}"
                    )
                record = parse_voc_xml(
                    xml_path, self.class_to_index, skip_unknown=skip_unknown, image_path=image_path
                )
                self._image_paths.append(image_path)
                self._records.append(record)
                self._ids.append(f"{year}/{image_id}" if multi_year else image_id)

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
        except OSError as exc:
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
