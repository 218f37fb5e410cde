"""VOC reader: hand-written VOCdevkit trees in tmp_path, including every error path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from resist_det.data.transforms import boxes_to_original, detection_transform
from resist_det.data.voc import VOC_CLASSES, VOCDetection, collate_detection, collect_classes

W, H = 64, 48


def obj(name: str, box: tuple[str, str, str, str], difficult: str | None = "0", truncated: str | None = "0") -> str:
    flags = ""
    if difficult is not None:
        flags += f"<difficult>{difficult}</difficult>"
    if truncated is not None:
        flags += f"<truncated>{truncated}</truncated>"
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Left</pose>{flags}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def xml(image_id: str, *objects: str, size: tuple[int, int] = (W, H)) -> str:
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(objects)}</annotation>")


def make_year(root: Path, year: str, annotations: dict[str, str | None], splits: dict[str, list[str]],
              images: list[str] | None = None) -> Path:
    """Write root/VOC<year>; annotations[id] None means no XML; images defaults to all ids."""
    d = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        if text is not None:
            (d / "Annotations" / f"{image_id}.xml").write_text(text)
    for k, image_id in enumerate(annotations if images is None else images):
        pixels = np.full((H, W, 3), (10 * k % 255, 100, 200), np.uint8)
        Image.fromarray(pixels).save(d / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in splits.items():
        (d / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return d


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    make_year(root, "2007", {
        "000001": xml("000001",
                      obj("dog", ("10", "5", "30", "25")),
                      obj("person", ("1.5", "2.25", "40.75", "47"), difficult="1", truncated="1")),
        "000002": xml("000002"),  # no objects
        "000003": xml("000003", obj("cat", ("1", "1", "64", "48"), difficult=None, truncated=None)),
    }, {"trainval": ["000001", "000002"], "test": ["000003"]})
    make_year(root, "2012", {
        "2008_000001": xml("2008_000001", obj("car", ("3", "4", "20", "30"))),
    }, {"trainval": ["2008_000001"]})
    return root


def test_parses_boxes_flags_and_floats(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, [("2007", "trainval")])
    assert len(ds) == 2 and ds.image_ids == ["000001", "000002"]
    image, target = ds[0]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert target["boxes"].dtype == np.float32 and target["boxes"].shape == (2, 4)
    np.testing.assert_allclose(target["boxes"], [[10, 5, 30, 25], [1.5, 2.25, 40.75, 47]])
    assert target["labels"].dtype == np.int64
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert target["difficult"].dtype == bool and target["difficult"].tolist() == [False, True]
    assert target["truncated"].tolist() == [False, True]
    assert target["image_id"] == "000001" and target["size"] == (H, W)


def test_image_without_objects_and_missing_flags(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, ("2007", "trainval"))  # a single pair is accepted too
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == np.float32
    assert target["labels"].shape == (0,) and target["difficult"].shape == (0,)
    ann = VOCDetection(voc_root, [("2007", "test")]).get_annotation(0)
    assert ann["difficult"].tolist() == [False] and ann["truncated"].tolist() == [False]


def test_get_annotation_matches_getitem_without_reading_pixels(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, [("2007", "trainval")])
    ds._image_paths[0].unlink()  # annotation access must not touch the JPEG
    ann = ds.get_annotation(0)
    assert ann["labels"].tolist() == [11, 14]


def test_union_of_two_years(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, [("2007", "trainval"), ("2012", "trainval")])
    assert len(ds) == 3
    assert ds.image_ids == ["2007/000001", "2007/000002", "2012/2008_000001"]
    _, target = ds[2]
    assert target["labels"].tolist() == [VOC_CLASSES.index("car")]
    # the VOCdevkit parent folder is accepted as root as well
    assert len(VOCDetection(voc_root.parent, [("2012", "trainval")])) == 1


def test_custom_classes_and_collect(voc_root: Path) -> None:
    classes = collect_classes(voc_root, [("2007", "trainval"), ("2007", "test")])
    assert classes == ("cat", "dog", "person")
    ds = VOCDetection(voc_root, [("2007", "trainval")], classes=classes)
    assert ds.get_annotation(0)["labels"].tolist() == [1, 2]


def test_unknown_class_raises_or_skips(voc_root: Path) -> None:
    with pytest.raises(ValueError, match=r"000001\.xml.*'person'.*not in the class list"):
        VOCDetection(voc_root, [("2007", "trainval")], classes=("dog",))
    ds = VOCDetection(voc_root, [("2007", "trainval")], classes=("dog",), skip_unknown=True)
    assert ds.get_annotation(0)["labels"].tolist() == [0]


def test_malformed_xml(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": "<annotation><object>"}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.xml.*malformed XML"):
        VOCDetection(tmp_path, [("2007", "train")])


def test_missing_image_or_xml(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": xml("a"), "b": xml("b")}, {"train": ["a", "b"]}, images=["a"])
    with pytest.raises(ValueError, match=r"JPEGImages/b\.jpg"):
        VOCDetection(tmp_path, [("2007", "train")])
    make_year(tmp_path, "2008", {"a": None}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"Annotations/a\.xml"):
        VOCDetection(tmp_path, [("2008", "train")])


def test_inverted_box_rejected(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": xml("a", obj("dog", ("1", "1", "5", "5")), obj("cat", ("20", "1", "10", "5")))},
              {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.xml: object #1 \('cat'\).*inverted"):
        VOCDetection(tmp_path, [("2007", "train")])


def test_box_outside_image_is_clipped_with_warning(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": xml("a", obj("dog", ("-3", "2", "70", "50")))}, {"train": ["a"]})
    with pytest.warns(UserWarning, match=r"a\.xml.*clipped"):
        ds = VOCDetection(tmp_path, [("2007", "train")])
    np.testing.assert_allclose(ds.get_annotation(0)["boxes"], [[0, 2, W, H]])


def test_box_entirely_outside_image_rejected(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": xml("a", obj("dog", ("100", "2", "120", "10")))}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.xml.*entirely outside"):
        VOCDetection(tmp_path, [("2007", "train")])


def test_empty_split(tmp_path: Path) -> None:
    make_year(tmp_path, "2007", {"a": xml("a")}, {"train": []})
    with pytest.raises(ValueError, match=r"train\.txt.*empty|empty.*train\.txt"):
        VOCDetection(tmp_path, [("2007", "train")])


def test_missing_root_or_year(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*never downloaded"):
        VOCDetection(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"VOC2012.*never downloaded"):
        VOCDetection(tmp_path, [("2012", "trainval")])
    make_year(tmp_path, "2007", {"a": xml("a")}, {"train": ["a"]})
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        VOCDetection(tmp_path, [("2007", "val")])


def test_transform_and_collate(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, [("2007", "trainval"), ("2007", "test")], transform=detection_transform(32))
    image, target = ds[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and image.dtype == torch.float32
    # VOC (1-based inclusive) -> pixel edges -> scaled by 32/64 in x and 32/48 in y
    np.testing.assert_allclose(target["boxes"][0], [9 / 2, 4 * 32 / 48, 30 / 2, 25 * 32 / 48], rtol=1e-5)
    assert target["difficult"].tolist() == [False, True]
    # the inverse mapping recovers the original VOC coordinates
    back = boxes_to_original(target["boxes"], (32, 32), target["size"])
    np.testing.assert_allclose(back, ds.get_annotation(0)["boxes"], rtol=1e-5)
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert images.shape == (3, 3, 32, 32) and len(targets) == 3
    assert targets[1]["boxes"].shape == (0, 4) and isinstance(targets[0]["labels"], torch.Tensor)
    # one-pixel-wide VOC box (xmin == xmax) survives the transform
    t = detection_transform(32)
    _, b, lab = t(np.zeros((H, W, 3), np.uint8), np.array([[5.0, 5.0, 5.0, 9.0]]), np.array([3]))
    assert b.shape == (1, 4) and lab.tolist() == [3] and b[0, 2] > b[0, 0]


def test_augment_keeps_boxes_aligned() -> None:
    t = detection_transform(64, augment=True, seed=3)
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    boxes = np.array([[2.0, 2.0, 20.0, 20.0], [30.0, 10.0, 60.0, 40.0]])
    for _ in range(20):
        tensor, b, lab, diff = t(image, boxes, np.array([1, 2]), difficult=np.array([False, True]))
        assert tensor.shape == (3, 64, 64)
        assert len(b) == len(lab) == len(diff)
        assert (b >= 0).all() and (b <= 64).all()
        assert all((lab == 2) == diff)  # difficult flag travels with its box


def test_size_must_be_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        detection_transform(100)


def test_collate_rejects_mixed_sizes() -> None:
    with pytest.raises(ValueError, match="equally sized"):
        collate_detection([(np.zeros((4, 4, 3), np.uint8), {}), (np.zeros((5, 4, 3), np.uint8), {})])


def test_no_warning_for_clean_data(voc_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VOCDetection(voc_root, [("2007", "trainval"), ("2012", "trainval")])


# ---- pre-flight: every bad image listed before training, or left out with skip_bad -------------
def _break_voc(d: Path) -> dict[str, str]:
    """Damage five images of a written VOC year five ways; returns id -> what the error names."""
    ids = [line.strip() for line in (d / "ImageSets/Main/train.txt").read_text().splitlines()]
    test = [line.strip() for line in (d / "ImageSets/Main/test.txt").read_text().splitlines()]
    bad = {ids[0]: "malformed XML", ids[1]: "truncated JPEG", ids[2]: "inverted box", ids[3]: "JPEG is missing",
           ids[4]: "annotation says", test[0]: "truncated JPEG"}
    (d / "Annotations" / f"{ids[0]}.xml").write_text("<annotation><object>")
    for i in (ids[1], test[0]):
        data = (d / "JPEGImages" / f"{i}.jpg").read_bytes()
        (d / "JPEGImages" / f"{i}.jpg").write_bytes(data[: len(data) // 2])  # an interrupted copy
    text = (d / "Annotations" / f"{ids[2]}.xml").read_text()
    (d / "Annotations" / f"{ids[2]}.xml").write_text(text.replace("<xmin>", "<xmin>9999", 1))
    (d / "JPEGImages" / f"{ids[3]}.jpg").unlink()
    text = (d / "Annotations" / f"{ids[4]}.xml").read_text()
    (d / "Annotations" / f"{ids[4]}.xml").write_text(text.replace("<width>", "<width>1", 1))
    return bad


def test_a_decompression_bomb_is_named_not_decoded(tmp_path: Path) -> None:
    """A PNG whose header claims 30000 x 30000 pixels (a few dozen bytes on disk): the check
    names it without decoding it, where a data loader would raise mid-epoch."""
    import struct
    import zlib

    from resist_det.data.image_check import image_problem

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    problem = image_problem(bomb)
    assert problem is not None and problem.startswith(f"{bomb}: too large to decode") and "900000000 pixels" in problem


def test_grayscale_cmyk_and_png_named_jpg_are_converted_not_fatal(tmp_path: Path) -> None:
    """Images VOC-style sets do contain: a grayscale JPEG, a CMYK JPEG and a PNG saved under a
    .jpg name pass the pre-flight check and decode to HxWx3 RGB like any other image."""
    root = tmp_path / "VOCdevkit"
    ids = ["gray", "cmyk", "png", "rgb"]
    d = make_year(root, "2007", {i: xml(i, obj("dog", ("10", "5", "30", "25"))) for i in ids}, {"trainval": ids})
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (200, 30, 60)
    Image.fromarray(rgb).convert("L").save(d / "JPEGImages" / "gray.jpg", quality=100)
    Image.fromarray(rgb).convert("CMYK").save(d / "JPEGImages" / "cmyk.jpg", quality=100)
    Image.fromarray(rgb).save(d / "JPEGImages" / "png.jpg", format="PNG")
    Image.fromarray(rgb).save(d / "JPEGImages" / "rgb.jpg", quality=100)
    with Image.open(d / "JPEGImages" / "cmyk.jpg") as im:
        assert im.mode == "CMYK"  # what is tested is what it says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = VOCDetection(root, [("2007", "trainval")], ["dog"])  # the pre-flight check runs here
    assert ds.image_ids == ids
    images = {i: ds.load_image(k) for k, i in enumerate(ds.image_ids)}
    for i, image in images.items():
        assert image.shape == (H, W, 3) and image.dtype == np.uint8, i
    assert np.array_equal(images["png"], rgb)  # lossless
    for i in ("cmyk", "rgb"):  # colour kept (JPEG: within its loss)
        assert np.abs(images[i].astype(int) - rgb).mean() < 6, i
    gray = images["gray"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()  # one channel, repeated


def test_preflight_lists_every_bad_image_or_skips_them(tmp_path: Path) -> None:
    from resist_det.data.shapes import SHAPES_CLASSES, write_shapes_dataset
    from resist_det.data.voc import BadImagesError

    root = write_shapes_dataset(tmp_path, 40, image_size=64, seed=3)
    bad = _break_voc(root / "VOC2007")
    n_train = len((root / "VOC2007/ImageSets/Main/train.txt").read_text().split())
    with pytest.raises(BadImagesError) as err:
        VOCDetection(root, [("2007", "train")], SHAPES_CLASSES)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"5 of {n_train} images of VOC2007 train cannot be used")
    for image_id, reason in list(bad.items())[:5]:
        assert any(image_id in line and reason in line for line in lines[1:]), (image_id, reason, lines)
    assert len(lines) == 6
    ds = VOCDetection(root, [("2007", "train")], SHAPES_CLASSES, skip_bad=True)
    assert len(ds) == n_train - 5 and len(ds.skipped) == 5
    assert not set(ds.image_ids) & set(bad)
    for i in range(len(ds)):  # every image left in decodes
        assert ds.load_image(i).shape == (64, 64, 3)
    with pytest.raises(BadImagesError, match="truncated JPEG"):
        VOCDetection(root, [("2007", "test")], SHAPES_CLASSES)


def test_train_cli_refuses_bad_images_before_starting_ranks_and_skips_them_on_request(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from resist_det.cli import app
    from resist_det.data.shapes import write_shapes_dataset

    root = write_shapes_dataset(tmp_path, 40, image_size=64, seed=3)
    bad = _break_voc(root / "VOC2007")
    sets = ["--set", f"data.root={json.dumps(str(root))}", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
            "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "model.image_size=64",
            "--set", "model.depth=18", "--set", "resist.min_blocks=1", "--set", "data.limit_test=4", "--no-progress"]
    result = CliRunner().invoke(app, ["train", "demo_shapes", "--nproc", "2", *sets])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "6 of the" in result.output and all(i in result.output for i in bad)
    assert not (tmp_path / "run").exists()  # refused before any rank started
    # classes: [] = the names found in the training annotations; the checkpoint records them
    result = CliRunner().invoke(app, ["train", "demo_shapes", "--nproc", "1", "--skip-bad", *sets, "--set", "data.classes=[]"])
    assert result.exit_code == 0, result.output
    assert "leaving out 6 images" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["num_test"] == 4
    saved = torch.load(tmp_path / "run" / "global_model.pt", weights_only=True)
    assert saved["recipe"]["data"]["classes"] == saved["class_names"] == ["circle", "square", "triangle"]
    # evaluation on other data whose classes differ (one renamed) is refused, naming the class
    other = write_shapes_dataset(tmp_path / "other", 12, image_size=64, seed=4)
    ok = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(other), "--out", str(tmp_path / "r.json"),
                                  "--metric", "coco"])
    assert ok.exit_code == 0, ok.output
    coco = json.loads((tmp_path / "r.json").read_text())["metrics"]["coco"]  # COCO AP beside VOC AP
    assert 0.0 <= coco["AP"] <= coco["AP50"] <= 1.0 and "COCO AP@[.5:.95]" in ok.output
    assert set(coco["per_class_ap"]) == {"circle", "square", "triangle"}
    for f in (other / "VOC2007" / "Annotations").glob("*.xml"):
        f.write_text(f.read_text().replace("<name>circle</name>", "<name>disc</name>").replace("<name>square</name>", "<name>box</name>"))
    refused = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(other)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert ("'disc'" in refused.output or "'box'" in refused.output) and "not in the class list" in refused.output


def test_shapes_in_the_coco_layout_read_back_with_pycocotools(tmp_path: Path) -> None:
    """``data shapes --format coco``: pycocotools loads the tree; every VOC box is there in COCO's
    convention (by hand for one), and the ground truth scored as detections is AP 1.0 through
    pycocotools on the files and through resist_det.eval.coco on the VOC side."""
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from typer.testing import CliRunner

    from resist_det.cli import app
    from resist_det.data.shapes import SHAPES_CLASSES
    from resist_det.data.voc_xml import parse_voc_xml
    from resist_det.eval.coco import coco_evaluate

    res = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path), "--images", "20", "--size", "64", "--format", "coco"])
    assert res.exit_code == 0, res.output
    year, coco_dir = tmp_path / "VOCdevkit" / "VOC2007", tmp_path / "coco"
    index = {c: i for i, c in enumerate(SHAPES_CLASSES)}
    for split, voc in (("train2017", "trainval"), ("val2017", "test")):
        gt = COCO(str(coco_dir / "annotations" / f"instances_{split}.json"))
        ids = (year / "ImageSets" / "Main" / f"{voc}.txt").read_text().split()
        assert [gt.imgs[i]["file_name"] for i in sorted(gt.imgs)] == [f"{n}.jpg" for n in ids]
        assert all((coco_dir / split / f"{n}.jpg").is_file() for n in ids)
        records = [parse_voc_xml(year / "Annotations" / f"{n}.xml", index) for n in ids]
        assert len(gt.anns) == sum(len(r.boxes) for r in records)
        first = gt.loadAnns(gt.getAnnIds(imgIds=[1]))[0]
        x0, y0, x1, y1 = records[0].boxes[0].tolist()
        assert first["bbox"] == [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
        assert first["category_id"] == int(records[0].labels[0]) + 1
        dets = [{**a, "score": 1.0} for a in gt.loadAnns(gt.getAnnIds())]
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(dets))), iouType="bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        ours = coco_evaluate([{"boxes": r.boxes, "labels": r.labels, "scores": [1.0] * len(r.boxes)} for r in records],
                             [{"boxes": r.boxes, "labels": r.labels} for r in records], len(SHAPES_CLASSES))
        assert ev.stats[0] == ours.stats["AP"] == 1.0
    bad = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path), "--images", "2", "--format", "yolo"])
    assert bad.exit_code == 1 and "--format: expected 'voc' or 'coco'" in bad.output
