"""A VOCdevkit tree in the COCO layout (what torchvision's detection reference and pycocotools read).

::

    <out>/train2017/<id>.jpg    <out>/annotations/instances_train2017.json   (VOC trainval)
    <out>/val2017/<id>.jpg      <out>/annotations/instances_val2017.json     (VOC test)

Boxes: VOC's 1-based inclusive ``xmin, ymin, xmax, ymax`` become COCO's
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (the convention of
:mod:`resist_det.eval.coco`, so both metrics see the same IoUs); each box is also its own
polygon (``segmentation``), which the reference's loader requires; VOC "difficult" objects are
``iscrowd`` 1.  Category ids are 1..K in the order of ``classes``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from .voc_xml import parse_voc_xml

__all__ = ["write_coco_layout", "COCO_SPLITS"]

#: COCO split -> the VOC image set it is made of.
COCO_SPLITS: Mapping[str, str] = {"train2017": "trainval", "val2017": "test"}


def _place(src: Path, dst: Path) -> None:
    """The image at ``dst``: a hard link where the file system allows, else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_coco_layout(year_dir: str | os.PathLike[str], out: str | os.PathLike[str], classes: Sequence[str],
                      splits: Mapping[str, str] = COCO_SPLITS) -> Path:
    """Write the VOC year folder ``year_dir`` (``JPEGImages``, ``Annotations``, ``ImageSets/Main``)
    as a COCO tree under ``out``; returns ``out``."""
    year_dir, out = Path(year_dir), Path(out)
    index = {c: i for i, c in enumerate(classes)}
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(classes)]
    for coco_split, voc_split in splits.items():
        ids = (year_dir / "ImageSets" / "Main" / f"{voc_split}.txt").read_text().split()
        (out / coco_split).mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for n, image_id in enumerate(ids, 1):
            rec = parse_voc_xml(year_dir / "Annotations" / f"{image_id}.xml", index)
            _place(year_dir / "JPEGImages" / f"{image_id}.jpg", out / coco_split / f"{image_id}.jpg")
            images.append({"id": n, "file_name": f"{image_id}.jpg", "width": rec.width, "height": rec.height})
            for box, label, difficult in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.difficult.tolist()):
                x, y, w, h = box[0] - 1, box[1] - 1, box[2] - box[0] + 1, box[3] - box[1] + 1
                annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": int(label) + 1,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(difficult),
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        atomic_write_json(out / "annotations" / f"instances_{coco_split}.json",
                          {"images": images, "annotations": annotations, "categories": categories})
    return out
