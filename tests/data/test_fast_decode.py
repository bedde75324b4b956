"""--fast_decode: reduced JPEG decode keeps geometry, masks and original sizes; images stay close."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_utils import tiny_model, trained_tokenizer
from segearthr1 import evaluate as ev
from segearthr1.data.earthreason import EarthReasonDataset
from segearthr1.data.fast_decode import read_image_for_letterbox, reduction_for
from segearthr1.data.synthetic import generate
from segearthr1.weights.pretrained import save_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from make_large_jpegs import upscale_split  # noqa: E402


@pytest.mark.parametrize("hw, size, expected", [((7617, 5000), 1024, 4), ((4000, 4000), 1024, 2),
                                               ((2000, 1500), 1024, 1), ((8192, 100), 1024, 8),
                                               ((1100, 900), 64, 8)])
def test_reduction_is_the_smallest_decode_still_at_least_the_letterbox(hw, size, expected):
    assert reduction_for(*hw, size) == expected


def test_reader_returns_reduced_pixels_and_the_full_size(tmp_path):
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (1601, 1203))
    cv2.imwrite(str(tmp_path / "big.jpg"), image)
    cv2.imwrite(str(tmp_path / "big.png"), image)
    reduced, full = read_image_for_letterbox(tmp_path / "big.jpg", 128)  # 1/8: 201 x 151 >= 128
    assert full == (1203, 1601) and reduced.shape == (151, 201, 3) and reduced.dtype == np.uint8
    png, full_png = read_image_for_letterbox(tmp_path / "big.png", 128)  # not a JPEG: full decode
    assert full_png == (1203, 1601) and png.shape == (1203, 1601, 3)


@pytest.fixture(scope="module")
def big_root(tmp_path_factory):
    small = tmp_path_factory.mktemp("small")
    generate(small, datasets=("EarthReason",), n_train=0, n_val=3, n_test=0, seed=4, min_size=48, max_size=64,
             absent_fraction=0.0)
    big = tmp_path_factory.mktemp("big")
    assert upscale_split(small, big, "val", 900, 1300, seed=1) == 3
    return big


def test_fast_decode_samples_match_full_decode_geometry(big_root):
    full = EarthReasonDataset(big_root, "val", None, image_size=64)
    fast = EarthReasonDataset(big_root, "val", None, image_size=64)
    fast.fast_decode = True
    for i in range(len(full)):
        a, b = full[i], fast[i]
        assert a["orig_size"] == b["orig_size"] and max(a["orig_size"]) >= 900
        assert a["letterbox"] == b["letterbox"]
        assert torch.equal(a["masks"], b["masks"])  # masks never go through the fast path
        diff = (a["images"] - b["images"]).abs().mean().item()
        assert 0 < diff < 0.05, diff  # not byte-identical, but close (normalised units)


def test_cli_fast_decode_is_recorded_and_scores_close(big_root, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(tiny_model(seed=1).eval(), trained_tokenizer(), ckpt)
    results = {}
    for flag in ([], ["--fast_decode"]):
        out = tmp_path / ("fast" if flag else "full")
        assert ev.main(["--model_path", str(ckpt), "--data_path", str(big_root), "--dataset_type", "EarthReason",
                        "--output_dir", str(out), "--num_workers", "0", "--device", "cpu", "--no-report",
                        "--bootstrap_resamples", "0", *flag]) == 0
        results[bool(flag)] = json.loads((out / "metrics.json").read_text())
    assert results[True]["fast_decode"] and not results[False]["fast_decode"]
    assert results[True]["num_samples"] == results[False]["num_samples"] == 3
    assert abs(results[True]["giou"] - results[False]["giou"]) < 0.1
    assert results[True]["samples_per_second"] > 0 and "ci95" not in results[True]["letterboxed"]
