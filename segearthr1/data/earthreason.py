"""EarthReason: geospatial pixel reasoning (implicit questions -> binary mask, possibly empty).

Li et al., "SegEarth-R1: Geospatial Pixel Reasoning via Large Language Model", arXiv 2504.09644,
2025; data: https://github.com/earth-insights/SegEarth-R1. 5,434 images (123² to 7617² px), one
label per image, several paraphrased questions and answers per image in a QA json; an empty answer
list means the target is absent and the mask is empty.

Files are paired by stem (the reference pairs by sorted order, which silently misaligns when one
file is missing); unpaired stems are listed in the error.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DatasetCorruptedError, DatasetNotFoundError
from ..processing import REASON_SEG, REASONING_PROMPT
from ..runtime import warning_once
from .base import ReasoningSegDataset, SampleSource, list_preview
from .image_io import read_mask
from .integrity import read_json_file
from .spec import SAMPLING_MODES, DatasetSpec
from .synthetic import write_earthreason

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SUFFIXES = (".png",)
QA_SUFFIXES = (".json", ".txt")  # the reference also accepts json content in .txt files


def _by_stem(directory: Path, suffixes: tuple[str, ...], what: str, problem) -> tuple[dict[str, Path], set[str]]:
    """({stem: file}, stems of directories named like a file) of `directory`; such a directory is
    reported through `problem`, not skipped silently (it used to read as "labels without an image")."""
    found: dict[str, Path] = {}
    directories: set[str] = set()
    clashes = []
    for p in sorted(directory.iterdir()):
        if p.suffix.lower() in suffixes and p.is_dir():
            problem(f"EarthReason {what} entry {p} is a directory; expected a file")
            directories.add(p.stem)
        elif p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                clashes.append(f"{found[p.stem].name} / {p.name}")
            found[p.stem] = p
    if clashes:
        raise DatasetCorruptedError(what=f"EarthReason {what} has several files per stem, so pairing is ambiguous",
                                    where=directory, found=list_preview(clashes), expected="one file per stem")
    return found, directories


def load_qa(path: Path) -> tuple[list[str], list[str]]:
    """(questions, answers) of one QA file; questions must be non-empty, answers may be empty."""
    qa = read_json_file(path, "EarthReason QA file")
    try:
        questions, answers = qa["questions"], qa["answer"]
    except (KeyError, TypeError) as err:
        raise DatasetCorruptedError(what=f"EarthReason QA file {path} is unreadable ({err!r})",
                                    expected='JSON {"questions": [str, ...], "answer": [str, ...]}') from err
    if (not isinstance(questions, list) or not questions or not all(isinstance(q, str) for q in questions)
            or not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise DatasetCorruptedError(what="'questions' or 'answer' has the wrong type",
                                    where=f"EarthReason QA file {path}",
                                    expected="'questions' a non-empty list of strings and 'answer' a (possibly "
                                             "empty) list of strings")
    return questions, answers


def answer_for(answers: list[str], question_index: int) -> str | None:
    """Answer paired with question i: answer[i] if present, else answer[0]; None if the list is empty."""
    if not answers:
        return None
    return answers[question_index] if question_index < len(answers) else answers[0]


class EarthReasonDataset(ReasoningSegDataset):
    """EarthReason split as samples; `question_sampling`: first (reference) | random | all.

    "all" turns every question of an image into its own sample (len = number of questions).
    """

    spec = DatasetSpec(
        name="EarthReason", dataset_type=REASON_SEG, aliases=("rs_reason_seg", "reason_seg"),
        expected_tree=("rs_reason_seg/RSReasonSeg/{train,val,test}/\n"
                       "    images/<stem>.jpg|.png   labels/<stem>.png   QAs/<stem>.json"),
        train_prompt=REASONING_PROMPT, eval_prompt=REASONING_PROMPT, sampling_modes=SAMPLING_MODES,
        foreground_rules=("nonzero",),  # label != 0, emptied when the answer list is empty
        write_synthetic=write_earthreason)

    @property
    def root(self) -> Path:
        return self.data_root / "rs_reason_seg" / "RSReasonSeg" / self.split

    def _verify(self) -> None:
        self._require(self.root, f"split directory ({self.split})")
        for sub in ("images", "labels", "QAs"):
            self._require(self.root / sub, f"'{sub}' directory")

    def _load_index(self) -> None:
        images, bad = _by_stem(self.root / "images", IMAGE_SUFFIXES, "images", self._problem)
        labels, bad_labels = _by_stem(self.root / "labels", LABEL_SUFFIXES, "labels", self._problem)
        qas, bad_qas = _by_stem(self.root / "QAs", QA_SUFFIXES, "QAs", self._problem)
        bad |= bad_labels | bad_qas  # already reported: not "unpaired" as well
        stems = sorted(set(images) & set(labels) & set(qas))
        unpaired = {
            "images without a label": sorted(set(images) - set(labels) - bad),
            "images without a QA file": sorted(set(images) - set(qas) - bad),
            "labels without an image": sorted(set(labels) - set(images) - bad),
            "QA files without an image": sorted(set(qas) - set(images) - bad),
        }
        if self.collect_problems:  # one line per file
            for (kind, missing), files in zip(unpaired.items(), (images, images, labels, qas)):
                needed = kind.split(" without a")[1].strip()
                self.problems.extend(f"{files[stem]}: has no {needed}" for stem in missing)
        problems = [f"{k}: {list_preview(v)}" for k, v in unpaired.items() if v]
        if problems and not self.collect_problems:
            raise DatasetNotFoundError(
                what=f"EarthReason split {self.split!r} has files that do not pair by stem", where=self.root,
                found="; ".join(problems), expected="images/<stem>.*, labels/<stem>.png, QAs/<stem>.json",
                hint="add the missing files or remove the strays")
        kept = []
        self._qas = []
        for s in stems:
            try:
                self._qas.append(load_qa(qas[s]))
                kept.append(s)
            except DatasetCorruptedError as err:
                self._problem(str(err))
        self._images = [images[s] for s in kept]
        self._labels = [labels[s] for s in kept]
        if self.question_sampling == "all":
            self._items = [(i, q) for i, (questions, _) in enumerate(self._qas) for q in range(len(questions))]
        else:
            self._items = [(i, 0) for i in range(len(kept))]

    def __len__(self) -> int:
        return len(self._items)

    def _source(self, idx: int) -> SampleSource:
        i, q = self._items[idx]
        questions, answers = self._qas[i]
        if self.question_sampling == "random":
            q = self._random_index(len(questions), idx)
        path = self._images[i]
        return SampleSource(path, path.stem, questions[q], answer_for(answers, q))

    def _load_mask(self, idx: int, source: SampleSource, image_hw: tuple[int, int]) -> np.ndarray:
        i, _ = self._items[idx]
        label = read_mask(self._labels[i])
        mask = (label != 0).astype(np.uint8)
        if not self._qas[i][1] and mask.any():  # empty answer list: the target is absent
            warning_once(f"EarthReason {self._labels[i]} has foreground but an empty answer list; "
                         f"using an empty mask")
            mask[:] = 0
        return mask
