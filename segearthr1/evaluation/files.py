"""The files an evaluation writes and reads back: prediction PNGs and per_sample.csv.

Why here: the evaluation loop, report.html, `segearthr1 compare` and the quickstart report all read
the same files, so their formats are written down once.
"""
from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("name", "intersection", "union", "iou", "index", "image_name", "question", "gt_pixels",
               "pred_pixels", "orig_intersection", "orig_union", "orig_iou", "orig_gt_pixels", "orig_pred_pixels",
               "answer")
_INT_COLUMNS = ("intersection", "union", "index", "gt_pixels", "pred_pixels", "orig_intersection", "orig_union",
                "orig_gt_pixels", "orig_pred_pixels")
_FLOAT_COLUMNS = ("iou", "orig_iou")


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """Write a binary mask as an 8-bit PNG with values 0/255."""
    if not cv2.imwrite(str(path), (np.asarray(mask) > 0).astype(np.uint8) * 255):
        raise OSError(f"could not write prediction {path}; check that the directory is writable")


def read_mask_png(path: str | Path) -> np.ndarray:
    """Inverse of `write_mask_png`: HxW bool (for re-computing metrics from saved predictions)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"could not read prediction PNG {path}")
    return mask > 127


class MaskWriter:
    """Writes prediction PNGs on background threads (OpenCV releases the GIL), so PNG encoding of
    large original-resolution masks overlaps the next forward pass; errors surface on exit."""

    def __init__(self, threads: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._futures: list = []

    def write(self, path: Path, mask: np.ndarray, max_pending: int = 8) -> None:
        pending = []
        for f in self._futures:
            if f.done():
                f.result()  # re-raises a failed write now rather than at the end
            else:
                pending.append(f)
        if len(pending) >= max_pending:  # bound the memory held by queued large masks
            pending.pop(0).result()
        pending.append(self._pool.submit(write_mask_png, path, mask))
        self._futures = pending

    def __enter__(self) -> "MaskWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
        for f in self._futures:
            f.result()


def clear_stale_predictions(directory: Path) -> None:
    """Remove PNGs of an earlier run so predictions/ holds exactly this run's samples."""
    if not directory.is_dir():
        return
    stale = list(directory.glob("*.png"))
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d prediction PNGs of an earlier run from %s", len(stale), directory)


def write_per_sample_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """per_sample.csv in the given row order; IoU written with full precision (repr); columns a row
    lacks are left empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            values = {k: r.get(k) for k in CSV_COLUMNS}
            values.update({k: repr(float(r[k])) for k in _FLOAT_COLUMNS if r.get(k) is not None})
            writer.writerow({k: "" if v is None else v for k, v in values.items()})


def read_per_sample_csv(path: str | Path) -> list[dict]:
    """Rows of per_sample.csv with numeric columns parsed (empty cells -> None)."""
    def parse(key, value):
        if key in _INT_COLUMNS:
            return int(value) if value not in (None, "") else None
        if key in _FLOAT_COLUMNS:
            return float(value) if value not in (None, "") else None
        return value

    with Path(path).open(newline="", encoding="utf-8") as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]
