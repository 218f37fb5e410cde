"""Recipes: one JSON schema with sections ``deepspeed``, ``resist``, ``model``, ``data``, ``train``.

Validated once, at the edge (CLI or ``tools/train.py``), before any rank starts: an unknown
key or a wrong type is one error naming the key.  ``deepspeed`` is passed to DeepSpeed as
it is, after the checks of what DeepSpeed would only refuse inside the ranks (optimizer values,
ZeRO / fp16 / bf16 outside mode ``ddp``); ``resist`` is :class:`resist_det.resist.config.ResISTConfig`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .io import read_json_file
from .depths import PREACT_DEPTHS, TORCHVISION_DEPTHS
from .resist.config import ResISTConfig, check_deepspeed_config, config_error

__all__ = ["Recipe", "ModelConfig", "DataConfig", "TrainConfig", "LRSchedule", "load_recipe", "parse_overrides"]


class _Strict(BaseModel):
    # Unknown keys are errors; a number must be a number (not true, not "16") and finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The network: a YOLOv2-style detector, a pre-activation ResNet classifier, or a stock
    torchvision ResNet classifier (``resnet``: partitioned in every section by default)."""

    kind: Literal["yolo", "preact_resnet", "resnet"]
    depth: int | None = Field(101, description="ResNet depth (detector backbone: 18/34/50/101/152)")
    block: Literal["basic", "bottleneck"] | None = Field(None, description="pre-activation block kind (default: by depth)")
    layers: list[int] | None = Field(None, description="custom blocks per section (pre-activation nets)")
    base_width: int = Field(64, ge=1, description="section-1 width of pre-activation nets")
    stem: Literal["cifar", "imagenet"] = "cifar"
    image_size: int = Field(448, ge=32, le=4096, description="detector input size, a multiple of 32")
    neck_channels: int = Field(0, ge=0, description="detector: 3x3 conv width before the 1x1 head (0: none)")
    seed: int = Field(0, ge=0, description="weight initialisation seed")

    @property
    def sections(self) -> tuple[int, ...]:
        """Blocks per section: ``layers``, or the depth's (the detector: its torchvision backbone's)."""
        if self.layers is not None:
            return tuple(self.layers)
        table = TORCHVISION_DEPTHS if self.kind in ("yolo", "resnet") else PREACT_DEPTHS
        return tuple(table[self.depth or 101][1])


class DataConfig(_Strict):
    """Where the data lives (never downloaded) and how it is read."""

    kind: Literal["voc", "cifar10", "cifar100", "imagenet", "fashion_mnist", "mnist"]
    root: str = Field(..., description="dataset folder (VOCdevkit, cifar-10-batches-py, ...)")
    train_sets: list[tuple[str, str]] = Field(
        default_factory=lambda: [("2007", "trainval"), ("2012", "trainval")], description="VOC (year, split) pairs to train on"
    )
    test_sets: list[tuple[str, str]] = Field(default_factory=lambda: [("2007", "test")], description="VOC (year, split) pairs to evaluate on")
    classes: list[str] | None = Field(None, description="VOC class names (default: the 20 VOC classes; [] = the names found in the training annotations)")
    augment: bool = Field(False, description="training augmentation (the paper's VOC recipe: off)")
    skip_bad: bool = Field(False, description="VOC: leave out images that fail the pre-flight checks (listed) instead of refusing to start")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes per rank")
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images (smoke runs)")
    limit_test: int | None = Field(None, ge=1, description="evaluate on the first N test images")

    @field_validator("train_sets", "test_sets", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """JSON has no tuples: its [year, split] arrays are the pairs."""
        return [tuple(v) if isinstance(v, list) else v for v in value] if isinstance(value, list) else value

    @field_validator("classes")
    @classmethod
    def _named(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (any(not c.strip() for c in value) or len(set(value)) != len(value)):
            raise ValueError(f"expected distinct, non-empty class names, got {value!r}")
        return value


class LRSchedule(_Strict):
    """Linear warm-up from ``warmup_start_lr`` to the optimizer's lr, then step decay."""

    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_lr: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)


class TrainConfig(_Strict):
    epochs: int = Field(..., ge=1)
    lr_schedule: LRSchedule = Field(default_factory=LRSchedule)
    eval_every: int = Field(1, ge=1, description="evaluate the global network every N epochs (and at the end)")
    checkpoint_every: int = Field(1, ge=1, description="save a checkpoint every N epochs (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="keep the newest N complete checkpoints; older ones are deleted")
    comm_timeout_minutes: float = Field(15.0, gt=0, le=10080, description="a collective that waits longer than this on a lost or "
                                        "stalled rank fails with an error instead of hanging (PyTorch's default: 30)")
    log_every: int = Field(10, ge=1, description="log the training loss every N steps")
    output_dir: str = Field("runs/run", description="checkpoints, metrics.jsonl and the resolved recipe go here")
    seed: int = Field(0, ge=0, description="data order seed")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke runs)")
    conf_threshold: float = Field(0.005, ge=0, le=1, description="detector: score threshold at evaluation")
    bn_recalibration_batches: int = Field(
        0, ge=0, description="re-estimate the global network's BN statistics on this many training batches before evaluating"
    )


class Recipe(_Strict):
    """A whole training recipe."""

    deepspeed: dict[str, Any]
    resist: ResISTConfig = Field(default_factory=ResISTConfig)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.model.kind == "yolo" and self.data.kind != "voc":
            raise ValueError(f"model.kind 'yolo' needs data.kind 'voc', got {self.data.kind!r}")
        if self.model.kind in ("preact_resnet", "resnet") and self.data.kind == "voc":
            raise ValueError(f"model.kind {self.model.kind!r} is a classifier; data.kind 'voc' needs model.kind 'yolo'")
        if self.model.kind == "yolo" and self.model.image_size % 32:
            raise ValueError(f"model.image_size must be a multiple of 32, got {self.model.image_size}")
        if "train_micro_batch_size_per_gpu" not in self.deepspeed:
            raise ValueError("deepspeed.train_micro_batch_size_per_gpu is required (the batch per worker)")
        _check_deepspeed_numbers(self.deepspeed)
        if "resist" in self.deepspeed:
            raise ValueError("put the resist section at the top level of the recipe, not inside deepspeed")
        self._check_model()
        check_deepspeed_config(self.deepspeed, self.resist.mode, prefix="deepspeed.")
        _check_optimizer_params(self.deepspeed)
        if "scheduler" in self.deepspeed and self.train.lr_schedule != LRSchedule():
            raise ValueError(
                "deepspeed.scheduler and train.lr_schedule both set the learning rate; keep one of them "
                "(with deepspeed.scheduler, DeepSpeed steps it and the loop leaves the lr alone)"
            )
        return self

    def _check_model(self) -> None:
        """What building the network on every rank would refuse, said before any rank starts."""
        m = self.model
        if m.kind == "yolo":
            if m.layers is not None:
                raise ValueError("model.layers: only model.kind 'preact_resnet' takes custom sections; the detector's "
                                 "backbone is the torchvision ResNet of model.depth")
            if (m.depth or 101) not in TORCHVISION_DEPTHS:
                raise ValueError(f"model.depth: the detector's backbone is a torchvision ResNet of depth "
                                 f"{', '.join(map(str, sorted(TORCHVISION_DEPTHS)))}; got {m.depth}")
        elif m.kind == "resnet":
            if m.layers is not None:
                raise ValueError("model.layers: model.kind 'resnet' is torchvision's ResNet of model.depth; "
                                 "custom sections are for 'preact_resnet'")
            if m.depth not in TORCHVISION_DEPTHS:
                raise ValueError(f"model.depth: torchvision's ResNets have depth "
                                 f"{', '.join(map(str, sorted(TORCHVISION_DEPTHS)))}; got {m.depth}")
        elif m.layers is None and m.depth not in PREACT_DEPTHS:
            raise ValueError(f"model.depth must be one of {', '.join(map(str, sorted(PREACT_DEPTHS)))} "
                             f"(or give model.layers); got {m.depth}")
        elif m.layers is not None and (len(m.layers) != 4 or min(m.layers) < 1):
            raise ValueError(f"model.layers: the blocks of 4 sections, at least one each; got {m.layers}")
        if self.resist.mode == "resist":
            self._check_partition()

    def _check_partition(self) -> None:
        """The partitioned blocks training would take (counted from the depth tables), refused
        here as training would refuse them: a section without a partitionable block, a minimum
        depth above the blocks there are."""
        r = self.resist
        if r.block_pattern is not None:
            try:
                re.compile(r.block_pattern)
            except re.error as e:
                raise ValueError(f"resist.block_pattern {r.block_pattern!r} is not a valid regular expression: {e}") from None
            return
        counts = self.partition_counts()
        if counts is None:
            return
        empty = [n for n, c in counts.items() if c < 1]
        if empty and r.sections is not None:
            raise ValueError(f"resist.sections: {empty[0]!r} has no partitionable block (its only block is strided); leave it out")
        if sum(counts.values()) < 1:
            raise ValueError(f"model: section 3 has {self.model.sections[2]} block, so ResIST has nothing to partition (its "
                             "first block stays shared); give section 3 more blocks, or use resist.mode 'local_sgd'")
        n = sum(counts.values())
        if r.min_blocks is not None and r.min_blocks > n:
            raise ValueError(f"resist.min_blocks must be at most {n}, the partitionable blocks of {', '.join(counts)} in this "
                             f"model (model.layers / model.depth); got {r.min_blocks}")

    def partition_counts(self) -> dict[str, int] | None:
        """Partitionable blocks per partitioned section, from the depth tables (no torch): what
        the engine will partition; ``None`` where only the built network can tell."""
        r, m = self.resist, self.model
        sections = {f"layer{i + 1}": n for i, n in enumerate(m.sections)}
        chosen = list(r.sections) if r.sections is not None else (list(sections) if m.kind == "resnet" else ["layer3"])
        for name in chosen:
            if name.rpartition(".")[2] not in sections:
                raise ValueError(f"resist.sections: {name!r} is not a section of this model (layer1, layer2, layer3, layer4)")
        if m.kind != "resnet" and r.sections is not None:
            return None  # which pre-activation blocks keep their input's shape depends on widths: the ranks check
        # Each section keeps its first block (strided, or kept so that no sub-ResNet skips the
        # section), except a ResNet-18/34 layer1 partitioned alone, whose blocks all keep their shape.
        whole = len(chosen) == 1 and m.kind == "resnet" and (m.depth or 101) < 50
        return {n: sections[n.rpartition(".")[2]] - (0 if whole and n.endswith("layer1") else 1) for n in chosen}

    @property
    def batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def base_lr(self) -> float:
        return float(((self.deepspeed.get("optimizer") or {}).get("params") or {}).get("lr", 0.1))


# Optimizer hyper-parameters that, when given as one value, are numbers >= 0 (DeepSpeed's own
# optimizers and torch.optim's; a list, as Adafactor's eps pair, is left to the optimizer).
_NUMERIC_PARAMS = ("lr", "momentum", "weight_decay", "eps", "dampening")


def _number(v: Any) -> bool:
    """A finite number >= 0 (JSON's true is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _check_deepspeed_numbers(ds: dict[str, Any]) -> None:
    """The DeepSpeed keys the ranks would crash on, checked here: batch sizes and clipping."""
    for key, top in (("train_micro_batch_size_per_gpu", 65536), ("gradient_accumulation_steps", 65536),
                     ("train_batch_size", 2**24)):
        v = ds.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
            raise ValueError(f"deepspeed.{key}: expected a whole number from 1 to {top}, got {v!r}")
    clip = ds.get("gradient_clipping")
    if clip is not None and not _number(clip):
        raise ValueError(f"deepspeed.gradient_clipping: expected a finite number >= 0 (0: off), got {clip!r}")


def _check_optimizer_params(ds: dict[str, Any]) -> None:
    optimizer = ds.get("optimizer")
    if optimizer is None:
        return
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params", {}), dict):
        raise ValueError('deepspeed.optimizer: expected {"type": ..., "params": {...}}, got ' + repr(optimizer)[:80])
    params = optimizer.get("params", {})
    for key in _NUMERIC_PARAMS:
        if params.get(key) is not None and not isinstance(params[key], (list, tuple)) and not _number(params[key]):
            raise ValueError(f"deepspeed.optimizer.params.{key}: expected a number >= 0, got {params[key]!r}")
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and b < 1 for b in betas)):
        raise ValueError(f"deepspeed.optimizer.params.betas: expected two numbers in [0, 1), got {betas!r}")


def load_recipe(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe (JSON path or dict); ``overrides`` maps dotted keys to values.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file or key.
    """
    where = "recipe"
    if isinstance(source, (str, Path)):
        where = str(source)
        data = read_json_file(source, "recipe")
    else:
        data = json.loads(json.dumps(source))
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with sections deepspeed, resist, model, data and train, "
                         f"got a {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {dotted}: {'.'.join(parents[:depth + 1])} is a value, not a section")
        node[last] = value
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise ValueError(f"{where}: {config_error(e, section=None)}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "data.root=\\"/x\\""]`` -> ``{"train.epochs": 3, "data.root": "/x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out
