"""RRSIS-D: referring segmentation in remote-sensing images (REFER-style annotations).

Liu et al., "Rotated Multi-Scale Interaction Network for Referring Remote Sensing Image
Segmentation", CVPR 2024; data: https://github.com/Lsan2401/RMSIN. 17,402 image-expression-mask
triplets on 800x800 images; refs pickle (`refs(unc).p`) + COCO `instances.json` with polygon or RLE
segmentations. Masks are decoded lazily per item at the image's own size (the reference decodes all
at start-up at a fixed 800x800 and looks images up by ref id; we use the ref's `image_id`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from ..processing import REFER_SEG, REFERRING_PROMPT, REFERRING_SHORT_PROMPT
from .base import ReasoningSegDataset, SampleSource, list_preview
from .refer_index import ReferIndex
from .spec import SAMPLING_MODES, DatasetSpec
from .synthetic import write_rrsisd

logger = logging.getLogger(__name__)

REFS_FILE = "refs(unc).p"


class RRSISDDataset(ReasoningSegDataset):
    """RRSIS-D split as samples; `question_sampling` (alias `sentence_sampling`, the reference's name)
    picks a ref's sentence: first (reference) | random | all."""

    spec = DatasetSpec(
        name="RRSIS-D", dataset_type=REFER_SEG, aliases=("rrsisd", "rrsis_d"),
        expected_tree=("rs_ref_seg/RRSIS-D/\n"
                       "    images/rrsisd/JPEGImages/<file_name>.jpg\n"
                       f"    rrsisd/{REFS_FILE}   rrsisd/instances.json"),
        # the reference evaluates RRSIS-D with a shorter assistant turn ("Sure.")
        train_prompt=REFERRING_PROMPT, eval_prompt=REFERRING_SHORT_PROMPT, sampling_modes=SAMPLING_MODES,
        foreground_rules=("annotation",),  # the ref's decoded polygon / RLE
        write_synthetic=write_rrsisd)

    def __init__(self, data_root, split: str, tokenizer, image_size: int = 1024, train: bool = True,
                 refs_file: str = REFS_FILE, **options):
        self.refs_file = refs_file
        super().__init__(data_root, split, tokenizer, image_size=image_size, train=train, **options)

    @property
    def root(self) -> Path:
        return self.data_root / "rs_ref_seg" / "RRSIS-D"

    @property
    def image_dir(self) -> Path:
        return self.root / "images" / "rrsisd" / "JPEGImages"

    def _verify(self) -> None:
        self._require(self.root, "directory")
        self._require(self.image_dir, "image directory")
        self._require(self.root / "rrsisd" / self.refs_file, "refs file", is_dir=False)
        self._require(self.root / "rrsisd" / "instances.json", "instances file", is_dir=False)

    def _load_index(self) -> None:
        self.index = ReferIndex.from_files(self.root / "rrsisd" / self.refs_file,
                                           self.root / "rrsisd" / "instances.json", self.split)
        if len(self.index) == 0:
            raise DatasetNotFoundError(
                what=f"RRSIS-D refs file has no refs with split {self.split!r}",
                where=self.root / "rrsisd" / self.refs_file,
                found=f"splits present: {self.index.available_splits or 'none'}")
        present = {p.name for p in self.image_dir.iterdir()}
        missing = sorted({info.file_name for info in self.index.images.values()} - present)
        if missing and not self.collect_problems:
            raise DatasetNotFoundError(what=f"RRSIS-D split {self.split!r}: {len(missing)} image(s) named in "
                                            f"instances.json are missing", where=self.image_dir,
                                       found=list_preview(missing))
        self.problems.extend(f"{self.image_dir / name}: named in instances.json but missing" for name in missing)
        if self.question_sampling == "all":
            self._items = [(r, s) for r, ref in enumerate(self.index.refs) for s in range(len(ref.sentences))]
        else:
            self._items = [(r, 0) for r in range(len(self.index.refs))]

    def __len__(self) -> int:
        return len(self._items)

    def _source(self, idx: int) -> SampleSource:
        r, s = self._items[idx]
        ref = self.index.refs[r]
        if self.question_sampling == "random":
            s = self._random_index(len(ref.sentences), idx)
        path = self.image_dir / self.index.images[ref.image_id].file_name
        return SampleSource(path, path.stem, ref.sentences[s])

    def _load_mask(self, idx: int, source: SampleSource, image_hw: tuple[int, int]) -> np.ndarray:
        return self.index.mask_for(self.index.refs[self._items[idx][0]])
