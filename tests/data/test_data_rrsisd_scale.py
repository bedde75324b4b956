"""RRSIS-D start-up on 5,000 refs: seconds, and no mask decoded before it is asked for."""
from __future__ import annotations

import json
import pickle
import time

import cv2
import numpy as np
import pytest
from conftest import REFERENCE
from transformers import AutoTokenizer

from segearthr1.data import refer_index
from segearthr1.data.rrsisd import RRSISDDataset

N_TRAIN_IMAGES, N_IMAGES, REFS_PER_IMAGE, SIZE = 1000, 1100, 5, 32


@pytest.fixture(scope="module")
def big_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rrsisd_big")
    base = root / "rs_ref_seg" / "RRSIS-D"
    img_dir = base / "images" / "rrsisd" / "JPEGImages"
    img_dir.mkdir(parents=True)
    (base / "rrsisd").mkdir()
    ok, buf = cv2.imencode(".jpg", np.full((SIZE, SIZE, 3), 90, np.uint8))
    jpeg = buf.tobytes()
    images, anns, refs = [], [], []
    for i in range(1, N_IMAGES + 1):
        name = f"{i:05d}.jpg"
        (img_dir / name).write_bytes(jpeg)
        images.append({"id": i, "file_name": name, "height": SIZE, "width": SIZE})
        for k in range(REFS_PER_IMAGE):
            ann_id = len(anns) + 1
            x = 2 + 5 * k
            polygon = [float(v) for v in (x, 2, x + 4, 2, x + 4, 20, x + 2, 25, x, 20)]
            anns.append({"id": ann_id, "image_id": i, "category_id": 1, "segmentation": [polygon],
                         "iscrowd": 0, "area": 80.0, "bbox": [x, 2, 4, 23]})
            refs.append({"ref_id": ann_id, "image_id": i, "ann_id": ann_id,
                         "split": "train" if i <= N_TRAIN_IMAGES else "val",
                         "sentences": [{"raw": f"the bar number {k}", "sent": f"the bar number {k}"}]})
    (base / "rrsisd" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with open(base / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root


def test_five_thousand_refs_start_fast_and_lazily(big_root, monkeypatch):
    tok = AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizer_tiny_trained"), use_fast=True)
    calls = []
    real = refer_index.decode_segmentation
    monkeypatch.setattr(refer_index, "decode_segmentation", lambda *a, **k: calls.append(1) or real(*a, **k))
    start = time.perf_counter()
    ds = RRSISDDataset(big_root, "train", tok, image_size=SIZE)
    elapsed = time.perf_counter() - start
    assert len(ds) == 5000 and len(ds.index.segmentations) == 5000
    assert elapsed < 5.0, f"RRSIS-D start-up took {elapsed:.2f}s for 5,000 refs"
    assert len(calls) == 1  # only the start-up check of sample 0
    s = ds[4999]
    assert s["masks"].sum() > 0 and s["question"] == "the bar number 4"
    assert len(calls) == 2
    val = RRSISDDataset(big_root, "val", tok, image_size=SIZE)
    assert len(val) == 500 and set(val.index.images) == set(range(N_TRAIN_IMAGES + 1, N_IMAGES + 1))
