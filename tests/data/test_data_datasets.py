"""The three datasets loaded from generated data in their real layouts, and the collator on them."""
from __future__ import annotations

import json
import logging
import pickle

import cv2
import numpy as np
import pytest
import torch
from conftest import REFERENCE, load_reference
from transformers import AutoTokenizer

from segearthr1.data.collate import DataCollator
from segearthr1.data.earthreason import EarthReasonDataset
from segearthr1.data.refer_index import decode_segmentation
from segearthr1.data.refsegrs import RefSegRSDataset
from segearthr1.data.registry import DATASETS, build_dataset, default_data_root
from segearthr1.data.rrsisd import RRSISDDataset
from segearthr1.data.synthetic import generate, uncompressed_rle
from segearthr1.data.transforms import LetterboxGeometry, letterbox_mask
from segearthr1.data.registry import encode_sample_text
from segearthr1.processing import NO_TARGET_ANSWER

PROMPTS = load_reference("prompts.pt")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizer_tiny_trained"), use_fast=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=6, n_val=3, n_test=2, seed=1, min_size=32, max_size=64, absent_fraction=0.3)
    return root


def _check_sample(s: dict, size: int, dataset_type: str):
    assert s["images"].shape == (3, size, size) and s["images"].dtype == torch.float32
    assert s["masks"].shape == (1, size, size) and s["masks"].dtype == torch.uint8
    assert set(s["masks"].unique().tolist()) <= {0, 1}
    for k in ("input_ids", "labels", "token_refer_id", "refer_embedding_indices"):
        assert s[k].dtype == torch.long and s[k].dim() == 1
    assert s["input_ids"].shape == s["labels"].shape == s["refer_embedding_indices"].shape
    assert s["dataset_type"] == dataset_type
    assert s["token_refer_id"][-1].item() == 999
    h, w = s["orig_size"]
    geo = LetterboxGeometry.from_dict(s["letterbox"])
    assert geo == LetterboxGeometry.compute(h, w, size)
    assert isinstance(s["image_name"], str) and isinstance(s["question"], str) and s["image_path"]
    # the padding band of the normalised image is exactly -mean/std
    if geo.top > 0:
        torch.testing.assert_close(s["images"][:, 0, 0], torch.tensor([-123.675 / 58.395, -116.28 / 57.12,
                                                                      -103.53 / 57.375]))


# --- EarthReason -------------------------------------------------------------------------------------------
def test_earthreason_first(root, tok):
    ds = EarthReasonDataset(root, "train", tok, image_size=64)
    assert len(ds) == 6 and ds.root == root / "rs_reason_seg" / "RSReasonSeg" / "train"
    for i in range(len(ds)):
        s = ds[i]
        _check_sample(s, 64, "reason_seg")
        qa = json.loads((ds.root / "QAs" / f"{s['image_name']}.json").read_text())
        assert s["question"] == qa["questions"][0]
        expected = encode_sample_text(tok, "EarthReason", qa["questions"][0],
                                      qa["answer"][0] if qa["answer"] else None, True)
        assert torch.equal(s["token_answer_id"], expected["token_answer_id"])
        assert torch.equal(s["token_refer_id"], expected["token_refer_id"])
        assert torch.equal(s["input_ids"], PROMPTS["examples"]["EarthReason/train"]["input_ids"])
        label = cv2.imread(str(ds.root / "labels" / f"{s['image_name']}.png"), cv2.IMREAD_GRAYSCALE)
        if qa["answer"]:
            assert torch.equal(s["masks"], letterbox_mask((label > 0).astype(np.uint8), 64)[0])
            assert s["masks"].sum() > 0
        else:
            assert s["masks"].sum() == 0


def test_earthreason_absent_target_gets_fixed_answer(root, tok):
    ds = EarthReasonDataset(root, "train", tok, image_size=48)
    empty = [s for s in (ds[i] for i in range(len(ds))) if s["masks"].sum() == 0]
    assert empty, "the fixture should hold at least one absent-target sample"
    fixed = encode_sample_text(tok, "EarthReason", "q", NO_TARGET_ANSWER)["token_answer_id"]
    assert all(torch.equal(s["token_answer_id"], fixed) for s in empty)


def test_earthreason_question_sampling(root, tok):
    first = EarthReasonDataset(root, "val", tok, image_size=40)
    every = EarthReasonDataset(root, "val", tok, image_size=40, question_sampling="all", train=False)
    qas = {p.stem: json.loads(p.read_text()) for p in (first.root / "QAs").glob("*.json")}
    assert len(every) == sum(len(q["questions"]) for q in qas.values())
    seen = {(every[i]["image_name"], every[i]["question"]) for i in range(len(every))}
    assert seen == {(stem, q) for stem, qa in qas.items() for q in qa["questions"]}
    rand = EarthReasonDataset(root, "val", tok, image_size=40, question_sampling="random")
    assert len(rand) == len(first)
    assert len({rand[0]["question"] for _ in range(5)}) == 1  # a function of (seed, epoch, index) only
    draws = set()
    for epoch in range(30):
        rand.set_epoch(epoch)
        draws.add(rand[0]["question"])
    assert len(draws) > 1 and draws <= set(qas[rand[0]["image_name"]]["questions"])
    again = EarthReasonDataset(root, "val", tok, image_size=40, question_sampling="random")
    again.set_epoch(29)
    assert again[0]["question"] == rand[0]["question"]  # another run (a resume) draws the same


# --- RRSIS-D -------------------------------------------------------------------------------------------------
def _refs(root):
    with open(root / "rs_ref_seg" / "RRSIS-D" / "rrsisd" / "refs(unc).p", "rb") as f:
        return pickle.load(f)


def test_rrsisd_samples_and_eval_prompt(root, tok):
    ds = RRSISDDataset(root, "train", tok, image_size=56)
    refs = [r for r in _refs(root) if r["split"] == "train"]
    assert len(ds) == len(refs)
    for i, ref in enumerate(refs):
        s = ds[i]
        _check_sample(s, 56, "refer_seg")
        assert s["question"] == ref["sentences"][0]["raw"]
        assert s["image_name"] == ref["file_name"].rsplit(".", 1)[0]
        assert s["masks"].sum() > 0
    ev = RRSISDDataset(root, "test", tok, image_size=56, train=False)
    assert torch.equal(ev[0]["input_ids"], PROMPTS["examples"]["RRSIS-D/eval"]["input_ids"])


def test_rrsisd_sentence_sampling(root, tok):
    refs = [r for r in _refs(root) if r["split"] == "val"]
    every = RRSISDDataset(root, "val", tok, image_size=32, sentence_sampling="all")
    assert len(every) == sum(len(r["sentences"]) for r in refs)
    assert [every[i]["question"] for i in range(len(every))] == [s["raw"] for r in refs for s in r["sentences"]]
    rand = RRSISDDataset(root, "val", tok, image_size=32, sentence_sampling="random", seed=3)
    draws = set()
    for epoch in range(30):
        rand.set_epoch(epoch)
        draws.add(rand[0]["question"])
    assert len(draws) > 1 and draws <= {s["raw"] for s in refs[0]["sentences"]}


def test_rrsisd_uses_polygons_and_both_rle_kinds(root, tok):
    inst = json.loads((root / "rs_ref_seg" / "RRSIS-D" / "rrsisd" / "instances.json").read_text())
    kinds = {("polygon" if isinstance(a["segmentation"], list) else
              "rle-list" if isinstance(a["segmentation"]["counts"], list) else "rle-str")
             for a in inst["annotations"]}
    assert kinds == {"polygon", "rle-list", "rle-str"}
    ds = RRSISDDataset(root, "train", tok, image_size=64)
    sizes = {(i["height"], i["width"]) for i in inst["images"]}
    assert len(sizes) > 1  # masks are decoded at each image's own size, not a fixed one
    for i in range(len(ds)):
        s = ds[i]
        ref = ds.index.refs[i]
        info = ds.index.images[ref.image_id]
        assert s["orig_size"] == (info.height, info.width)


def test_decode_segmentation_formats():
    from pycocotools import mask as coco_mask

    m = np.zeros((20, 30), np.uint8)
    m[3:9, 4:12] = 1
    m[12:18, 20:28] = 1
    rle = coco_mask.encode(np.asfortranarray(m))
    assert np.array_equal(decode_segmentation({"size": [20, 30], "counts": rle["counts"].decode()}, 20, 30), m)
    assert np.array_equal(decode_segmentation({"size": [20, 30], "counts": rle["counts"]}, 20, 30), m)
    assert np.array_equal(decode_segmentation(uncompressed_rle(m), 20, 30), m)
    starts_with_one = np.ones((4, 5), np.uint8)
    assert np.array_equal(decode_segmentation(uncompressed_rle(starts_with_one), 4, 5), starts_with_one)
    two_polygons = [[4, 3, 12, 3, 12, 9, 4, 9], [20, 12, 28, 12, 28, 18, 20, 18]]
    poly = decode_segmentation(two_polygons, 20, 30)
    assert poly.dtype == np.uint8 and set(np.unique(poly)) == {0, 1}
    assert poly[5, 6] == 1 and poly[15, 24] == 1 and poly[15, 6] == 0 and poly.shape == (20, 30)


# --- RefSegRS ----------------------------------------------------------------------------------------------------
def test_refsegrs_samples(root, tok):
    ds = RefSegRSDataset(root, "train", tok, image_size=72)
    lines = (ds.root / "output_phrase_train.txt").read_text().splitlines()
    assert len(ds) == len(lines)
    for i, line in enumerate(lines):
        s = ds[i]
        _check_sample(s, 72, "refer_seg")
        assert f"{s['image_name']} {s['question']}" == line
        assert s["masks"].sum() > 0
    assert torch.equal(ds[0]["input_ids"], PROMPTS["examples"]["RefSegRS/train"]["input_ids"])


def test_refsegrs_foreground_switch(tmp_path, tok):
    """A grey 128 region is background under the reference rule ("255") and foreground under "nonzero"."""
    generate(tmp_path, datasets=("RefSegRS",), n_train=2, n_val=1, n_test=1, min_size=32, max_size=40)
    first_id = (tmp_path / "rs_ref_seg" / "RefSegRS" / "output_phrase_train.txt").read_text().split()[0]
    mask_path = tmp_path / "rs_ref_seg" / "RefSegRS" / "masks" / f"{first_id}.tif"
    m = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    m[:, :3] = 128
    cv2.imwrite(str(mask_path), m)
    size = max(m.shape)  # no resampling: letterboxed counts equal file counts
    ref = RefSegRSDataset(tmp_path, "train", tok, image_size=size)
    nonzero = RefSegRSDataset(tmp_path, "train", tok, image_size=size, foreground="nonzero")
    assert ref[0]["masks"].sum() == int((m == 255).sum())
    assert nonzero[0]["masks"].sum() == int((m > 0).sum()) > ref[0]["masks"].sum()


# --- collation, registry ----------------------------------------------------------------------------------------
def test_collator_on_dataset_samples(root, tok):
    ds = EarthReasonDataset(root, "train", tok, image_size=32)
    batch = DataCollator(tok.pad_token_id)([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["masks"].shape == (3, 1, 32, 32)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"].shape == batch["answer_embedding_indices"].shape
    assert isinstance(batch["token_refer_id"], list) and len(batch["letterbox"]) == 3
    assert batch["dataset_type"] == ["reason_seg"] * 3 and len(batch["orig_size"]) == 3
    other = RRSISDDataset(root, "train", tok, image_size=32, train=False)
    with pytest.raises(ValueError, match="one dataset_type"):
        DataCollator(tok.pad_token_id)([ds[0], other[0]])
    short, long_ = other[0], RRSISDDataset(root, "train", tok, image_size=32)[0]
    padded = DataCollator(tok.pad_token_id)([short, long_])
    n = short["input_ids"].numel()
    assert (padded["input_ids"][0, n:] == tok.pad_token_id).all() and (padded["labels"][0, n:] == -100).all()
    assert not padded["attention_mask"][0, n:].any() and padded["attention_mask"][1].all()
    truncated = DataCollator(tok.pad_token_id, max_length=10)([short, long_])
    assert truncated["input_ids"].shape == (2, 10) and truncated["labels"].shape == (2, 10)
    with pytest.raises(ValueError, match="setup_tokenizer"):
        DataCollator(None)


def test_registry_and_tokenizer_free_mode(root, tok, monkeypatch):
    assert set(DATASETS) == {"EarthReason", "RRSIS-D", "RefSegRS"}
    ds = build_dataset("RefSegRS", root, "val", tok, image_size=32, foreground="nonzero")
    assert isinstance(ds, RefSegRSDataset) and ds.foreground == "nonzero"
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("RefCOCO", root, "val", tok)
    monkeypatch.setenv("SEGEARTH_DATA", str(root))
    assert default_data_root() == root
    assert len(build_dataset("RRSIS-D", None, "val", tok, image_size=32)) > 0
    bare = build_dataset("EarthReason", root, "test", None, image_size=32)
    s = bare[0]
    assert "input_ids" not in s and s["dataset_type"] == "reason_seg" and s["images"].shape == (3, 32, 32)


# --- the decoded-sample cache (data.cache_gb) ------------------------------------------------------------------
def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_sample_cache_gives_the_same_samples_and_skips_decoding(root, tok, monkeypatch):
    plain = EarthReasonDataset(root, "train", tok, image_size=32, question_sampling="random")
    cached = EarthReasonDataset(root, "train", tok, image_size=32, question_sampling="random", cache_gb=0.01)
    decodes = []
    real_decode = cached._decode
    monkeypatch.setattr(cached, "_decode", lambda source, idx: decodes.append(idx) or real_decode(source, idx))
    for epoch in range(3):
        for a, b in zip(_epoch(plain, epoch), _epoch(cached, epoch)):
            assert a.keys() == b.keys()
            for key in a:
                assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]), key
        if epoch == 0:  # sample 0 was read (and kept) by the constructor's start-up check
            assert sorted(decodes) == list(range(1, len(cached)))
    assert len(decodes) == len(cached) - 1  # epochs 1 and 2 came from memory; texts were still drawn per epoch
    # a sample handed out cannot change the cache
    cached[0]["masks"].fill_(7)
    assert torch.equal(cached[0]["masks"], plain[0]["masks"])


def test_sample_cache_budget_and_validation(root, tok, caplog):
    one_sample = (3 * 32 * 32 + 32 * 32) / 2**30  # uint8 image + mask at 32²
    small = EarthReasonDataset(root, "train", tok, image_size=32, cache_gb=1.5 * one_sample)
    with caplog.at_level(logging.WARNING):
        for i in range(len(small)):
            small[i]
    assert len(small._cache) == 1 and small._cache_bytes <= small._cache_budget
    assert any("sample cache is full (1 samples" in r.getMessage() for r in caplog.records)
    evaluation = EarthReasonDataset(root, "val", tok, image_size=32, train=False, cache_gb=1)
    evaluation.include_eval_extras = True  # eval samples carry their full-size masks: read from disk every time
    kept = dict(evaluation._cache)  # (the constructor's start-up read of sample 0)
    assert all("orig_masks" in evaluation[i] for i in range(len(evaluation))) and evaluation._cache == kept
    for bad in (-1, "1", True, float("nan")):
        with pytest.raises(ValueError, match="cache_gb"):
            EarthReasonDataset(root, "train", tok, image_size=32, cache_gb=bad)
