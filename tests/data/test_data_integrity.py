"""Broken input files are errors naming the file, in the loaders and in `segearthr1 check-data`."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from conftest import REFERENCE
from transformers import AutoTokenizer

from segearthr1.cli import main as cli_main
from segearthr1.data.earthreason import EarthReasonDataset
from segearthr1.data.image_io import read_image_rgb, read_mask
from segearthr1.data.refsegrs import RefSegRSDataset
from segearthr1.data.rrsisd import RRSISDDataset
from segearthr1.data.synthetic import generate
from segearthr1.errors import DatasetCorruptedError

SMALL = dict(n_train=6, n_val=2, n_test=0, min_size=40, max_size=56, seed=5)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizer_tiny_trained"), use_fast=True)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_jpeg_and_png_are_named(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), rgb)
    cv2.imwrite(str(tmp_path / "m.png"), rgb[..., 0])
    assert read_image_rgb(tmp_path / "a.jpg").shape == (64, 64, 3)  # intact files still read
    _truncate(tmp_path / "a.jpg")
    _truncate(tmp_path / "m.png")
    with pytest.raises(DatasetCorruptedError, match=r"a\.jpg is a truncated or damaged JPEG"):
        read_image_rgb(tmp_path / "a.jpg")
    with pytest.raises(DatasetCorruptedError, match=r"m\.png is a truncated or damaged PNG"):
        read_mask(tmp_path / "m.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetCorruptedError, match="empty"):
        read_image_rgb(tmp_path / "empty.png")
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(DatasetCorruptedError, match=r"d\.jpg is a directory"):
        read_image_rgb(tmp_path / "d.jpg")


def test_small_image_warns_once(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((12, 40, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        read_image_rgb(tmp_path / "tiny.png")
    assert "tiny.png is only 12x40 px" in caplog.text


@pytest.fixture
def broken(tmp_path):
    """An EarthReason train split with one file broken in each way."""
    generate(tmp_path, datasets=("EarthReason",), absent_fraction=0.0, **SMALL)
    split = tmp_path / "rs_reason_seg" / "RSReasonSeg" / "train"
    stems = sorted(p.stem for p in (split / "images").iterdir())
    _truncate(split / "images" / f"{stems[1]}.jpg")
    _truncate(split / "labels" / f"{stems[2]}.png")
    (split / "QAs" / f"{stems[3]}.json").write_bytes('{"questions": ["caf\xe9?"], "answer": []}'.encode("latin-1"))
    (split / "images" / f"{stems[4]}.jpg").unlink()
    (split / "images" / f"{stems[4]}.jpg").mkdir()
    return tmp_path, split, stems


def test_loaders_name_each_broken_file(broken, tok):
    root, split, stems = broken
    with pytest.raises(DatasetCorruptedError, match=rf"images/{stems[4]}\.jpg is a directory"):
        EarthReasonDataset(root, "train", tok, image_size=32)
    (split / "images" / f"{stems[4]}.jpg").rmdir()
    for path in (split / "labels" / f"{stems[4]}.png", split / "QAs" / f"{stems[4]}.json"):
        path.unlink()
    with pytest.raises(DatasetCorruptedError, match=rf"QAs/{stems[3]}\.json is not UTF-8"):
        EarthReasonDataset(root, "train", tok, image_size=32)
    (split / "QAs" / f"{stems[3]}.json").write_text(json.dumps({"questions": ["q?"], "answer": []}))
    ds = EarthReasonDataset(root, "train", tok, image_size=32)
    assert ds[0]["image_name"] == stems[0] and ds[3]["image_name"] == stems[3]
    with pytest.raises(DatasetCorruptedError, match=rf"{stems[1]}\.jpg is a truncated or damaged JPEG"):
        ds[1]
    with pytest.raises(DatasetCorruptedError, match=rf"{stems[2]}\.png is a truncated or damaged PNG"):
        ds[2]


def test_check_data_lists_every_problem(broken, capsys):
    root, split, stems = broken
    (split / "labels" / f"{stems[5]}.png").unlink()  # and an unpaired image
    code = cli_main(["check-data", "--dataset_type", "earthreason", "--data_path", str(root)])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    for needle in (f"images/{stems[1]}.jpg is a truncated or damaged JPEG",
                   f"labels/{stems[2]}.png is a truncated or damaged PNG",
                   f"QAs/{stems[3]}.json is not UTF-8",
                   f"images/{stems[4]}.jpg is a directory",
                   f"images/{stems[5]}.jpg: has no label"):
        assert sum(needle in line for line in problems) == 1, (needle, out)
    assert len(problems) == 5, out  # nothing reported twice (the directory is not also "unpaired")


def test_check_data_passes_a_clean_dataset(tmp_path, capsys):
    generate(tmp_path, datasets=("RefSegRS", "RRSIS-D"), **SMALL)
    for name in ("RefSegRS", "RRSIS-D"):
        assert cli_main(["check-data", "--dataset_type", name, "--data_path", str(tmp_path)]) == 0
        assert "the dataset is usable" in capsys.readouterr().out
    assert cli_main(["check-data", "--dataset_type", "RefSegRS", "--data_path", str(tmp_path), "--split",
                     "test"]) == 1  # asked for by name but absent


def test_check_data_names_missing_refsegrs_and_rrsisd_files(tmp_path, capsys):
    generate(tmp_path, datasets=("RefSegRS", "RRSIS-D"), **SMALL)
    refseg = tmp_path / "rs_ref_seg" / "RefSegRS"
    first_id = (refseg / "output_phrase_train.txt").read_text().split()[0]
    (refseg / "masks" / f"{first_id}.tif").unlink()
    rrsisd_images = tmp_path / "rs_ref_seg" / "RRSIS-D" / "images" / "rrsisd" / "JPEGImages"
    victim = sorted(rrsisd_images.iterdir())[0]
    _truncate(victim)
    assert cli_main(["check-data", "--dataset_type", "RefSegRS", "--data_path", str(tmp_path)]) == 1
    assert f"masks/{first_id}.tif: listed in output_phrase_train.txt but missing" in capsys.readouterr().out
    assert cli_main(["check-data", "--dataset_type", "RRSIS-D", "--data_path", str(tmp_path)]) == 1
    assert f"{victim.name} is a truncated or damaged JPEG" in capsys.readouterr().out


def test_non_utf8_phrase_and_instances_files_are_named(tmp_path, tok):
    generate(tmp_path, datasets=("RefSegRS", "RRSIS-D"), **SMALL)
    phrases = tmp_path / "rs_ref_seg" / "RefSegRS" / "output_phrase_train.txt"
    phrases.write_bytes(phrases.read_bytes() + "\n99 caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetCorruptedError, match="output_phrase_train.txt is not UTF-8"):
        RefSegRSDataset(tmp_path, "train", tok, image_size=32)
    instances = tmp_path / "rs_ref_seg" / "RRSIS-D" / "rrsisd" / "instances.json"
    instances.write_bytes(b'{"images": "\xff"}')
    with pytest.raises(DatasetCorruptedError, match="instances.json is not UTF-8"):
        RRSISDDataset(tmp_path, "train", tok, image_size=32)


def test_long_question_is_truncated_with_a_warning(tmp_path, tok, caplog):
    generate(tmp_path, datasets=("EarthReason",), absent_fraction=0.0, **SMALL)
    qa_dir = tmp_path / "rs_reason_seg" / "RSReasonSeg" / "train" / "QAs"
    first = sorted(qa_dir.iterdir())[0]
    first.write_text(json.dumps({"questions": ["where is it " * 500], "answer": ["There."]}))
    full = EarthReasonDataset(tmp_path, "train", tok, image_size=32)[0]
    with caplog.at_level(logging.WARNING):
        cut = EarthReasonDataset(tmp_path, "train", tok, image_size=32, max_text_tokens=200)[0]
    used = (len(cut["input_ids"]) - 2 + len(cut["token_refer_id"]) + len(cut["token_answer_id"]))
    assert len(full["token_refer_id"]) > 1000 and used <= 200
    assert cut["token_refer_id"][-1] == full["token_refer_id"][-1]  # [SEG] is kept
    assert f"sample {first.stem!r}: the question has {len(full['token_refer_id']) - 1} tokens" in caplog.text


def test_text_token_budget_leaves_room_for_the_image_tokens():
    from model_utils import tiny_model

    from segearthr1.data.base import text_token_budget

    model = tiny_model()
    visual = model.connector.num_tokens()
    assert text_token_budget(model, 100) == 100 - visual + 1
    assert text_token_budget(model, None) == 512 - visual + 1  # the LLM's max_position_embeddings
