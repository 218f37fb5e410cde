"""The ``"resist"`` section of a DeepSpeed config: validated once, stripped before DeepSpeed sees it.

Example DeepSpeed config::

    {
      "train_micro_batch_size_per_gpu": 128,
      "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
      "resist": {"mode": "resist", "local_steps": 50, "min_blocks": 5}
    }
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..io import read_json_file

__all__ = ["CompressionConfig", "ResISTConfig", "split_config", "config_error", "check_deepspeed_config"]


class CompressionConfig(BaseModel):
    """What a sync sends: fp32 (``bits`` 32) or quantised to 4-8 bits with one scale per chunk."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    bits: Literal[4, 5, 6, 7, 8, 32] = Field(32, description="bits per value on the wire (32: uncompressed fp32)")
    chunk: int = Field(1024, ge=16, description="values per fp32 scale")
    stochastic: bool = Field(False, description="stochastic (unbiased) rounding instead of nearest")
    topk: float | None = Field(None, gt=0, le=1, description="send only this fraction of each averaged tensor's change "
                               "since the last sync, largest first (error feedback keeps the rest); routed blocks stay dense")


class ResISTConfig(BaseModel):
    """Settings of the ResIST engine (paper defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    mode: Literal["resist", "local_sgd", "ddp"] = Field("resist", description="resist, the local-SGD baseline, or plain DeepSpeed data parallel")
    local_steps: int = Field(50, ge=1, le=10**9, description="local steps between synchronisations (paper: 50; ImageNet 15)")
    min_blocks: int | None = Field(None, ge=1, description="minimum partitioned blocks per sub-ResNet (paper: 5; ImageNet 10); "
                                   "default: a fifth of the partitionable blocks, rounded up (5 of the paper's 22)")
    seed: int = Field(0, ge=0, description="seed of the partition plans")
    topology: Literal["rank", "node", "auto"] = Field(
        "auto", description="ResIST workers: every rank, or every machine (its ranks data-parallel replicas of one "
        "sub-network); auto: node when the job spans 2+ machines of several ranks each")
    scale: Literal["inclusion", "inverse_s"] = Field("inclusion", description="residual scaling of the global network")
    momentum: Literal["auto", "restart", "keep", "average"] = Field(
        "auto", description="optimizer state at each round: restart (paper, for SGD momentum), keep (arriving blocks start "
        "fresh), average (moments averaged and routed with the weights), or auto (keep for SGD, average for "
        "Adam-family optimizers, whose moments a restart wipes)")
    bn: Literal["average", "local"] = Field("average", description="BN running statistics: averaged at sync, or kept local")
    bn_sync_rounds: int = Field(1, ge=1, description="average BN statistics every this many rounds (paper ImageNet: 1300)")
    warmup_local_sgd_steps: int = Field(0, ge=0, description="local-SGD steps before ResIST starts (paper section 2.6)")
    sections: list[str] | None = Field(None, min_length=1, description="partitioned sections (module names, e.g. ['layer3', "
                                       "'layer4']); default: the model's resist_sections, else every ResNet section")
    block_pattern: str | None = Field(None, description="regex of partitionable block names, instead of sections")
    bucket_mb: float = Field(32.0, gt=0, description="size of the flat buckets used to average shared tensors")
    compression: CompressionConfig = Field(default_factory=CompressionConfig,
                                           description="transport of every tensor a sync sends (paper A.5), e.g. {\"bits\": 8}")

    @model_validator(mode="after")
    def _one_block_selection(self) -> ResISTConfig:
        if self.sections is not None and self.block_pattern is not None:
            raise ValueError("resist.sections and resist.block_pattern both select the partitioned blocks; give one of them")
        return self

    @model_validator(mode="after")
    def _compression_needs_rounds(self) -> ResISTConfig:
        if (self.compression.bits != 32 or self.compression.topk is not None) and self.mode == "ddp":
            raise ValueError("resist.compression: mode 'ddp' all-reduces gradients inside DeepSpeed every step and "
                             "cannot be compressed here; use mode 'local_sgd' for a compressed data-parallel baseline")
        return self

    def digest(self) -> str:
        """Stable hash of the settings; ranks compare it at start-up."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def check_deepspeed_config(ds: dict[str, Any], mode: str, prefix: str = "") -> None:
    """Refuse DeepSpeed features that assume every rank holds the same parameters (outside mode
    ``ddp``); ``prefix`` is where the section sits (``"deepspeed."`` in a recipe)."""
    for key, example in (("zero_optimization", '{"stage": 0}'), ("fp16", '{"enabled": false}'), ("bf16", '{"enabled": false}')):
        if ds.get(key) is not None and not isinstance(ds[key], dict):
            raise ValueError(f"{prefix}{key}: expected an object such as {example}, got {ds[key]!r}")
    if mode == "ddp":
        return
    zero = (ds.get("zero_optimization") or {}).get("stage", 0)
    if zero:
        raise ValueError(f"{prefix}zero_optimization.stage must be 0 with resist.mode={mode!r} (got {zero}): ranks hold different blocks")
    why = {
        # DeepSpeed 0.19: BF16_Optimizer splits one flat fp32 master copy of all parameters into equal
        # partitions over the data-parallel ranks and all-gathers the updated partitions every step.
        "bf16": "DeepSpeed's BF16_Optimizer partitions one flat fp32 master copy of the parameters across the ranks "
                "and all-gathers it after every step, which assumes every rank holds the same parameters",
        # FP16_Optimizer keeps flat fp32 master weights that it copies back into the fp16 module after
        # each step: blocks routed into the module at a sync would be overwritten by stale masters.
        "fp16": "DeepSpeed's FP16_Optimizer keeps flat fp32 master weights and copies them over the module after every "
                "step, so blocks routed into the module at a sync would be overwritten by stale master copies",
    }
    for key, reason in why.items():
        if (ds.get(key) or {}).get("enabled"):
            raise ValueError(
                f"{prefix}{key}.enabled is not supported with resist.mode={mode!r}: {reason}; train in fp32 with "
                "torch.autocast(device_type, dtype=torch.bfloat16) around the forward pass instead (mode 'ddp' takes it)"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_error(err: ValidationError, section: str | None = "resist") -> ValueError:
    """One readable error naming every offending key."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in ((section,) if section else ()) + tuple(e["loc"]))
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif not key:  # a check across keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']} (got {_short(got)})")
    return ValueError("invalid config: " + "; ".join(lines))


def split_config(config: dict[str, Any] | str | Path | None) -> tuple[dict[str, Any], ResISTConfig]:
    """Split a DeepSpeed config (dict or JSON path) into (DeepSpeed's part, ResIST settings)."""
    if config is None:
        raise ValueError("a DeepSpeed config (dict or JSON file path) is required")
    if isinstance(config, (str, Path)):
        config = read_json_file(config, "DeepSpeed config file")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a JSON file path, but got {type(config).__name__}")
    ds = copy.deepcopy(config)
    section = ds.pop("resist", {})
    if not isinstance(section, dict):
        raise ValueError(f"invalid config: resist: expected an object, got {type(section).__name__}")
    try:
        return ds, ResISTConfig(**section)
    except ValidationError as e:
        raise config_error(e) from None
