"""Image-classification datasets read from their standard on-disk forms.

Readers (each a map-style torch ``Dataset`` yielding ``(image, label)`` with ``image`` a
float32 ``CHW`` tensor and ``label`` an ``int``):

* :class:`CIFARDataset` (:mod:`.cifar`) -- CIFAR-10 / CIFAR-100 "python version" pickles
  (``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``,
  ``cifar-100-python/{train,test,meta}``, fine labels).
* :class:`ImageNetFolder` (:mod:`.imagenet`) -- ``root/{train,val}/<wnid>/*.JPEG`` via
  :class:`torchvision.datasets.ImageFolder`; val uses the train folder's class indices.
* :class:`IDXDataset` (:mod:`.idx`) -- MNIST / Fashion-MNIST IDX files, optionally gzipped.

Images are held / decoded as ``uint8 CHW`` tensors and handed to the transform in that
form; if the transform's result (or the image, without a transform) is still an integer
tensor it is scaled to float32 in ``[0, 1]`` (shared pieces: :mod:`.classification_base`).
The default transforms from :func:`default_transform` are torchvision ``transforms.v2``
pipelines ending in ``ToDtype(float32, scale=True)`` + ``Normalize``.

:func:`build_classification_dataset` is the single entry point. Datasets are never
downloaded: a missing dataset is a ``FileNotFoundError`` saying what was expected where.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .cifar import CIFARDataset
from .classification_base import (
    _NEVER_DOWNLOADED,
    CLASSIFICATION_KINDS,
    CLASSIFICATION_SPLITS,
    ImageTransform,
    PathLike,
    _check_choice,
)
from .idx import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    IDXDataset,
    _resolve_idx_folder,
    read_idx,
)
from .imagenet import ImageNetFolder

__all__ = [
    "CLASSIFICATION_KINDS",
    "CLASSIFICATION_SPLITS",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "NORMALIZATION",
    "CIFARDataset",
    "ClassificationInfo",
    "IDXDataset",
    "ImageNetFolder",
    "build_classification_dataset",
    "default_transform",
    "read_idx",
]

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Per-channel mean / std of the training split, images scaled to [0, 1].
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


@dataclass(frozen=True)
class ClassificationInfo:
    """Metadata of a built classification dataset.

    ``image_size`` is ``(height, width)`` of the images the default transform produces
    (for a custom ``transform`` it is the size the default would give).
    """

    kind: str
    split: str
    root: Path
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: tuple[str, ...]
    num_samples: int


# --------------------------------------------------------------------------- entry point


def default_transform(
    kind: str,
    split: str,
    *,
    augment: bool | None = None,
    normalize: bool = True,
    pad_to_32: bool = False,
    crop_size: int = 224,
    resize_size: int = 256,
) -> v2.Compose:
    """Standard transform (``uint8 CHW`` tensor in, normalised float32 out).

    * CIFAR: train = ``RandomCrop(32, padding=4)`` + horizontal flip (He et al. 2016);
      test = none; both then normalised per channel.
    * ImageNet: train = ``RandomResizedCrop(crop_size)`` + flip; test =
      ``Resize(resize_size)`` + ``CenterCrop(crop_size)``.
    * MNIST / Fashion-MNIST: no augmentation; ``pad_to_32`` zero-pads 28x28 to 32x32.

    ``augment`` defaults to ``split == "train"``; it has no effect for the IDX sets.
    """
    _check_choice("kind", kind, CLASSIFICATION_KINDS)
    _check_choice("split", split, CLASSIFICATION_SPLITS)
    augment = split == "train" if augment is None else augment
    steps: list[Any] = []
    if kind in ("cifar10", "cifar100"):
        if augment:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    elif kind == "imagenet":
        if augment:
            steps += [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)]
    elif pad_to_32:
        steps.append(v2.Pad(2, fill=0))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        mean, std = NORMALIZATION[kind]
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


def build_classification_dataset(
    kind: str,
    root: PathLike | None,
    split: str,
    *,
    transform: ImageTransform | None = None,
    augment: bool | None = None,
    normalize: bool = True,
    pad_to_32: bool = False,
    crop_size: int = 224,
    resize_size: int = 256,
) -> tuple[Dataset, ClassificationInfo]:
    """Build a classification dataset and its metadata.

    ``kind`` is one of :data:`CLASSIFICATION_KINDS`, ``split`` ``"train"`` or ``"test"``
    (ImageNet's test is its ``val`` folder). ``transform`` replaces the default from
    :func:`default_transform` (whose flags are the remaining keywords). ``root=None`` is
    only resolvable for ``fashion_mnist``, where the Debian package location
    :data:`DEBIAN_FASHION_MNIST_DIR` is the default.
    """
    _check_choice("kind", kind, CLASSIFICATION_KINDS)
    _check_choice("split", split, CLASSIFICATION_SPLITS)
    if transform is None:
        transform = default_transform(
            kind, split, augment=augment, normalize=normalize, pad_to_32=pad_to_32,
            crop_size=crop_size, resize_size=resize_size,
        )  # fmt: skip
    if root is None and kind != "fashion_mnist":
        layout = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/",
                  "imagenet": "train/<wnid>/ and val/<wnid>/", "mnist": "the four *-idx?-ubyte[.gz] files"}  # fmt: skip
        raise FileNotFoundError(
            f"{kind} dataset: root=None but {kind} has no default location; pass the folder "
            f"holding {layout[kind]}. {_NEVER_DOWNLOADED}."
        )

    dataset: CIFARDataset | ImageNetFolder | IDXDataset
    if kind in ("cifar10", "cifar100"):
        assert root is not None
        dataset = CIFARDataset(root, split, num_classes=int(kind[5:]), transform=transform)
        channels, size = 3, (32, 32)
    elif kind == "imagenet":
        assert root is not None
        dataset = ImageNetFolder(root, split, transform=transform)
        channels, size = 3, (crop_size, crop_size)
    else:
        folder = _resolve_idx_folder(kind, root, split)
        classes = FASHION_MNIST_CLASSES if kind == "fashion_mnist" else MNIST_CLASSES
        dataset = IDXDataset(folder, split, transform=transform, classes=classes)
        h, w = dataset.data.shape[-2:]
        channels, size = 1, ((h + 4, w + 4) if pad_to_32 else (h, w))
    info = ClassificationInfo(
        kind=kind,
        split=split,
        root=dataset.root,
        num_classes=len(dataset.classes),
        in_channels=channels,
        image_size=size,
        classes=dataset.classes,
        num_samples=len(dataset),
    )
    return dataset, info
