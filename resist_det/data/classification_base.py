"""Shared pieces of the classification readers (:mod:`resist_det.data.classification`).

The supported dataset kinds and splits, the argument check, and the in-memory image
base class of the CIFAR and IDX readers. Images are held / decoded as ``uint8 CHW``
tensors and handed to the transform in that form; if the transform's result (or the
image, without a transform) is still an integer tensor it is scaled to float32 in
``[0, 1]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["CLASSIFICATION_KINDS", "CLASSIFICATION_SPLITS", "ImageTransform", "PathLike"]

PathLike = str | os.PathLike[str]
ImageTransform = Callable[[torch.Tensor], Any]

CLASSIFICATION_KINDS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet", "fashion_mnist", "mnist")
CLASSIFICATION_SPLITS: tuple[str, ...] = ("train", "test")

_NEVER_DOWNLOADED = "Datasets are never downloaded"


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


def _to_float_image(x: Any) -> Any:
    """Scale an integer image tensor to float32 in ``[0, 1]``; anything else is passed through."""
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return x.to(torch.float32).div_(255.0)
    return x


class _InMemoryImages(Dataset):
    """Images held as one uint8 tensor ``data`` [N, C, H, W] with integer ``targets``."""

    data: torch.Tensor
    targets: list[int]
    transform: Any

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.data[index]
        if self.transform is not None:
            image = self.transform(image)
        return _to_float_image(image), self.targets[index]
