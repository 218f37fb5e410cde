"""ImageNet as ``root/{train,val}/<wnid>/*.JPEG`` via :class:`torchvision.datasets.ImageFolder`.

Val uses the train folder's class indices; see :class:`ImageNetFolder`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from .classification_base import (
    _NEVER_DOWNLOADED,
    CLASSIFICATION_SPLITS,
    ImageTransform,
    PathLike,
    _check_choice,
    _to_float_image,
)

__all__ = ["ImageNetFolder"]


def _decode_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a ``uint8 [3, H, W]`` tensor (torchvision.io, PIL as fallback)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        from PIL import Image

        with Image.open(path) as im:
            return v2.functional.pil_to_tensor(im.convert("RGB"))


class _FixedClassImageFolder(tv_datasets.ImageFolder):
    """ImageFolder whose class list is given instead of taken from its own sub-folders."""

    def __init__(self, root: str, classes: Sequence[str], **kwargs: Any) -> None:
        self._given = list(classes)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = sorted(set(present) - set(self._given))
        if unknown:
            raise ValueError(f"{directory}: class folders {unknown[:5]} are not among the train classes")
        return list(self._given), {c: i for i, c in enumerate(self._given)}


class ImageNetFolder(Dataset):
    """ImageNet as ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``.

    Classes are the sorted ``wnid`` folder names of ``train`` when it exists (so val
    labels match train labels even if val lacks a class), else those of ``val``.
    ``split="test"`` reads ``val``. The transform receives one ``uint8 [3, H, W]`` tensor.
    """

    def __init__(self, root: PathLike, split: str = "train", transform: ImageTransform | None = None) -> None:
        _check_choice("split", split, CLASSIFICATION_SPLITS)
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        sub = "train" if split == "train" else "val"
        folder = self.root / sub
        if not folder.is_dir():
            raise FileNotFoundError(
                f"imagenet dataset not found: expected folder {folder} with one sub-folder per class "
                f"(<wnid>/*.JPEG). {_NEVER_DOWNLOADED}: place the extracted ILSVRC train and val "
                f"images as {self.root}/train/<wnid>/ and {self.root}/val/<wnid>/."
            )
        if not any(e.is_dir() for e in os.scandir(folder)):
            raise FileNotFoundError(
                f"imagenet {sub} folder {folder} has no class sub-folders: images must be sorted "
                f"into {folder}/<wnid>/ (a flat val folder has to be arranged by its ground-truth labels first)"
            )
        train_dir = self.root / "train"
        if sub == "val" and train_dir.is_dir():
            classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            self._folder = _FixedClassImageFolder(
                str(folder), classes, loader=_decode_rgb, allow_empty=True
            )
        else:
            self._folder = tv_datasets.ImageFolder(str(folder), loader=_decode_rgb)
        self.classes: tuple[str, ...] = tuple(self._folder.classes)
        self.samples: list[tuple[str, int]] = self._folder.samples
        self.targets: list[int] = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = _decode_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return _to_float_image(image), int(target)
