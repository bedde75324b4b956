#!/usr/bin/env python3
"""Copy an EarthReason split with its images upscaled to large JPEGs (for --fast_decode measurements).

Why: EarthReason's real images reach 7617² px, generated ones are small; upscaling a generated (or
real) split gives the data path realistic decode costs while the labels stay aligned (nearest
upscale) and the QA files are copied unchanged.

    python tools/make_large_jpegs.py --src DATA_ROOT --out BIG_ROOT --split val --min_size 4000 --max_size 7600

The longer side of each image is drawn uniformly from [min_size, max_size] (seeded), the aspect ratio
is kept; images are bilinear-upscaled (plus optional Gaussian grain, --noise) and written as JPEG
(--quality), labels nearest-upscaled as PNG.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

SPLIT_DIR = Path("rs_reason_seg") / "RSReasonSeg"


def upscale_split(src_root: Path, out_root: Path, split: str, min_size: int, max_size: int, limit: int | None = None,
                  quality: int = 90, seed: int = 0, noise: float = 0.0) -> int:
    """Write the upscaled copy; returns the number of images written."""
    src = src_root / SPLIT_DIR / split
    if not (src / "images").is_dir():
        raise SystemExit(f"{src / 'images'} does not exist; --src must be a DATA_ROOT holding {SPLIT_DIR}/{split}/")
    out = out_root / SPLIT_DIR / split
    for sub in ("images", "labels", "QAs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    images = sorted(p for p in (src / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    rng = np.random.default_rng(seed)
    for path in tqdm(images, desc=f"upscaling {split}"):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        label = cv2.imread(str(src / "labels" / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
        if image is None or label is None:
            raise SystemExit(f"cannot read {path} or its label in {src / 'labels'}")
        longer = int(rng.integers(min_size, max_size + 1))
        h, w = image.shape[:2]
        scale = longer / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        big = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        if noise > 0:  # texture like real imagery, so JPEG entropy decoding costs what it does there
            grain = rng.normal(0.0, noise, big.shape[:2] + (1,)).astype(np.float32)
            big = np.clip(big.astype(np.float32) + grain, 0, 255).astype(np.uint8)
        if not cv2.imwrite(str(out / "images" / f"{path.stem}.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise SystemExit(f"could not write {out / 'images'}")
        cv2.imwrite(str(out / "labels" / f"{path.stem}.png"), cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))
        for qa in (src / "QAs").glob(f"{path.stem}.*"):
            shutil.copy(qa, out / "QAs" / qa.name)
    return len(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="DATA_ROOT with rs_reason_seg/RSReasonSeg/<split>/")
    p.add_argument("--out", required=True, type=Path, help="DATA_ROOT to write the upscaled split to")
    p.add_argument("--split", default="val", help="split to copy (default val)")
    p.add_argument("--min_size", type=int, default=4000, help="smallest longer side in px (default 4000)")
    p.add_argument("--max_size", type=int, default=7600, help="largest longer side in px (default 7600)")
    p.add_argument("--limit", type=int, default=None, help="copy only the first N images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the size draws and the grain (default 0)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian grain added to the upscaled images (default 0: none)")
    args = p.parse_args(argv)
    if not 1 <= args.min_size <= args.max_size:
        p.error(f"need 1 <= --min_size <= --max_size, got {args.min_size}, {args.max_size}")
    n = upscale_split(args.src, args.out, args.split, args.min_size, args.max_size, args.limit, args.quality,
                      args.seed, args.noise)
    print(f"wrote {n} upscaled images to {args.out / SPLIT_DIR / args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
