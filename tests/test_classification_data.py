"""Classification dataset readers on tiny fakes written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resist_det.data.classification import (
    DEBIAN_FASHION_MNIST_DIR,
    CIFARDataset,
    IDXDataset,
    ImageNetFolder,
    build_classification_dataset,
    default_transform,
    read_idx,
)

# ------------------------------------------------------------------ fake writers


def _write_pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_fake_cifar10(parent: Path, per_batch: int = 4) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[:, 0] = i  # marks the batch in the first red pixel
        labels = [(i + j) % 10 for j in range(per_batch)]
        _write_pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder


def write_fake_cifar100(parent: Path, n_train: int = 6, n_test: int = 3) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072).astype(np.uint8)
        _write_pickle(folder / name, {b"data": data, b"fine_labels": [99 - j for j in range(n)],
                                      b"coarse_labels": [j % 20 for j in range(n)]})  # fmt: skip
    _write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                    b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})  # fmt: skip
    return folder


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x08 << 8) | arr.ndim if magic is None else magic
    return struct.pack(">i", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fake_idx(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        images[:, 27, 27] = 255
        labels = (np.arange(n) * 3) % 10
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return folder


def write_fake_imagenet(root: Path) -> Path:
    rng = np.random.default_rng(1)
    layout = {"train": {"n01": 2, "n02": 2, "n03": 1}, "val": {"n01": 1, "n03": 2}}  # val lacks n02
    for split, classes in layout.items():
        for wnid, count in classes.items():
            d = root / split / wnid
            d.mkdir(parents=True)
            for k in range(count):
                arr = rng.integers(0, 256, size=(20 + 4 * k, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{wnid}_{k}.JPEG", format="JPEG")
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_layout_and_items(tmp_path: Path, use_parent: bool) -> None:
    folder = write_fake_cifar10(tmp_path)
    root = tmp_path if use_parent else folder
    train, info = build_classification_dataset("cifar10", root, "train")
    assert len(train) == 20 and info.num_samples == 20
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, (32, 32))
    assert info.root == folder and info.classes[0] == "airplane" and info.classes[9] == "truck"
    # batches are concatenated in order 1..5; labels come through unchanged
    assert train.targets[:4] == [0, 1, 2, 3] and train.targets[4:8] == [1, 2, 3, 4]
    assert [int(train.data[4 * i, 0, 0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]
    image, label = train[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 2

    test, tinfo = build_classification_dataset("cifar10", root, "test", normalize=False)
    assert len(test) == 4 and test.targets == [5, 6, 7, 8]
    image, _ = test[0]
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"][0]
    assert torch.allclose(image, torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    ds, info = build_classification_dataset("cifar100", tmp_path, "train", augment=False, normalize=False)
    assert (len(ds), info.num_classes, info.in_channels) == (6, 100, 3)
    assert ds.targets == [99, 98, 97, 96, 95, 94] and info.classes[99] == "c99"
    image, label = ds[1]
    assert label == 98 and image.shape == (3, 32, 32)
    expected = torch.arange(3072, 2 * 3072).to(torch.uint8).reshape(3, 32, 32).float() / 255
    assert torch.allclose(image, expected)
    assert len(build_classification_dataset("cifar100", tmp_path, "test")[0]) == 3


def test_cifar_train_augmentation_is_random_crop_flip(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    ds = CIFARDataset(tmp_path, "train", transform=default_transform("cifar10", "train", normalize=False))
    torch.manual_seed(0)
    outs = torch.stack([ds[0][0] for _ in range(12)])
    assert outs.shape == (12, 3, 32, 32)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random crops / flips differ
    assert (outs == 0).any()  # padding of 4 shows up as zeros in some crops


def test_cifar_missing_folder_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        build_classification_dataset("cifar10", tmp_path / "nowhere", "train")
    msg = str(exc.value)
    assert "cifar10" in msg and str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "batches.meta" in msg and "never downloaded" in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_classification_dataset("cifar100", tmp_path, "test")


def test_cifar_bad_pickle(tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path)
    _write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="test_batch.*3072"):
        CIFARDataset(folder, "test")


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_fashion_mnist(tmp_path: Path, gz: bool) -> None:
    root = write_fake_idx(tmp_path / "fm", gz=gz)
    ds, info = build_classification_dataset("fashion_mnist", root, "train", normalize=False)
    assert (len(ds), info.num_classes, info.in_channels, info.image_size) == (5, 10, 1, (28, 28))
    assert ds.targets == [0, 3, 6, 9, 2] and info.classes[9] == "Ankle boot"
    image, label = ds[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 6
    assert image[0, 0, 0].item() == pytest.approx(2 / 255) and image[0, 27, 27].item() == 1.0

    test, tinfo = build_classification_dataset("mnist", root, "test", pad_to_32=True)
    assert len(test) == 3 and tinfo.image_size == (32, 32) and tinfo.classes[0] == "0"
    padded, _ = test[0]
    assert padded.shape == (1, 32, 32)
    assert torch.allclose(padded[0, 0, 0], torch.tensor((0 - 0.1307) / 0.3081), atol=1e-5)


def test_idx_torchvision_raw_layout(tmp_path: Path) -> None:
    write_fake_idx(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds, info = build_classification_dataset("fashion_mnist", tmp_path, "test")
    assert len(ds) == 3 and info.root == tmp_path / "FashionMNIST" / "raw"


def test_read_idx_header(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(arr))
    out = read_idx(tmp_path / "x", 2051)
    assert out.shape == (2, 3, 4) and np.array_equal(out, arr)


def test_idx_bad_magic(tmp_path: Path) -> None:
    root = write_fake_idx(tmp_path / "m")
    labels = np.zeros(5, np.uint8)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, magic=2051))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*magic number 2051.*2049"):
        build_classification_dataset("mnist", root, "train")


def test_idx_count_mismatch_and_truncation(tmp_path: Path) -> None:
    root = write_fake_idx(tmp_path / "m", gz=True)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz has 5 images.*4 labels"):
        IDXDataset(root, "train")
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        IDXDataset(root, "test")


def test_idx_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        build_classification_dataset("mnist", tmp_path / "mn", "test")
    msg = str(exc.value)
    assert "mnist" in msg and str(tmp_path / "mn") in msg and "t10k-images-idx3-ubyte" in msg
    assert "never downloaded" in msg


# ------------------------------------------------------------------ ImageNet


def test_imagenet_folders(tmp_path: Path) -> None:
    root = write_fake_imagenet(tmp_path / "imagenet")
    train, info = build_classification_dataset("imagenet", root, "train", crop_size=64)
    assert (len(train), info.num_classes, info.in_channels, info.image_size) == (5, 3, 3, (64, 64))
    assert info.classes == ("n01", "n02", "n03") and train.targets == [0, 0, 1, 1, 2]
    image, label = train[2]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 1

    val, vinfo = build_classification_dataset("imagenet", root, "test", crop_size=16, resize_size=18)
    assert vinfo.num_classes == 3 and val.targets == [0, 2, 2]  # n03 keeps train's index 2
    image, label = val[1]
    assert image.shape == (3, 16, 16) and label == 2

    raw, _ = ImageNetFolder(root, "test")[0]
    assert raw.shape == (3, 20, 30) and 0.0 <= raw.min() and raw.max() <= 1.0


def test_imagenet_missing_and_flat_val(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        build_classification_dataset("imagenet", tmp_path, "test")
    assert str(tmp_path / "val") in str(exc.value) and "never downloaded" in str(exc.value)
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        ImageNetFolder(tmp_path, "test")


# ------------------------------------------------------------------ arguments


def test_unknown_kind_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kind='svhn'.*'cifar10'.*'mnist'"):
        build_classification_dataset("svhn", tmp_path, "train")
    with pytest.raises(ValueError, match=r"split='val'.*'train', 'test'"):
        build_classification_dataset("cifar10", tmp_path, "val")


def test_root_none_without_default(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10.*no default location"):
        build_classification_dataset("cifar10", None, "train")


# ------------------------------------------------------------------ Debian package

_DEBIAN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip


@pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST_DIR / f).is_file() for f in _DEBIAN_FILES),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_debian_fashion_mnist() -> None:
    train, info = build_classification_dataset("fashion_mnist", None, "train")
    test, tinfo = build_classification_dataset("fashion_mnist", None, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert info.root == DEBIAN_FASHION_MNIST_DIR and (info.num_classes, info.in_channels) == (10, 1)
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    image, label = test[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
