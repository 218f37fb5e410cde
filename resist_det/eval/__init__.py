"""Detection evaluation: VOC AP (in-memory, vectorised) and COCO AP via pycocotools."""

from resist_det.eval.coco import CocoStats, coco_evaluate
from resist_det.eval.voc_ap import VOCEvalResult, box_iou_voc, evaluate_detections, voc_ap

__all__ = ["CocoStats", "VOCEvalResult", "box_iou_voc", "coco_evaluate", "evaluate_detections", "voc_ap"]
