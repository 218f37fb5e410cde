"""Index a VOCdevkit split and check every listed image, without torch.

What :class:`~resist_det.data.voc.VOCDetection` reads when it is built, and what
``resist-det train`` runs before any rank starts (so the launcher never imports torch):
each listed image's annotation is parsed by :func:`~resist_det.data.voc_xml.parse_voc_xml`,
its JPEG must exist, end complete and have the size the annotation states
(:func:`~resist_det.data.image_check.image_problem`; header and last bytes only).  All
problems are collected and raised together as :class:`BadImagesError`, one line per image,
or with ``skip_bad`` those images are left out (listed in ``VOCIndex.skipped``).  A missing
split file or year folder raises ``FileNotFoundError``; an empty split file ``ValueError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .image_check import image_problem
from .voc_xml import VOCRecord, _read_xml, _text, parse_voc_xml

__all__ = ["VOC_CLASSES", "BadImagesError", "ImageSet", "VOCIndex", "collect_classes", "index_image_sets", "resolve_year_dir"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

ImageSet = tuple[str, str]
"""A ``(year, split)`` pair, e.g. ``("2007", "trainval")``."""


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


@dataclass
class VOCIndex:
    """The usable images of some ``(year, split)`` pairs, in split-file order, and what was wrong with the rest."""

    image_paths: list[Path] = field(default_factory=list)
    records: list[VOCRecord] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def index_image_sets(root: str | os.PathLike[str], image_sets: ImageSet | Iterable[ImageSet], class_to_index: dict[str, int],
                     *, skip_unknown: bool = False, skip_bad: bool = False) -> VOCIndex:
    """Check every image listed by ``image_sets``; raises :class:`BadImagesError` listing every
    bad one (unless ``skip_bad``) or when none is usable.  Ids are ``"<year>/<id>"`` when
    several years are indexed."""
    image_sets = _as_image_sets(image_sets)
    multi_year = len({y for y, _ in image_sets}) > 1
    index, listed = VOCIndex(), 0
    for year, split in image_sets:
        year_dir = resolve_year_dir(root, year)
        for image_id in _read_split(year_dir, split):
            listed += 1
            image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
            try:
                record = _check(year_dir, split, image_id, image_path, class_to_index, skip_unknown)
            except (FileNotFoundError, ValueError) as exc:
                index.skipped.append(str(exc))
                continue
            index.image_paths.append(image_path)
            index.records.append(record)
            index.ids.append(f"{year}/{image_id}" if multi_year else image_id)
    if index.skipped and not skip_bad:
        sets = ", ".join(f"VOC{y} {s}" for y, s in image_sets)
        raise BadImagesError(
            f"{len(index.skipped)} of {listed} images of {sets} cannot be used; set data.skip_bad "
            f"(resist-det train --skip-bad) to train on the other {listed - len(index.skipped)}:\n  "
            + "\n  ".join(index.skipped)
        )
    if not index.records:
        raise BadImagesError(f"none of the {listed} images can be used:\n  " + "\n  ".join(index.skipped))
    return index


def _check(year_dir: Path, split: str, image_id: str, image_path: Path, class_to_index: dict[str, int],
           skip_unknown: bool) -> VOCRecord:
    """The image's annotation, after the pre-flight checks (raises naming the file)."""
    if not image_path.is_file():
        raise FileNotFoundError(
            f"image {image_id!r} listed in {year_dir / 'ImageSets' / 'Main' / (split + '.txt')} "
            f"but its JPEG is missing: {image_path}"
        )
    xml_path = year_dir / "Annotations" / f"{image_id}.xml"
    record = parse_voc_xml(xml_path, class_to_index, skip_unknown=skip_unknown, image_path=image_path)
    problem = image_problem(image_path, (record.width, record.height))
    if problem is not None:
        raise ValueError(problem)
    return record
