"""Image-classification datasets read from their standard on-disk forms.

Readers (each a map-style torch ``Dataset`` yielding ``(image, label)`` with ``image`` a
float32 ``CHW`` tensor and ``label`` an ``int``):

* :class:`CIFARDataset` -- CIFAR-10 / CIFAR-100 "python version" pickles
  (``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``,
  ``cifar-100-python/{train,test,meta}``, fine labels).
* :class:`ImageNetFolder` -- ``root/{train,val}/<wnid>/*.JPEG`` via
  :class:`torchvision.datasets.ImageFolder`; val uses the train folder's class indices.
* :class:`IDXDataset` -- MNIST / Fashion-MNIST IDX files, optionally gzipped.

Images are held / decoded as ``uint8 CHW`` tensors and handed to the transform in that
form; if the transform's result (or the image, without a transform) is still an integer
tensor it is scaled to float32 in ``[0, 1]``. The default transforms from
:func:`default_transform` are torchvision ``transforms.v2`` pipelines ending in
``ToDtype(float32, scale=True)`` + ``Normalize``.

:func:`build_classification_dataset` is the single entry point. Datasets are never
downloaded: a missing dataset is a ``FileNotFoundError`` saying what was expected where.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

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

PathLike = str | os.PathLike[str]
ImageTransform = Callable[[torch.Tensor], Any]

CLASSIFICATION_KINDS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet", "fashion_mnist", "mnist")
CLASSIFICATION_SPLITS: tuple[str, ...] = ("train", "test")

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four ``*-ubyte.gz`` files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Per-channel mean / std of the training split, images scaled to [0, 1].
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

_NEVER_DOWNLOADED = "Datasets are never downloaded"


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


def _to_float_image(x: Any) -> Any:
    """Scale an integer image tensor to float32 in ``[0, 1]``; anything else is passed through."""
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return x.to(torch.float32).div_(255.0)
    return x


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


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CIFARLayout:
    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


_CIFAR_LAYOUTS: dict[int, _CIFARLayout] = {
    10: _CIFARLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    100: _CIFARLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _pickle_get(d: dict[Any, Any], key: str, path: Path) -> Any:
    """``d[key]`` accepting both bytes keys (Python-2 pickles) and str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: CIFAR pickle has no {key!r} entry (keys: {sorted(map(repr, d))})")


def _load_pickle(path: Path) -> dict[Any, Any]:
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f, encoding="bytes")
        except Exception as e:  # noqa: BLE001 -- any unpickling failure means a bad file
            raise ValueError(f"{path}: not a readable CIFAR python pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


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


class CIFARDataset(_InMemoryImages):
    """CIFAR-10 / CIFAR-100 from the distributed python-pickle batches.

    ``root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or
    its parent. CIFAR-100 uses the 100 fine labels. Images are kept in memory as
    ``uint8 [N, 3, 32, 32]``; the transform receives one ``uint8 CHW`` tensor.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        num_classes: int = 10,
        transform: ImageTransform | None = None,
    ) -> None:
        _check_choice("split", split, CLASSIFICATION_SPLITS)
        if num_classes not in _CIFAR_LAYOUTS:
            raise ValueError(f"num_classes={num_classes!r} is not supported; expected 10 or 100")
        layout = _CIFAR_LAYOUTS[num_classes]
        self.split = split
        self.transform = transform
        self.root = self.resolve_root(root, num_classes)

        images, labels = [], []
        for name in layout.train if split == "train" else layout.test:
            path = self.root / name
            batch = _load_pickle(path)
            data = np.asarray(_pickle_get(batch, "data", path), dtype=np.uint8)
            lab = np.asarray(_pickle_get(batch, layout.label_key, path), dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: 'data' must have shape [N, 3072], got {list(data.shape)}")
            if lab.shape != (data.shape[0],):
                raise ValueError(f"{path}: {data.shape[0]} images but {lab.size} {layout.label_key!r}")
            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got [{lab.min()}, {lab.max()}]")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab)
        self.data = torch.from_numpy(np.concatenate(images))
        self.targets: list[int] = np.concatenate(labels).tolist()

        meta_path = self.root / layout.meta
        if meta_path.is_file():
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in _pickle_get(_load_pickle(meta_path), layout.names_key, meta_path)]  # fmt: skip
            if len(names) != num_classes:
                raise ValueError(f"{meta_path}: {len(names)} {layout.names_key!r}, expected {num_classes}")
            self.classes: tuple[str, ...] = tuple(names)
        else:
            self.classes = tuple(str(i) for i in range(num_classes))

    @staticmethod
    def resolve_root(root: PathLike, num_classes: int) -> Path:
        """The folder holding the batches: ``root`` itself or ``root/<standard folder>``."""
        layout = _CIFAR_LAYOUTS[num_classes]
        needed = (*layout.train, *layout.test)
        root = Path(root).expanduser()
        for cand in (root, root / layout.folder):
            if all((cand / n).is_file() for n in needed):
                return cand
        expected = root if root.name == layout.folder else root / layout.folder
        missing = [n for n in (*needed, layout.meta) if not (expected / n).is_file()]
        raise FileNotFoundError(
            f"cifar{num_classes} dataset not found: expected folder {expected} (or {root} itself) "
            f"containing {', '.join((*needed, layout.meta))}; missing there: {', '.join(missing)}. "
            f"{_NEVER_DOWNLOADED}: extract {layout.archive} so that {layout.folder}/ lies under {expected.parent}."
        )


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension


def read_idx(path: PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) into a numpy array.

    The header is a big-endian int32 magic ``0x0000TTNN`` (``TT`` the element type,
    ``NN`` the number of dimensions) followed by ``NN`` big-endian uint32 sizes.
    Raises ``ValueError`` naming the file on a wrong magic number or a size mismatch.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number {magic} (0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (needs {header} bytes, file has {len(raw)})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected_bytes:
        raise ValueError(
            f"{path}: IDX dims {list(dims)} need {expected_bytes} data bytes, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


class IDXDataset(_InMemoryImages):
    """MNIST / Fashion-MNIST from the four IDX files in one folder (each optionally ``.gz``).

    Images are kept in memory as ``uint8 [N, 1, H, W]``; the transform receives one
    ``uint8 CHW`` tensor. ``classes`` is only used for the names (and their number
    bounds the labels).
    """

    def __init__(
        self,
        folder: PathLike,
        split: str = "train",
        transform: ImageTransform | None = None,
        classes: Sequence[str] = MNIST_CLASSES,
    ) -> None:
        _check_choice("split", split, CLASSIFICATION_SPLITS)
        self.root = Path(folder)
        self.split = split
        self.transform = transform
        self.classes: tuple[str, ...] = tuple(classes)
        image_name, label_name = _IDX_FILES[split]
        image_path, label_path = _find_idx_file(self.root, image_name), _find_idx_file(self.root, label_name)
        if image_path is None or label_path is None:
            missing = [n for n, p in ((image_name, image_path), (label_name, label_path)) if p is None]
            raise FileNotFoundError(
                f"IDX {split} files not found in {self.root}: missing {', '.join(missing)} (or .gz). "
                f"{_NEVER_DOWNLOADED}."
            )
        images = read_idx(image_path, _IDX_IMAGES_MAGIC)
        labels = read_idx(label_path, _IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"IDX count mismatch: {image_path} has {images.shape[0]} images "
                f"but {label_path} has {labels.shape[0]} labels"
            )
        if labels.size and labels.max() >= len(self.classes):
            raise ValueError(f"{label_path}: labels must lie in [0, {len(self.classes)}), max is {labels.max()}")
        self.image_path, self.label_path = image_path, label_path
        self.data = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W]
        self.targets: list[int] = labels.astype(np.int64).tolist()


def _idx_candidates(kind: str, root: PathLike | None) -> list[Path]:
    """Folders that may hold the IDX files, in search order."""
    if root is None:
        return [DEBIAN_FASHION_MNIST_DIR] if kind == "fashion_mnist" else []
    root = Path(root).expanduser()
    tv_name = "FashionMNIST" if kind == "fashion_mnist" else "MNIST"
    return [root, root / "raw", root / tv_name / "raw", root / kind.replace("_", "-")]


def _resolve_idx_folder(kind: str, root: PathLike | None, split: str) -> Path:
    names = _IDX_FILES[split]
    candidates = _idx_candidates(kind, root)
    for cand in candidates:
        if all(_find_idx_file(cand, n) is not None for n in names):
            return cand
    looked = ", ".join(str(c) for c in candidates) or "(no default location for this kind)"
    hint = (
        " With root=None the Debian package dataset-fashion-mnist location is used."
        if kind == "fashion_mnist"
        else ""
    )
    raise FileNotFoundError(
        f"{kind} {split} dataset not found: expected a folder containing {' and '.join(names)} "
        f"(each optionally .gz); looked in {looked}. {_NEVER_DOWNLOADED}: put the IDX files "
        f"in {Path(root).expanduser() if root is not None else 'a folder'} and pass it as root.{hint}"
    )


# --------------------------------------------------------------------------- ImageNet


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
