"""Synthetic shapes set: loads through the VOC reader, sane boxes, deterministic, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resist_det.data.shapes import SHAPES_CLASSES, SHAPES_COLOURS, write_shapes_dataset
from resist_det.data.voc import VOCDetection, collect_classes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 60, image_size=128, seed=1)


def test_loads_through_voc_reader(shapes_root: Path) -> None:
    splits = {s: VOCDetection(shapes_root, [("2007", s)], classes=SHAPES_CLASSES) for s in ("train", "val", "trainval", "test")}
    assert len(splits["train"]) == 42 and len(splits["val"]) == 9 and len(splits["test"]) == 9
    assert set(splits["trainval"].image_ids) == set(splits["train"].image_ids) | set(splits["val"].image_ids)
    assert not set(splits["trainval"].image_ids) & set(splits["test"].image_ids)
    assert collect_classes(shapes_root, [("2007", "trainval"), ("2007", "test")]) == tuple(sorted(SHAPES_CLASSES))


def test_boxes_inside_and_sized(shapes_root: Path) -> None:
    ds = VOCDetection(shapes_root, [("2007", "trainval"), ("2007", "test")], classes=SHAPES_CLASSES)
    counts = np.zeros(len(SHAPES_CLASSES), int)
    for i in range(len(ds)):
        image, target = ds[i]
        boxes = target["boxes"]
        assert image.shape == (128, 128, 3)
        assert 1 <= len(boxes) <= 4
        assert (boxes >= 1).all() and (boxes <= 128).all()  # VOC 1-based inclusive
        sides = boxes[:, 2:] - boxes[:, :2] + 1
        assert (sides >= 0.15 * 128).all() and (sides <= 0.6 * 128 + 1).all()
        assert not target["difficult"].any()
        counts += np.bincount(target["labels"], minlength=len(SHAPES_CLASSES))
    assert (counts > 0).all()


def test_object_pixels_have_class_colour(shapes_root: Path) -> None:
    ds = VOCDetection(shapes_root, [("2007", "train")], classes=SHAPES_CLASSES)
    image, target = ds[0]
    x1, y1, x2, y2 = target["boxes"][0].astype(int) - 1
    cx, cy = (x1 + x2) // 2, (y1 + y2 + 1) // 2 + (y2 - y1) // 4  # inside every shape kind
    colour = np.array(SHAPES_COLOURS[SHAPES_CLASSES[target["labels"][0]]])
    assert np.abs(image[cy, cx].astype(int) - colour).max() < 60


def test_deterministic_for_seed(tmp_path: Path) -> None:
    a = write_shapes_dataset(tmp_path / "a", 12, seed=5)
    b = write_shapes_dataset(tmp_path / "b", 12, seed=5)
    c = write_shapes_dataset(tmp_path / "c", 12, seed=6)
    rel = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert rel == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in rel)
    assert any((a / r).read_bytes() != (c / r).read_bytes() for r in rel if r.suffix == ".xml")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        write_shapes_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="sum to 1"):
        write_shapes_dataset(tmp_path, 5, splits={"train": 0.5, "val": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="train/val/test"):
        write_shapes_dataset(tmp_path, 5, splits={"training": 1.0})
