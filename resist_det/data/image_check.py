"""Cheap checks of an image file that catch what would otherwise fail mid-epoch.

A full decode of every image before training costs minutes on a VOC-sized set; these checks
read the header (format and size) and the last bytes only: a JPEG cut short by an interrupted
copy or download lacks the end-of-image marker ``FF D9`` that every complete JPEG ends with
(JPEG standard, ITU T.81 B.2.1; encoders may pad after it with zero or whitespace bytes).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

__all__ = ["image_problem"]

_EOI = b"\xff\xd9"


def image_problem(path: Path, expected_size: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` cannot be trained on, or ``None``.

    Args:
        path: the image file.
        expected_size: ``(width, height)`` its annotation states; a different size is a problem
            (the boxes were drawn on another image).
    """
    if not path.is_file():
        return f"image missing: {path}"
    try:
        with Image.open(path) as im:  # parses the header only
            fmt, size = im.format, im.size
    except Image.DecompressionBombError as exc:  # a header claiming billions of pixels: decoding it would exhaust memory
        return f"{path}: too large to decode ({exc})"
    except (OSError, SyntaxError) as exc:
        return f"{path}: not a readable image ({exc})"
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            tail = f.read().rstrip(b"\x00 \t\r\n")
        if not tail.endswith(_EOI):
            return f"{path}: truncated JPEG (no end-of-image marker)"
    if expected_size is not None and tuple(size) != tuple(expected_size):
        return (f"{path}: the image is {size[0]}x{size[1]} but its annotation says "
                f"{expected_size[0]}x{expected_size[1]}")
    return None
