"""Checks that run before any rank starts: the dataset folder exists and (VOC) every image and
annotation can be used.

Importable without torch, so ``resist-det train`` refuses bad data at once and starts its
launcher without paying for a torch import it does not need.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe

__all__ = ["check_data", "preflight", "voc_classes"]


def check_data(recipe: Recipe) -> None:
    """Fail early (before ranks start) when the dataset folder is missing."""
    root = Path(recipe.data.root)
    if not root.exists():
        raise FileNotFoundError(
            f"data.root: dataset folder not found: {root} (datasets are never downloaded; "
            f"put the {recipe.data.kind} data there or change data.root)"
        )


def voc_classes(recipe: Recipe) -> list[str]:
    """The recipe's class names: its list, the 20 VOC classes, or ([]) those in the training annotations."""
    from ..data.voc_index import VOC_CLASSES, collect_classes

    d = recipe.data
    if d.classes == []:
        return list(collect_classes(d.root, d.train_sets))
    return list(d.classes) if d.classes else list(VOC_CLASSES)


def preflight(recipe: Recipe) -> list[str]:
    """Check every training and test image before any rank starts (VOC; other kinds are read
    whole when built).  Raises :class:`~resist_det.data.voc_index.BadImagesError` listing every bad
    image, or with ``data.skip_bad`` returns those problems (the ranks leave the images out)."""
    check_data(recipe)
    if recipe.data.kind != "voc":
        return []
    from ..data.voc_index import BadImagesError, index_image_sets

    d = recipe.data
    class_to_index = {c: i for i, c in enumerate(voc_classes(recipe))}
    problems, listed = [], 0
    for role, sets in (("training", d.train_sets), ("test", d.test_sets)):
        index = index_image_sets(d.root, sets, class_to_index, skip_bad=True)
        listed += len(index.records) + len(index.skipped)
        problems += [f"{role}: {p}" for p in index.skipped]
    if problems and not d.skip_bad:
        raise BadImagesError(f"{len(problems)} of the {listed} training and test images cannot be used; set data.skip_bad "
                             f"(resist-det train --skip-bad) to leave them out:\n  " + "\n  ".join(problems))
    return problems
