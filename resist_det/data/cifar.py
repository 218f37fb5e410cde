"""CIFAR-10 / CIFAR-100 from the "python version" pickles.

``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and
``cifar-100-python/{train,test,meta}`` (fine labels); see :class:`CIFARDataset`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

__all__ = ["CIFARDataset"]


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
