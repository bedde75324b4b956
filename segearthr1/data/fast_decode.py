"""Opt-in fast JPEG decoding for images much larger than the model input (evaluation `--fast_decode`).

Why: EarthReason holds JPEGs up to 7617² px that are letterboxed to 1024²; decoding every pixel and
then throwing 98 % of them away dominates evaluation time. libjpeg can decode at 1/2, 1/4 or 1/8
scale almost for free (it skips most of the inverse DCT), so we decode at the *smallest* of those
scales whose longer side is still ≥ the letterbox size S, then do the usual bilinear letterbox
resize (with the geometry of the full-size image, so masks, padding and original-resolution
mapping are unchanged).

Not byte-identical to the reference: the reduced decode averages pixels in the DCT domain before
the bilinear resize, so model inputs differ slightly (the README reports the effect on gIoU).
Everything that is not a large JPEG is read by `read_image_rgb` as usual.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np

from ..errors import DatasetCorruptedError
from .image_io import read_image_rgb

logger = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the JPEG header without decoding; None if the header is unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
        return int(height), int(width)
    except (OSError, ValueError, ImportError):
        return None


def reduction_for(height: int, width: int, size: int) -> int:
    """Largest libjpeg scale denominator (8, 4, 2) whose decode keeps the longer side ≥ `size`; 1 if none."""
    longer = max(height, width)
    for scale, _ in REDUCED_FLAGS:
        if math.ceil(longer / scale) >= size:
            return scale
    return 1


def read_image_for_letterbox(path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 image, full (H, W)): a reduced decode of a large JPEG, else the normal full decode.

    The caller letterboxes the returned image with the geometry of the full (H, W).
    """
    path = Path(path)
    header = jpeg_size(path) if path.suffix.lower() in JPEG_SUFFIXES and path.is_file() else None
    scale = reduction_for(*header, size) if header else 1
    if scale == 1:
        image = read_image_rgb(path)
        return image, (int(image.shape[0]), int(image.shape[1]))
    flag = dict(REDUCED_FLAGS)[scale]
    bgr = cv2.imread(str(path), flag)
    if bgr is None:
        raise DatasetCorruptedError(what=f"cannot decode the image with OpenCV (reduced 1/{scale} decode)",
                                    where=path, hint="the file is damaged or not a JPEG")
    h, w = header
    expected = (math.ceil(h / scale), math.ceil(w / scale))
    if bgr.shape[:2] == expected:
        full = (h, w)
    elif bgr.shape[:2] == expected[::-1]:  # OpenCV applied an EXIF rotation the header size does not show
        full = (w, h)
    else:
        logger.debug("reduced decode of %s gave %s, expected %s; decoding at full size", path, bgr.shape, expected)
        image = read_image_rgb(path)
        return image, (int(image.shape[0]), int(image.shape[1]))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), full
