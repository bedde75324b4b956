"""Overlay drawing shared by evaluation (`--vis_path`) and inference (`*_overlay.png`)."""
from __future__ import annotations

import textwrap

import cv2
import numpy as np

PRED_COLOR = (255, 64, 64)  # RGB
GT_COLOR = (64, 255, 64)


def _contours(mask: np.ndarray) -> list:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return contours


def draw_overlay(image: np.ndarray, pred_mask: np.ndarray | None, gt_mask: np.ndarray | None = None,
                 caption: str | None = None, tint: float = 0.4, thickness: int | None = None) -> np.ndarray:
    """RGB uint8 [H,W,3] image with the predicted mask tinted red and outlined, the ground truth (if
    given) outlined green, and an optional caption band on top. Masks are [H,W] bool/0-1/0-255 at
    the image's size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 [H,W,3], got {image.dtype} {image.shape}")
    out = image.copy()
    height, width = out.shape[:2]
    thickness = thickness or max(1, round(max(height, width) / 400))
    for name, mask in (("pred_mask", pred_mask), ("gt_mask", gt_mask)):
        if mask is not None and mask.shape[:2] != (height, width):
            raise ValueError(f"{name} shape {mask.shape} does not match the image {image.shape[:2]}")
    if pred_mask is not None:
        pred = pred_mask > 0
        if tint > 0 and pred.any():
            color = np.array(PRED_COLOR, dtype=np.float32)
            out[pred] = ((1 - tint) * out[pred].astype(np.float32) + tint * color).round().astype(np.uint8)
        cv2.drawContours(out, _contours(pred), -1, PRED_COLOR, thickness)
    if gt_mask is not None:
        cv2.drawContours(out, _contours(gt_mask > 0), -1, GT_COLOR, thickness)
    if caption:
        out = _add_caption(out, caption)
    return out


def _add_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """Caption in a white band above the image, wrapped to the image width."""
    width = image.shape[1]
    scale = max(0.4, min(1.0, width / 1000))
    char_w = max(1, int(cv2.getTextSize("M", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]))
    lines = textwrap.wrap(caption, width=max(10, width // char_w)) or [""]
    line_h = int(30 * scale) + 4
    band = np.full((line_h * len(lines) + 6, width, 3), 255, dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, line, (4, line_h * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def save_rgb_png(path, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG (OpenCV wants BGR)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
