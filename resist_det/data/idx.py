"""MNIST / Fashion-MNIST from IDX files, optionally gzipped.

:func:`read_idx` reads one IDX file, :class:`IDXDataset` the images + labels of a split,
and a helper finds the folder holding them (for Fashion-MNIST with ``root=None``, the
Debian package location :data:`DEBIAN_FASHION_MNIST_DIR`).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .classification_base import (
    _NEVER_DOWNLOADED,
    CLASSIFICATION_SPLITS,
    ImageTransform,
    PathLike,
    _check_choice,
    _InMemoryImages,
)

__all__ = ["DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "IDXDataset", "read_idx", "write_quadrant_idx"]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four ``*-ubyte.gz`` files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


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


def write_quadrant_idx(folder: PathLike, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST-shaped set in IDX form (for tests and smoke runs; datasets are never
    downloaded): 28x28 noise whose label (0-3) is its brightest quadrant."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, lab in enumerate(labels):
            r, c = divmod(int(lab), 2)
            images[i, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] += 150
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder
