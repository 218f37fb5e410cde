#!/usr/bin/env python
"""Pre-flight data check on a VOC-layout set of 5,000 images with one bad image of each kind.

    python benchmarks/bench_preflight.py [--images 5000] [--image-size 128] [--record FILE]

Writes a synthetic VOCdevkit (``resist-det data shapes``), damages six images (a malformed
XML, a truncated JPEG in train and in test, an inverted box, a missing JPEG, an XML size that
disagrees with the image), then times ``resist-det train`` from the command line until it
refuses to start (end to end: interpreter, imports, recipe, the check of every image) and the
check alone, and counts the images it lists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resist_det.config import load_recipe
from resist_det.data.shapes import write_shapes_dataset
from resist_det.data.voc import BadImagesError
from resist_det.train.launch import recipe_path
from resist_det.train.preflight import preflight
from resist_det.record import host_line, write_record


def damage(d: Path) -> list[str]:
    """One bad image of each kind; returns their ids."""
    train = (d / "ImageSets/Main/train.txt").read_text().split()
    test = (d / "ImageSets/Main/test.txt").read_text().split()
    (d / "Annotations" / f"{train[0]}.xml").write_text("<annotation><object>")
    for i in (train[1], test[0]):
        data = (d / "JPEGImages" / f"{i}.jpg").read_bytes()
        (d / "JPEGImages" / f"{i}.jpg").write_bytes(data[: len(data) // 2])
    xml = d / "Annotations" / f"{train[2]}.xml"
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>9999", 1))
    (d / "JPEGImages" / f"{train[3]}.jpg").unlink()
    xml = d / "Annotations" / f"{train[4]}.xml"
    xml.write_text(xml.read_text().replace("<width>", "<width>1", 1))
    return [*train[:5], test[0]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args()
    host = host_line()  # the machine, before the run loads it
    print(host, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_shapes_dataset(tmp, args.images, image_size=args.image_size, seed=0)
        made = time.perf_counter() - t0
        bad = damage(root / "VOC2007")
        sets = ["--set", f"data.root={json.dumps(str(root))}", "--set", f"train.output_dir={json.dumps(tmp + '/run')}"]
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "resist_det.cli", "train", "demo_shapes", "--nproc", "2", *sets],
                             capture_output=True, text=True)
        end_to_end = time.perf_counter() - t0
        recipe = load_recipe(recipe_path("demo_shapes"), {"data.root": str(root)})
        t0 = time.perf_counter()
        try:
            preflight(recipe)
            listed = []
        except BadImagesError as e:
            listed = str(e).splitlines()[1:]
        alone = time.perf_counter() - t0
        n_train = len((root / "VOC2007/ImageSets/Main/train.txt").read_text().split())
        n_test = len((root / "VOC2007/ImageSets/Main/test.txt").read_text().split())
    named = sum(any(i in line for line in cli.stderr.splitlines() + cli.stdout.splitlines()) for i in bad)
    lines = [
        f"{args.images} synthetic VOC images ({n_train} train, {n_test} test, {args.image_size} px JPEGs; written in {made:.1f} s), "
        f"{len(bad)} damaged",
        f"resist-det train (2 ranks requested): exit code {cli.returncode} after {end_to_end:.2f} s, names {named} of the "
        f"{len(bad)} bad images",
        f"the check alone (training and test sets): {alone:.2f} s, {len(listed)} images listed",
        f"{'PASS' if cli.returncode != 0 and end_to_end < 10 and named == len(bad) == len(listed) else 'FAIL'}  "
        f"refused in under 10 s, listing every bad image",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_record(args.record, text, host=host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
