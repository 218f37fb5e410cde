"""Datasets and transforms: Pascal VOC reader, synthetic shapes set, albumentations pipelines,
classification sets.

Names are imported on first use, so that reading (or checking) a VOC folder does not pay for
torchvision and albumentations.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "SHAPES_CLASSES": "shapes", "write_shapes_dataset": "shapes",
    "DetectionTransform": "transforms", "boxes_to_original": "transforms", "detection_transform": "transforms",
    "VOC_CLASSES": "voc_index", "VOCDetection": "voc", "collate_detection": "voc", "collect_classes": "voc_index",
    "ClassificationInfo": "classification", "build_classification_dataset": "classification",
    "default_transform": "classification",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
