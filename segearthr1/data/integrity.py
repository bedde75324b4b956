"""Detect broken input files before a decoder quietly accepts them.

Why: libjpeg decodes a truncated JPEG to a half-grey image and prints "Premature end of JPEG file"
to stderr, naming no file; OpenCV returns the array and training or evaluation goes on with it. A
cut-short JPEG has no end-of-image marker (FF D9) and a cut-short PNG has no IEND chunk, so a look
at the file's head and tail finds them without decoding. The loaders and `segearthr1 check-data`
call the same functions, so both name the same files for the same reasons.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DatasetCorruptedError, DatasetNotFoundError

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its fixed CRC
TAIL_BYTES = 1024  # the end marker must lie in the last KiB (some writers pad after it)
MIN_IMAGE_SIDE = 32  # smaller images are letterboxed up to 1024 px: almost no information


def check_file_path(path: str | Path, what: str) -> Path:
    """A regular file at `path`, or an error saying what is there instead."""
    path = Path(path)
    if path.is_dir():
        raise DatasetCorruptedError(what=f"{what} {path} is a directory", expected="a file")
    if not path.is_file():
        raise DatasetNotFoundError(what=f"{what} file {path} does not exist", hint="if you passed this path yourself, check it")
    return path


def check_image_bytes(path: str | Path, what: str = "image") -> None:
    """Raise DatasetCorruptedError for an empty file, a JPEG without its end-of-image marker or a PNG
    without its IEND chunk (the signs of a truncated download or copy). Other formats pass."""
    path = check_file_path(path, what)
    size = path.stat().st_size
    if size == 0:
        raise DatasetCorruptedError(what=f"{what} {path} is empty", found="0 bytes")
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    if head.startswith(JPEG_MAGIC) and JPEG_EOI not in tail:
        raise DatasetCorruptedError(what=f"{what} {path} is a truncated or damaged JPEG",
                                    found=f"{size} bytes, no end-of-image marker FF D9 at the end")
    if head.startswith(PNG_MAGIC) and PNG_IEND not in tail:
        raise DatasetCorruptedError(what=f"{what} {path} is a truncated or damaged PNG",
                                    found=f"{size} bytes, no IEND chunk at the end")


def small_image_message(path: str | Path, height: int, width: int) -> str | None:
    """A warning text when the image is below MIN_IMAGE_SIDE on a side, else None."""
    if min(height, width) < MIN_IMAGE_SIDE:
        return (f"image {path} is only {height}x{width} px (below {MIN_IMAGE_SIDE} px on a side); it is used, "
                "but letterboxing it up carries almost no detail")
    return None


def read_json_file(path: str | Path, what: str):
    """Parse a UTF-8 JSON file; DatasetCorruptedError naming the file for a directory, bad bytes or bad JSON."""
    path = check_file_path(path, what)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetCorruptedError(what=f"{what} {path} is not UTF-8 text", found=f"byte {err.start}: {err.reason}",
                                    hint="save it as UTF-8 JSON") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetCorruptedError(what=f"{what} {path} is not valid JSON ({err})") from err
