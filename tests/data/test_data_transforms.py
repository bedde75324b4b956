"""Letterbox preprocessing against preprocess.pt (byte-exact) and the inverse mapping."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import torch
from conftest import load_reference

from segearthr1.data.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    LetterboxGeometry,
    crop_letterbox,
    letterbox_image,
    letterbox_mask,
    normalize_image,
    unletterbox_logits,
)

PRE = load_reference("preprocess.pt")
CASES = [(i, s) for i in range(len(PRE["cases"])) for s in ("256", "1024")]


def _inputs(case):
    image = cv2.cvtColor(cv2.imdecode(case["image_png"].numpy(), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    mask = cv2.imdecode(case["mask_png"].numpy(), cv2.IMREAD_UNCHANGED)
    assert hashlib.sha256(image.tobytes()).hexdigest() == case["image_sha256"]
    assert hashlib.sha256(mask.tobytes()).hexdigest() == case["mask_sha256"]
    return image, mask


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case_idx,size", CASES)
def test_letterbox_matches_reference(case_idx, size):
    case = PRE["cases"][case_idx]
    out = case["out"][size]
    image, mask = _inputs(case)
    img_t, geo = letterbox_image(image, int(size))
    mask_t, geo_m = letterbox_mask(mask, int(size))
    assert img_t.dtype == torch.uint8 and img_t.shape == (3, int(size), int(size))
    assert mask_t.dtype == torch.uint8 and mask_t.shape == (1, int(size), int(size))
    assert _sha(img_t) == out["image_chw_sha256"]
    assert _sha(mask_t) == out["mask_sha256"]
    if size == "256":
        assert torch.equal(img_t, out["image_chw"]) and torch.equal(mask_t, out["mask"])
    else:
        ref_img = cv2.imdecode(out["image_png"].numpy(), cv2.IMREAD_UNCHANGED)
        assert torch.equal(img_t, torch.from_numpy(cv2.cvtColor(ref_img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)))
    assert geo == geo_m
    assert {k: getattr(geo, k) for k in out["geometry"]} == out["geometry"]
    assert (geo.orig_h, geo.orig_w, geo.size) == (*case["hw"], int(size))


def test_normalised_example_and_constants():
    ex = PRE["normalised_example"]
    case = next(c for c in PRE["cases"] if c["hw"] == ex["hw"])
    image, _ = _inputs(case)
    img_t, _ = letterbox_image(image, ex["image_size"])
    torch.testing.assert_close(normalize_image(img_t), ex["normalised"], atol=0, rtol=0)
    assert torch.equal(torch.tensor(PIXEL_MEAN).view(3, 1, 1), PRE["pixel_mean"])
    assert torch.equal(torch.tensor(PIXEL_STD).view(3, 1, 1), PRE["pixel_std"])


@pytest.mark.parametrize("hw,size,expected", [
    ((3, 5), 10, (6, 10, 2, 2, 0, 0)),        # landscape: new_h = int(3*10/5) = 6
    ((5, 3), 10, (10, 6, 0, 0, 2, 2)),        # portrait
    ((7, 7), 10, (10, 10, 0, 0, 0, 0)),       # square uses the h-branch
    ((123, 457), 1024, (275, 1024, 374, 375, 0, 0)),  # truncation 275.6 -> 275, odd padding
    ((1, 3000), 16, (1, 16, 7, 8, 0, 0)),     # int() would give 0 rows: kept at 1
])
def test_geometry(hw, size, expected):
    geo = LetterboxGeometry.compute(*hw, size)
    assert (geo.new_h, geo.new_w, geo.top, geo.bottom, geo.left, geo.right) == expected
    assert LetterboxGeometry.from_dict(geo.to_dict()) == geo


def test_unletterbox_landscape_exact():
    """3x5 image at S=10: band rows 2..7; downscale by exactly 2 = mean of 2x2 blocks."""
    geo = LetterboxGeometry.compute(3, 5, 10)
    logits = torch.full((2, 1, 10, 10), 1000.0)  # padding value must not leak
    content = torch.arange(60, dtype=torch.float32).view(6, 10)
    logits[:, :, 2:8, :] = content
    out = unletterbox_logits(logits, geo)
    assert out.shape == (2, 1, 3, 5)
    expected = content.view(3, 2, 5, 2).mean(dim=(1, 3))
    torch.testing.assert_close(out[0, 0], expected, atol=0, rtol=0)
    torch.testing.assert_close(out[1, 0], expected, atol=0, rtol=0)


def test_unletterbox_portrait_identity_and_odd_padding():
    """7x3 image at S=7: no resize (new = orig), left pad 2, right pad 2; crop must be exact."""
    geo = LetterboxGeometry.compute(7, 3, 7)
    assert (geo.new_h, geo.new_w, geo.left, geo.right) == (7, 3, 2, 2)
    logits = torch.randn(7, 7)
    torch.testing.assert_close(unletterbox_logits(logits, geo), logits[:, 2:5], atol=0, rtol=0)
    geo_odd = LetterboxGeometry.compute(4, 3, 8)  # new 8x6, pad_w=2 -> left 1, right 1
    x = torch.randn(1, 8, 8)
    assert torch.equal(crop_letterbox(x, geo_odd), x[:, :, 1:7])


def test_unletterbox_upsamples_bilinear():
    geo = LetterboxGeometry.compute(20, 10, 8)  # new 8x4 -> back to 20x10
    logits = torch.randn(8, 8)
    out = unletterbox_logits(logits, geo.to_dict())
    ref = torch.nn.functional.interpolate(logits[None, None, :, 2:6], size=(20, 10), mode="bilinear",
                                          align_corners=False)[0, 0]
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_roundtrip_mask_through_letterbox():
    mask = np.zeros((30, 50), np.uint8)
    mask[5:20, 10:30] = 1
    m, geo = letterbox_mask(mask, 100)  # exact 2x upscale, nearest
    back = unletterbox_logits(m.float() * 2 - 1, geo)[0] > 0
    assert torch.equal(back, torch.from_numpy(mask.astype(bool)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="HxWxC uint8"):
        letterbox_image(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(ValueError, match="HxWxC uint8"):
        letterbox_image(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match="uint8 or bool"):
        letterbox_mask(np.zeros((4, 4), np.int32), 8)
    with pytest.raises(ValueError, match="size"):
        LetterboxGeometry.compute(4, 4, 0)
    geo = LetterboxGeometry.compute(4, 4, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 8\]"):
        unletterbox_logits(torch.zeros(1, 9, 9), geo)
    with pytest.raises(ValueError, match="floating-point"):
        unletterbox_logits(torch.zeros(8, 8, dtype=torch.uint8), geo)
    with pytest.raises(ValueError, match="lacks"):
        LetterboxGeometry.from_dict({"orig_h": 1})
    assert letterbox_mask(np.ones((4, 4), bool), 8)[0].sum() == 64
