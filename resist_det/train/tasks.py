"""What a recipe trains: the network, its data, its loss and how it is evaluated.

Two tasks share the training loop: VOC-format detection (YOLOv2-style detector) and image
classification (pre-activation ResNets).  Each is a small object with the same surface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Recipe
from .preflight import check_data, voc_classes

__all__ = ["Task", "build_task"]


@dataclass
class Task:
    """A recipe's network and data, with its loss and evaluation."""

    kind: str  # "detection" or "classification"
    train_set: Dataset | None  # None when built for evaluation only
    test_set: Dataset
    num_classes: int
    class_names: list[str]
    collate: Callable | None
    make_model: Callable[[str | None], nn.Module]  # device -> model (device "meta": structure only)
    loss_fn: Callable[[Any, Any], torch.Tensor]
    main_metric: str  # the metric reported as the result ("map_07" or "accuracy")

    def batch(self, batch: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, Any]:
        """Inputs on ``device``; classification labels too (detection targets stay on the CPU:
        the loss moves what it needs)."""
        images, targets = batch
        if torch.is_tensor(targets):
            targets = targets.to(device, non_blocking=True)
        return images.to(device, non_blocking=True), targets

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, conf_threshold: float = 0.005, metric: str = "voc") -> dict[str, Any]:
        """Metrics of ``model`` on the test set (the assembled global network, in eval mode); a
        detector's VOC AP, and with ``metric="coco"`` also COCO AP (pycocotools) under ``"coco"``."""
        model.eval()
        loader = DataLoader(self.test_set, batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        if self.kind == "classification":
            return _evaluate_classifier(model, loader, self.loss_fn)
        return _evaluate_detector(model, loader, self, conf_threshold, metric)


    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module, batches: int, batch_size: int, seed: int = 0) -> int:
        """Re-estimate the BN running statistics of ``model`` on ``batches`` training batches.

        The global network runs every block (scaled), so the layers after the partitioned
        section see activations that no sub-ResNet produced in training, and the averaged
        statistics describe the sub-ResNets, not it.  Cumulative averages over a seeded sample
        of training batches; returns the number of batches used.
        """
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if batches <= 0 or not bns or self.train_set is None:
            return 0
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        device = next(model.parameters()).device
        loader = DataLoader(self.train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed), collate_fn=self.collate)
        model.train()
        used = 0
        for data in loader:
            if used == batches:
                break
            model(self.batch(data, device)[0])
            used += 1
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
        return used


def _evaluate_classifier(model: nn.Module, loader: DataLoader, loss_fn) -> dict[str, Any]:
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total, "test_loss": loss_sum / total, "num_test": total}


def _evaluate_detector(model: nn.Module, loader: DataLoader, task: Task, conf_threshold: float, metric: str = "voc") -> dict[str, Any]:
    from ..data.transforms import boxes_to_original
    from ..eval.voc_ap import evaluate_detections

    base = task.test_set.dataset if isinstance(task.test_set, Subset) else task.test_set
    indices = task.test_set.indices if isinstance(task.test_set, Subset) else range(len(base))
    device = next(model.parameters()).device
    detections, loss_sum, n = [], 0.0, 0
    for images, targets in loader:
        pred = model(images.to(device))
        loss_sum += float(task.loss_fn(pred, targets)) * len(targets)
        n += len(targets)
        size = (images.shape[-2], images.shape[-1])
        for det, tgt in zip(model.decode(pred, size, conf_threshold=conf_threshold), targets):
            detections.append(
                {
                    "boxes": boxes_to_original(det["boxes"], size, tuple(tgt["size"])),
                    "scores": det["scores"].cpu().numpy(),
                    "labels": det["labels"].cpu().numpy(),
                }
            )
    truths = [base.get_annotation(i) for i in indices]
    result = evaluate_detections(detections, truths, task.num_classes, class_names=task.class_names)
    out = result.to_dict()
    out.update(test_loss=loss_sum / max(n, 1), num_test=n)
    if metric == "coco":
        from ..eval.coco import coco_evaluate

        coco = coco_evaluate(detections, truths, task.num_classes)
        out["coco"] = {**coco.stats, "per_class_ap": dict(zip(task.class_names, map(float, coco.per_class_ap)))}
    return out


def _limit(ds: Dataset, n: int | None) -> Dataset:
    return Subset(ds, range(min(n, len(ds)))) if n is not None else ds


def build_task(recipe: Recipe, *, with_train: bool = True) -> Task:
    """Datasets (read from disk, never downloaded), model factory and loss for ``recipe``."""
    check_data(recipe)
    if recipe.model.kind == "yolo":
        return _detection_task(recipe, with_train)
    return _classification_task(recipe, with_train)


def _detection_task(recipe: Recipe, with_train: bool) -> Task:
    from ..data.transforms import detection_transform
    from ..data.voc import VOCDetection, collate_detection
    from ..models.yolo import yolo_resnet
    from ..models.yolo_loss import YOLOv2Loss

    d, m = recipe.data, recipe.model
    classes = voc_classes(recipe)
    size = m.image_size
    train = None
    if with_train:
        train = VOCDetection(d.root, d.train_sets, classes, detection_transform(size, augment=d.augment, seed=recipe.train.seed),
                             skip_bad=d.skip_bad)
    test = VOCDetection(d.root, d.test_sets, classes, detection_transform(size), skip_bad=d.skip_bad)
    loss = YOLOv2Loss(num_classes=len(classes))

    def make_model(device: str | None) -> nn.Module:
        return yolo_resnet(m.depth or 101, num_classes=len(classes), image_size=size, neck_channels=m.neck_channels, seed=m.seed, device=device)

    return Task(
        kind="detection",
        train_set=_limit(train, d.limit_train) if train is not None else None,
        test_set=_limit(test, d.limit_test),
        num_classes=len(classes),
        class_names=classes,
        collate=collate_detection,
        make_model=make_model,
        loss_fn=lambda pred, targets: loss(pred, targets)[0],
        main_metric="map_07",
    )


def _classification_task(recipe: Recipe, with_train: bool) -> Task:
    from ..data.classification import build_classification_dataset
    from ..models.preact_resnet import preact_resnet
    from ..models.resnet import resnet

    d, m = recipe.data, recipe.model
    train = build_classification_dataset(d.kind, d.root, "train", augment=d.augment)[0] if with_train else None
    test, info = build_classification_dataset(d.kind, d.root, "test", augment=False)
    num_classes, in_channels = info.num_classes, info.in_channels

    def make_model(device: str | None) -> nn.Module:
        if m.kind == "resnet":
            return resnet(m.depth or 101, num_classes=num_classes, in_channels=in_channels, seed=m.seed, device=device)
        return preact_resnet(
            m.depth if m.layers is None else None,
            layers=m.layers,
            block=m.block,
            num_classes=num_classes,
            in_channels=in_channels,
            stem=m.stem,
            base_width=m.base_width,
            seed=m.seed,
            device=device,
        )

    return Task(
        kind="classification",
        train_set=_limit(train, d.limit_train) if train is not None else None,
        test_set=_limit(test, d.limit_test),
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        collate=None,
        make_model=make_model,
        loss_fn=F.cross_entropy,
        main_metric="accuracy",
    )
