"""Letterbox preprocessing (DESIGN.md §2.1) and its inverse for predictions.

Byte-exact with the reference (`tests/fixtures/reference/preprocess.pt`): OpenCV bilinear resize of
uint8 images and nearest resize of masks so that the longer side becomes `size` (the shorter side is
truncated with int()), zero padding split top/bottom and left/right with the extra pixel at the
bottom/right, normalisation after padding. The geometry is kept so predictions can be mapped back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, on the 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class LetterboxGeometry:
    """Where an orig_h x orig_w image sits inside the size x size letterboxed canvas."""

    orig_h: int
    orig_w: int
    new_h: int
    new_w: int
    top: int
    bottom: int
    left: int
    right: int
    size: int

    @classmethod
    def compute(cls, orig_h: int, orig_w: int, size: int) -> "LetterboxGeometry":
        if int(orig_h) < 1 or int(orig_w) < 1:
            raise ValueError(f"image size {orig_h}x{orig_w} is empty; expected at least 1x1 pixels")
        if int(size) < 1:
            raise ValueError(f"letterbox size={size} must be a positive integer (default 1024)")
        h, w, s = int(orig_h), int(orig_w), int(size)
        if w > h:
            new_w, new_h = s, int(h * (s / w))
        else:  # square images take this branch too (reference)
            new_h, new_w = s, int(w * (s / h))
        # int() may give 0 for extreme aspect ratios where the reference would crash; keep 1 pixel.
        new_h, new_w = max(new_h, 1), max(new_w, 1)
        pad_h, pad_w = s - new_h, s - new_w
        top, left = pad_h // 2, pad_w // 2
        return cls(h, w, new_h, new_w, top, pad_h - top, left, pad_w - left, s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LetterboxGeometry":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"letterbox geometry dict lacks {missing}; expected keys {names}")
        return cls(**{n: int(d[n]) for n in names})


def _as_geometry(geometry) -> LetterboxGeometry:
    return geometry if isinstance(geometry, LetterboxGeometry) else LetterboxGeometry.from_dict(geometry)


def letterbox_image(image: np.ndarray, size: int = 1024,
                    orig_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, LetterboxGeometry]:
    """HxWxC uint8 (RGB) -> ([C, size, size] uint8 tensor, geometry); bilinear, zero padding.

    `orig_hw`: the full size when `image` is a reduced-resolution decode of it (fast_decode.py); the
    geometry is then that of the full image. Default: the image's own size.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"letterbox_image expects an HxWxC uint8 numpy array, got {desc}")
    geo = LetterboxGeometry.compute(*(orig_hw if orig_hw is not None else image.shape[:2]), size)
    resized = cv2.resize(np.ascontiguousarray(image), (geo.new_w, geo.new_h), interpolation=cv2.INTER_LINEAR)
    resized = resized.reshape(geo.new_h, geo.new_w, image.shape[2])  # cv2 drops a single channel axis
    canvas = np.zeros((geo.size, geo.size, image.shape[2]), dtype=np.uint8)
    canvas[geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w] = resized
    return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))), geo


def letterbox_mask(mask: np.ndarray, size: int = 1024) -> tuple[torch.Tensor, LetterboxGeometry]:
    """HxW uint8 (or bool) mask -> ([1, size, size] uint8 tensor, geometry); nearest, zero padding."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        desc = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"letterbox_mask expects an HxW numpy array, got {desc}")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        raise ValueError(f"letterbox_mask expects a uint8 or bool mask, got {mask.dtype}; cast it first")
    geo = LetterboxGeometry.compute(mask.shape[0], mask.shape[1], size)
    resized = cv2.resize(np.ascontiguousarray(mask), (geo.new_w, geo.new_h), interpolation=cv2.INTER_NEAREST)
    canvas = np.zeros((1, geo.size, geo.size), dtype=np.uint8)
    canvas[0, geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w] = resized
    return torch.from_numpy(canvas), geo


_MEAN = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)


def normalize_image(image_chw: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel in float32; leading batch dimensions are allowed."""
    if image_chw.dim() < 3 or image_chw.shape[-3] != 3:
        raise ValueError(f"normalize_image expects [..., 3, H, W], got shape {tuple(image_chw.shape)}")
    return (image_chw.to(torch.float32) - _MEAN) / _STD


def denormalize_images(images: torch.Tensor) -> np.ndarray:
    """Inverse of `normalize_image` for a batch: [B,3,S,S] float -> [B,S,S,3] RGB uint8 (the letterboxed
    input as the model saw it; for overlays)."""
    rgb = (images.detach().float().cpu() * _STD + _MEAN).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def crop_letterbox(x: torch.Tensor, geometry) -> torch.Tensor:
    """[..., S, S] -> [..., new_h, new_w]: drop the padding band (no resizing)."""
    geo = _as_geometry(geometry)
    if x.shape[-2:] != (geo.size, geo.size):
        raise ValueError(f"expected a [..., {geo.size}, {geo.size}] tensor for this letterbox geometry, "
                         f"got shape {tuple(x.shape)}")
    return x[..., geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w]


def unletterbox_logits(logits: torch.Tensor, geometry) -> torch.Tensor:
    """[..., S, S] logits -> [..., orig_h, orig_w]: crop the padding, bilinear (align_corners=False).

    Thresholding is left to the caller (the reference uses logits > 0).
    """
    if not torch.is_floating_point(logits):
        raise ValueError(f"unletterbox_logits needs floating-point logits, got {logits.dtype}; "
                         f"threshold after mapping back, not before")
    geo = _as_geometry(geometry)
    cropped = crop_letterbox(logits, geo)
    lead = cropped.shape[:-2]
    flat = cropped.reshape(-1, 1, geo.new_h, geo.new_w)
    out = F.interpolate(flat, size=(geo.orig_h, geo.orig_w), mode="bilinear", align_corners=False)
    return out.reshape(*lead, geo.orig_h, geo.orig_w)
