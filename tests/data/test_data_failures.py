"""Every bad-input case raises a specific error that names the sample/path and what was expected."""
from __future__ import annotations

import json
import pickle
import shutil

import cv2
import numpy as np
import pytest
from conftest import REFERENCE
from transformers import AutoTokenizer

from segearthr1.data.earthreason import EarthReasonDataset
from segearthr1.data.refsegrs import RefSegRSDataset
from segearthr1.data.rrsisd import RRSISDDataset
from segearthr1.data.synthetic import generate
from segearthr1.errors import DatasetCorruptedError, DatasetNotFoundError

SMALL = dict(n_train=3, n_val=2, n_test=1, min_size=32, max_size=48, seed=3)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizer_tiny_trained"), use_fast=True)


@pytest.fixture
def er(tmp_path):
    generate(tmp_path, datasets=("EarthReason",), absent_fraction=0.0, **SMALL)
    return tmp_path, tmp_path / "rs_reason_seg" / "RSReasonSeg" / "train"


@pytest.fixture
def rs(tmp_path):
    generate(tmp_path, datasets=("RefSegRS",), **SMALL)
    return tmp_path, tmp_path / "rs_ref_seg" / "RefSegRS"


@pytest.fixture
def rd(tmp_path):
    generate(tmp_path, datasets=("RRSIS-D",), **SMALL)
    return tmp_path, tmp_path / "rs_ref_seg" / "RRSIS-D"


def _garbage(path):
    path.write_bytes(b"not an image at all")


# --- arguments ---------------------------------------------------------------------------------------------------
def test_bad_arguments(er, tok):
    root, _ = er
    with pytest.raises(ValueError, match="split='dev'"):
        EarthReasonDataset(root, "dev", tok)
    with pytest.raises(ValueError, match="image_size"):
        EarthReasonDataset(root, "train", tok, image_size=0)
    with pytest.raises(ValueError, match="question_sampling"):
        EarthReasonDataset(root, "train", tok, question_sampling="some")
    with pytest.raises(ValueError, match="sentence_sampling"):
        RRSISDDataset(root, "train", tok, sentence_sampling="last")
    with pytest.raises(ValueError, match="foreground"):
        RefSegRSDataset(root, "train", tok, foreground="128")


def test_tokenizer_without_seg_token(er):
    root, _ = er
    raw = AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizer_tiny"))
    raw.add_special_tokens({"pad_token": "[PAD]"})
    with pytest.raises(ValueError, match="setup_tokenizer"):
        EarthReasonDataset(root, "train", raw, image_size=32)


# --- missing roots and trees -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,tree_hint", [(EarthReasonDataset, "RSReasonSeg"), (RRSISDDataset, "JPEGImages"),
                                           (RefSegRSDataset, "output_phrase_")])
def test_missing_root_names_path_and_tree(tmp_path, tok, cls, tree_hint):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        cls(tmp_path / "nowhere", "train", tok)
    assert "nowhere" in str(info.value) and tree_hint in str(info.value)
    with pytest.raises(DatasetNotFoundError) as info:  # root exists, dataset folder does not
        cls(tmp_path, "train", tok)
    assert tree_hint in str(info.value) and "make_synthetic_dataset" in str(info.value)


def test_earthreason_missing_split_and_subdir(er, tok):
    root, split_dir = er
    shutil.rmtree(split_dir.parent / "test")
    with pytest.raises(DatasetNotFoundError, match="split directory"):
        EarthReasonDataset(root, "test", tok)
    shutil.rmtree(split_dir / "labels")
    with pytest.raises(DatasetNotFoundError, match="'labels' directory"):
        EarthReasonDataset(root, "train", tok)


# --- EarthReason ----------------------------------------------------------------------------------------------
def test_earthreason_unpaired_stems_are_listed(er, tok):
    root, split_dir = er
    label = sorted((split_dir / "labels").iterdir())[1]
    label.unlink()
    (split_dir / "QAs" / "stray_qa.json").write_text(json.dumps({"questions": ["q"], "answer": []}))
    with pytest.raises(DatasetNotFoundError) as info:
        EarthReasonDataset(root, "train", tok)
    msg = str(info.value)
    assert f"images without a label: {label.stem}" in msg and "QA files without an image: stray_qa" in msg


def test_earthreason_duplicate_stems(er, tok):
    root, split_dir = er
    img = sorted((split_dir / "images").iterdir())[0]
    twin = img.with_suffix(".png" if img.suffix == ".jpg" else ".jpg")
    shutil.copy(img, twin)
    with pytest.raises(DatasetCorruptedError, match="ambiguous"):
        EarthReasonDataset(root, "train", tok)


def test_earthreason_empty_split(er, tok):
    root, split_dir = er
    for sub in ("images", "labels", "QAs"):
        for p in (split_dir / sub).iterdir():
            p.unlink()
    with pytest.raises(DatasetNotFoundError, match="has no samples"):
        EarthReasonDataset(root, "train", tok)


def test_earthreason_bad_qa(er, tok):
    root, split_dir = er
    qa = sorted((split_dir / "QAs").iterdir())[0]
    qa.write_text("{not json")
    with pytest.raises(DatasetCorruptedError, match=qa.name):
        EarthReasonDataset(root, "train", tok)
    qa.write_text(json.dumps({"questions": [], "answer": []}))
    with pytest.raises(DatasetCorruptedError, match="non-empty list"):
        EarthReasonDataset(root, "train", tok)


def test_earthreason_unreadable_first_image_fails_at_construction(er, tok):
    root, split_dir = er
    first = sorted((split_dir / "images").iterdir())[0]
    _garbage(first)
    with pytest.raises(DatasetCorruptedError, match=f"sample '{first.stem}'"):
        EarthReasonDataset(root, "train", tok, image_size=32)


def test_earthreason_unreadable_later_files_fail_on_access(er, tok):
    root, split_dir = er
    ds = EarthReasonDataset(root, "train", tok, image_size=32)
    stem = ds[2]["image_name"]
    _garbage(split_dir / "labels" / f"{stem}.png")
    with pytest.raises(DatasetCorruptedError, match=f"EarthReason/train sample '{stem}'.*mask"):
        ds[2]
    (split_dir / "labels" / f"{stem}.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"sample '{stem}'"):
        ds[2]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_earthreason_size_mismatch(er, tok):
    root, split_dir = er
    label = sorted((split_dir / "labels").iterdir())[0]
    cv2.imwrite(str(label), np.zeros((5, 7), np.uint8))
    with pytest.raises(DatasetCorruptedError, match=rf"sample '{label.stem}': mask is 5x7 but image .* is \d+x\d+"):
        EarthReasonDataset(root, "train", tok, image_size=32)


# --- RefSegRS ------------------------------------------------------------------------------------------------------
def test_refsegrs_missing_phrase_file_and_dirs(rs, tok):
    root, base = rs
    (base / "output_phrase_val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="output_phrase_val.txt"):
        RefSegRSDataset(root, "val", tok)
    shutil.rmtree(base / "masks")
    with pytest.raises(DatasetNotFoundError, match="'masks' directory"):
        RefSegRSDataset(root, "train", tok)


def test_refsegrs_bad_lines_and_missing_files(rs, tok):
    root, base = rs
    phrases = base / "output_phrase_train.txt"
    original = phrases.read_text()
    phrases.write_text(original + "99999\n")
    with pytest.raises(DatasetCorruptedError, match="line .*99999"):
        RefSegRSDataset(root, "train", tok)
    phrases.write_text(original + "424242 a phantom sample\n")
    with pytest.raises(DatasetNotFoundError, match="images/<ID>.tif missing for ID.*424242"):
        RefSegRSDataset(root, "train", tok)
    phrases.write_text("\n\n")
    with pytest.raises(DatasetNotFoundError, match="has no samples"):
        RefSegRSDataset(root, "train", tok)


def test_refsegrs_size_mismatch_and_corrupt_mask(rs, tok):
    root, base = rs
    first_id = (base / "output_phrase_train.txt").read_text().split()[0]
    cv2.imwrite(str(base / "masks" / f"{first_id}.tif"), np.zeros((3, 4), np.uint8))
    with pytest.raises(DatasetCorruptedError, match=f"RefSegRS/train sample '{first_id}': mask is 3x4"):
        RefSegRSDataset(root, "train", tok, image_size=32)
    _garbage(base / "masks" / f"{first_id}.tif")
    with pytest.raises(DatasetCorruptedError, match=first_id):
        RefSegRSDataset(root, "train", tok, image_size=32)


# --- RRSIS-D --------------------------------------------------------------------------------------------------------
def _load_refs(base):
    with open(base / "rrsisd" / "refs(unc).p", "rb") as f:
        return pickle.load(f)


def _save_refs(base, refs):
    with open(base / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


def test_rrsisd_missing_annotation_files(rd, tok):
    root, base = rd
    (base / "rrsisd" / "instances.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="instances"):
        RRSISDDataset(root, "train", tok)
    (base / "rrsisd" / "refs(unc).p").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"refs\(unc\)\.p"):
        RRSISDDataset(root, "train", tok)


def test_rrsisd_split_without_refs(rd, tok):
    root, base = rd
    _save_refs(base, [r for r in _load_refs(base) if r["split"] != "val"])
    with pytest.raises(DatasetNotFoundError, match="no refs with split 'val'.*'train'"):
        RRSISDDataset(root, "val", tok)


def test_rrsisd_missing_image_files(rd, tok):
    root, base = rd
    ref = [r for r in _load_refs(base) if r["split"] == "train"][-1]
    (base / "images" / "rrsisd" / "JPEGImages" / ref["file_name"]).unlink()
    with pytest.raises(DatasetNotFoundError, match=ref["file_name"]):
        RRSISDDataset(root, "train", tok)


def test_rrsisd_inconsistent_annotations(rd, tok):
    root, base = rd
    refs = _load_refs(base)
    good = [dict(r) for r in refs]
    refs[0]["image_id"] = 9999
    refs[1]["ann_id"] = 8888
    _save_refs(base, refs)
    with pytest.raises(DatasetCorruptedError, match="image_id 9999.*ann_id 8888"):
        RRSISDDataset(root, "train", tok)
    del good[0]["sentences"]
    _save_refs(base, good)
    with pytest.raises(DatasetCorruptedError, match="ref #0 .*malformed"):
        RRSISDDataset(root, "train", tok)
    (base / "rrsisd" / "refs(unc).p").write_bytes(b"garbage")
    with pytest.raises(DatasetCorruptedError, match="unpickle"):
        RRSISDDataset(root, "train", tok)


def test_rrsisd_image_size_disagrees_with_instances(rd, tok):
    root, base = rd
    ref = [r for r in _load_refs(base) if r["split"] == "train"][0]
    cv2.imwrite(str(base / "images" / "rrsisd" / "JPEGImages" / ref["file_name"]), np.zeros((10, 11, 3), np.uint8))
    with pytest.raises(DatasetCorruptedError, match="RRSIS-D/train sample .*mask is .* but image .* is 10x11"):
        RRSISDDataset(root, "train", tok, image_size=32)


def test_rrsisd_rle_size_mismatch_and_bad_segmentation(rd, tok):
    root, base = rd
    inst_path = base / "rrsisd" / "instances.json"
    inst = json.loads(inst_path.read_text())
    ann_id = [r for r in _load_refs(base) if r["split"] == "train"][0]["ann_id"]
    ann = next(a for a in inst["annotations"] if a["id"] == ann_id)
    ann["segmentation"] = {"size": [3, 3], "counts": [9]}
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(DatasetCorruptedError, match=r"RLE size \[3, 3\] differs"):
        RRSISDDataset(root, "train", tok, image_size=32)
    ann["segmentation"] = [[1, 2]]
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(DatasetCorruptedError, match="no polygon"):
        RRSISDDataset(root, "train", tok, image_size=32)
    ann["segmentation"] = "oops"
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(DatasetCorruptedError, match="unknown segmentation format"):
        RRSISDDataset(root, "train", tok, image_size=32)
