"""The dataset registry: one DatasetSpec per dataset, read by train, evaluate, predict and the generator.

A fourth dataset is declared here, in the test only (class + spec + synthetic writer = what its own
file would hold, then one `register` call), and every consumer sees it with no other edit.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from model_utils import trained_tokenizer
from segearthr1.data import registry
from segearthr1.data.base import ReasoningSegDataset, SampleSource
from segearthr1.data.image_io import read_mask
from segearthr1.data.spec import DatasetSpec
from segearthr1.data.synthetic import generate
from segearthr1.processing import REASON_SEG, REASONING_PROMPT, REFER_SEG, REFERRING_PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import make_synthetic_dataset  # noqa: E402


def write_fake(root: Path, seed: int, stream: int, counts: dict, opts) -> dict:
    """Synthetic writer of the fake dataset: <split>/<id>.png + <id>_mask.png + phrases.txt."""
    rng = np.random.default_rng([seed, stream])
    out = {}
    for split, n in counts.items():
        base = root / "fake_set" / split
        base.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            size = int(rng.integers(opts.min_size, opts.max_size + 1))
            cv2.imwrite(str(base / f"{i}.png"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            cv2.imwrite(str(base / f"{i}_mask.png"), (rng.random((size, size)) > 0.5).astype(np.uint8) * 7)
            lines.append(f"{i}\tthe noisy patch number {i}\tthe patch {i} again")
        (base / "phrases.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[split] = n
    return out


class FakeSetDataset(ReasoningSegDataset):
    """Two phrases per image; the mask is every non-zero pixel."""

    spec = DatasetSpec(name="FakeSet", dataset_type=REFER_SEG, aliases=("fake_set",),
                       expected_tree="fake_set/{train,val}/\n    <id>.png  <id>_mask.png  phrases.txt",
                       train_prompt=REFERRING_PROMPT, eval_prompt=REFERRING_PROMPT, splits=("train", "val"),
                       sampling_modes=("first", "all"), write_synthetic=write_fake)

    @property
    def root(self) -> Path:
        return self.data_root / "fake_set" / self.split

    def _verify(self) -> None:
        self._require(self.root / "phrases.txt", "phrase file", is_dir=False)

    def _load_index(self) -> None:
        rows = [line.split("\t") for line in (self.root / "phrases.txt").read_text().splitlines() if line]
        per_image = rows if self.question_sampling == "all" else [r[:2] for r in rows]
        self._items = [(r[0], phrase) for r in per_image for phrase in r[1:]]

    def __len__(self) -> int:
        return len(self._items)

    def _source(self, idx: int) -> SampleSource:
        sample_id, phrase = self._items[idx]
        return SampleSource(self.root / f"{sample_id}.png", sample_id, phrase)

    def _load_mask(self, idx, source, image_hw) -> np.ndarray:
        return (read_mask(self.root / f"{source.image_name}_mask.png") != 0).astype(np.uint8)


@pytest.fixture
def fake_registered():
    registry.register(FakeSetDataset)
    try:
        yield FakeSetDataset
    finally:
        registry.DATASETS.pop("FakeSet")


def test_the_three_reference_datasets_are_declared_once():
    assert list(registry.DATASETS) == ["EarthReason", "RRSIS-D", "RefSegRS"]  # order = synthetic streams
    assert registry.canonical_dataset("rrsis_d") == registry.canonical_dataset("RRSISD") == "RRSIS-D"
    assert registry.get_spec("refseg_rs").foreground_rules == ("255", "nonzero")
    assert registry.get_spec("EarthReason").dataset_type == REASON_SEG
    assert registry.names_for_task("reasoning") == {"earthreason", "rs_reason_seg", "reason_seg"}
    with pytest.raises(ValueError, match="unknown dataset 'COCO'.*EarthReason"):
        registry.canonical_dataset("COCO")


def test_options_come_from_the_spec_not_the_name():
    """One switch name: the registry hands each dataset only the switches it has."""
    assert registry.get_spec("RRSIS-D").dataset_options("all", "255") == {"question_sampling": "all"}
    assert registry.get_spec("RefSegRS").dataset_options("first", "nonzero") == {"foreground": "nonzero"}
    assert registry.get_spec("EarthReason").dataset_options("random", None) == {"question_sampling": "random"}


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="dataset_type"):
        DatasetSpec(name="X", dataset_type="detect", expected_tree="", train_prompt=REFERRING_PROMPT,
                    eval_prompt=REFERRING_PROMPT)
    with pytest.raises(ValueError, match="prompts"):
        DatasetSpec(name="X", dataset_type=REFER_SEG, expected_tree="", train_prompt=REASONING_PROMPT,
                    eval_prompt=REFERRING_PROMPT)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.DATASETS["RefSegRS"])


def test_a_fourth_dataset_is_seen_everywhere(fake_registered, tmp_path):
    from segearthr1 import evaluate
    from segearthr1.data.check import check_dataset
    from segearthr1.evaluation.samples import sample_ids
    from segearthr1.inference.predictor import _task_from_run_config
    from segearthr1.training.args import resolve_run_config
    from segearthr1.training.run import dataset_kwargs

    # the generator writes it (by default with the others, whose files do not change), and only its splits
    summary = generate(tmp_path, n_train=2, n_val=3, n_test=4, min_size=32, max_size=40)
    assert summary["FakeSet"] == {"train": 2, "val": 3} and set(summary) == {"EarthReason", "RRSIS-D", "RefSegRS",
                                                                            "FakeSet"}
    # train: the run config resolves its alias, and the dataset gets its sampling switch, no foreground
    config, _ = resolve_run_config(None, ["data.dataset=fake_set", "data.question_sampling=all",
                                          "init.tokenizer_path=x"])
    assert config["data"]["dataset"] == "FakeSet"
    model = SimpleNamespace(config=SimpleNamespace(image_size=32, text_config=SimpleNamespace(
        max_position_embeddings=512)), connector=SimpleNamespace(num_tokens=lambda: 16))
    kwargs = dataset_kwargs(config, model, seed=3)
    assert kwargs["question_sampling"] == "all" and "foreground" not in kwargs
    train_set = registry.build_dataset("FakeSet", tmp_path, "train", trained_tokenizer(), **kwargs)
    assert len(train_set) == 4 and train_set[1]["question"] == "the patch 0 again"
    assert train_set[0]["dataset_type"] == REFER_SEG and "token_answer_id" not in train_set[0]
    # evaluate: the CLI takes its name or alias; sample ids come from sample_name
    args = evaluate.parse_args(["--model_path", "m", "--dataset_type", "fake_set"])
    assert args.dataset_type == "FakeSet"
    assert sample_ids(train_set) == ["0__q0", "0__q1", "1__q0", "1__q1"]
    with pytest.raises(ValueError, match="FakeSet: split='test'"):
        registry.build_dataset("FakeSet", tmp_path, "test", None, image_size=32)
    # predict: a run config naming it means the referring prompt
    assert _task_from_run_config({"data": {"dataset": "FakeSet"}}) == "referring"
    # check-data walks its own splits; the generator's CLI offers it
    problems, _, checked = check_dataset("fake_set", tmp_path)
    assert problems == [] and checked == 2 + 3
    assert make_synthetic_dataset.parse_args(["--out", str(tmp_path), "--datasets", "fake_set"]).datasets == ["FakeSet"]


def test_run_config_reads_switch_names_and_choices_from_the_registry():
    """train: --sentence_sampling is the old spelling of data.question_sampling; data.foreground's choices
    are the rules of the datasets that offer one."""
    from segearthr1.training.args import DataArgs, resolve_run_config

    config, _ = resolve_run_config(None, ["init.tokenizer_path=x"], [("dataset_type", "rrsisd"),
                                                                     ("sentence_sampling", "all")])
    assert config["data"]["dataset"] == "RRSIS-D" and config["data"]["question_sampling"] == "all"
    assert registry.foreground_choices() == ("255", "nonzero")
    with pytest.raises(ValueError, match=r"data.foreground='annotation'; choose one of \['255', 'nonzero'\]"):
        DataArgs(dataset="RefSegRS", foreground="annotation")
