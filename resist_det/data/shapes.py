"""Synthetic "shapes" detection set written as a real VOCdevkit tree.

Each image is a noisy, textured background with 1-4 coloured shapes (circle, square,
triangle) whose side is 20-60% of the image side, so a small detector learns it in
minutes on a CPU. The tree ``<out>/VOCdevkit/VOC<year>`` has ``JPEGImages``,
``Annotations`` (VOC XML, 1-based inclusive boxes) and ``ImageSets/Main/{train,val,
trainval,test}.txt``, and loads with :class:`resist_det.data.voc.VOCDetection` using
``classes=SHAPES_CLASSES`` (or ``collect_classes``). Output is a pure function of
``seed`` (each image uses its own seeded generator).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES_CLASSES", "SHAPES_COLOURS", "write_shapes_dataset"]

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPES_COLOURS: dict[str, tuple[int, int, int]] = {
    "circle": (220, 40, 40),
    "square": (40, 190, 60),
    "triangle": (50, 80, 230),
}
"""Base RGB colour per class (jittered per object)."""

_DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-frequency texture plus pixel noise: uint8 ``[size, size, 3]``."""
    coarse = rng.uniform(70, 170, size=(5, 5, 1)) + rng.uniform(-25, 25, size=(5, 5, 3))
    cells = np.linspace(0, 4, size)
    i0 = np.minimum(cells.astype(int), 3)
    f = (cells - i0)[:, None, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f  # bilinear upsampling, rows first
    g = (cells - i0)[None, :, None]
    img = rows[:, i0] * (1 - g) + rows[:, i0 + 1] * g
    stripes = 12 * np.sin(np.arange(size) * rng.uniform(0.1, 0.6) + rng.uniform(0, 6.3))
    img = img + (stripes[:, None, None] if rng.random() < 0.5 else stripes[None, :, None])
    img = img + rng.normal(0, 10, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (how much one could hide the other)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / min(area(a), area(b))


def _draw_image(
    rng: np.random.Generator, size: int
) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """Render one image; returns it and ``(class, (x0, y0, x1, y1))`` 0-based inclusive boxes."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    wanted = int(rng.integers(1, 5))
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(wanted * 10):  # rejection sampling to keep overlaps small
        if len(placed) == wanted:
            break
        side = int(rng.uniform(0.2, 0.6) * size)
        w = side
        h = side if rng.random() < 0.5 else int(side * rng.uniform(0.75, 1.0))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        if any(_overlap(box, other) > 0.15 for _, other in placed):
            continue
        name = SHAPES_CLASSES[int(rng.integers(len(SHAPES_CLASSES)))]
        base = np.array(SHAPES_COLOURS[name])
        colour = tuple(int(c) for c in np.clip(base + rng.integers(-25, 26, size=3), 0, 255))
        outline = tuple(int(c) for c in np.clip(base * 0.5, 0, 255))
        if name == "circle":
            draw.ellipse(box, fill=colour, outline=outline)
        elif name == "square":
            draw.rectangle(box, fill=colour, outline=outline)
        else:
            apex_x = x0 + int(rng.integers(0, w))
            draw.polygon([(apex_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour, outline=outline)
        placed.append((name, box))
    return image, placed


def _annotation_xml(image_id: str, folder: str, size: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    parts = [
        "<annotation>",
        f"  <folder>{escape(folder)}</folder>",
        f"  <filename>{escape(image_id)}.jpg</filename>",
        "  <source><database>resist_det synthetic shapes</database></source>",
        f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            "    <difficult>0</difficult>",
            # VOC convention: 1-based inclusive pixel coordinates
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def write_shapes_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    splits: Mapping[str, float] = _DEFAULT_SPLITS,
    *,
    year: str = "2007",
    jpeg_quality: int = 90,
) -> Path:
    """Write ``num_images`` synthetic images as ``<out_dir>/VOCdevkit/VOC<year>``.

    ``splits`` gives the fractions of ``train``, ``val`` and ``test`` (must sum to 1;
    a missing key means 0); ``trainval`` is written as train + val. Returns the
    VOCdevkit folder, i.e. the ``root`` for ``VOCDetection(root, [(year, split)],
    classes=SHAPES_CLASSES)``. Existing files of the same names are overwritten.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"splits keys must be among train/val/test, got {sorted(unknown)}")
    fractions = np.array([float(splits.get(k, 0.0)) for k in ("train", "val", "test")])
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(splits)}")

    devkit = Path(out_dir) / "VOCdevkit"
    year_dir = devkit / f"VOC{year}"
    jpeg_dir, ann_dir, sets_dir = year_dir / "JPEGImages", year_dir / "Annotations", year_dir / "ImageSets" / "Main"
    for d in (jpeg_dir, ann_dir, sets_dir):
        d.mkdir(parents=True, exist_ok=True)

    ids = [f"{i:06d}" for i in range(num_images)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        image, objects = _draw_image(rng, image_size)
        image.save(jpeg_dir / f"{image_id}.jpg", quality=jpeg_quality)
        (ann_dir / f"{image_id}.xml").write_text(_annotation_xml(image_id, f"VOC{year}", image_size, objects))

    order = np.random.default_rng([seed, num_images, 7]).permutation(num_images)
    bounds = np.round(np.cumsum(fractions) * num_images).astype(int)
    chunks = np.split(order, bounds[:2])
    members = {name: sorted(ids[j] for j in chunk) for name, chunk in zip(("train", "val", "test"), chunks)}
    members["trainval"] = sorted(members["train"] + members["val"])
    for name, names in members.items():
        (sets_dir / f"{name}.txt").write_text("".join(f"{n}\n" for n in names))
    return devkit
