"""Datasets and transforms: Pascal VOC reader, synthetic shapes set, albumentations pipelines."""

from resist_det.data.shapes import SHAPES_CLASSES, write_shapes_dataset
from resist_det.data.transforms import DetectionTransform, boxes_to_original, detection_transform
from resist_det.data.voc import VOC_CLASSES, VOCDetection, collate_detection, collect_classes

__all__ = [
    "SHAPES_CLASSES",
    "VOC_CLASSES",
    "DetectionTransform",
    "VOCDetection",
    "boxes_to_original",
    "collate_detection",
    "collect_classes",
    "detection_transform",
    "write_shapes_dataset",
]

from resist_det.data.classification import (  # noqa: E402
    ClassificationInfo,
    build_classification_dataset,
    default_transform,
)

__all__ += ["ClassificationInfo", "build_classification_dataset", "default_transform"]
