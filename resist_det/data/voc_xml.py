"""Pascal VOC annotation XML parsing: :func:`parse_voc_xml` into a :class:`VOCRecord`.

Annotation rules (:class:`~resist_det.data.voc.VOCDetection` applies them when it is
constructed, so bad data fails early):

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
* Malformed XML raises ``ValueError`` with the path; a missing XML file raises
  ``FileNotFoundError`` with the path.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["VOCRecord", "parse_voc_xml"]


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


def _image_size(root: ET.Element, xml_path: Path, image_path: str | os.PathLike[str] | None) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, else from the image's header."""
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
    return width, height


def _box(obj: ET.Element, xml_path: Path, what: str, width: int, height: int) -> list[float]:
    """The object's box, checked and clipped to the image (rules in module doc)."""
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
            stacklevel=3,
        )
    return [cx1, cy1, cx2, cy2]


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
    width, height = _image_size(root, xml_path, image_path)
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
        boxes.append(_box(obj, xml_path, what, width, height))
        labels.append(class_to_index[name])
        difficult.append(_flag(obj, "difficult", xml_path, what))
        truncated.append(_flag(obj, "truncated", xml_path, what))

    return VOCRecord(
        image_id=xml_path.stem,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
    )
