"""RefSegRS: referring segmentation of aerial scenes (explicit phrases -> binary mask).

Yuan et al., "RRSIS: Referring Remote Sensing Image Segmentation", IEEE TGRS 2024 (arXiv
2306.08625); data: https://huggingface.co/datasets/JessicaYuan/RefSegRS. 4,420 image-phrase-mask
triplets from SkyScapes, 512x512 TIFF tiles; masks are 0/255 TIFFs. One line per sample in
`output_phrase_{split}.txt`: `ID phrase...`, with image and mask `ID.tif`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DatasetCorruptedError, DatasetNotFoundError
from ..processing import REFER_SEG, REFERRING_PROMPT
from .base import ReasoningSegDataset, SampleSource, list_preview
from .image_io import read_mask
from .spec import DatasetSpec
from .synthetic import write_refsegrs

logger = logging.getLogger(__name__)


def parse_phrase_file(path: Path) -> list[tuple[str, str]]:
    """[(ID, phrase)] from `ID phrase...` lines; blank lines are skipped, other bad lines raise."""
    entries = []
    bad = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetCorruptedError(what=f"RefSegRS phrase file {path} is not UTF-8 text",
                                    found=f"byte {err.start}: {err.reason}", hint="save it as UTF-8") from err
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            bad.append(f"line {lineno}: {line!r}")
            continue
        entries.append((parts[0], parts[1]))
    if bad:
        raise DatasetCorruptedError(what=f"RefSegRS phrase file {path} has lines without 'ID phrase'",
                                    found=list_preview(bad, 10))
    return entries


class RefSegRSDataset(ReasoningSegDataset):
    """RefSegRS split as samples; `foreground`: "255" (reference: only 255 is object) or "nonzero"."""

    spec = DatasetSpec(
        name="RefSegRS", dataset_type=REFER_SEG, aliases=("refseg_rs",),
        expected_tree=("rs_ref_seg/RefSegRS/\n"
                       "    images/<ID>.tif   masks/<ID>.tif (0/255)   output_phrase_{train,val,test}.txt"),
        train_prompt=REFERRING_PROMPT, eval_prompt=REFERRING_PROMPT,
        foreground_rules=("255", "nonzero"),  # reference: only 255 is object
        write_synthetic=write_refsegrs)

    @property
    def root(self) -> Path:
        return self.data_root / "rs_ref_seg" / "RefSegRS"

    @property
    def phrase_file(self) -> Path:
        return self.root / f"output_phrase_{self.split}.txt"

    def _verify(self) -> None:
        self._require(self.root, "directory")
        self._require(self.root / "images", "'images' directory")
        self._require(self.root / "masks", "'masks' directory")
        self._require(self.phrase_file, f"phrase file of split {self.split!r}", is_dir=False)

    def _load_index(self) -> None:
        self._entries = parse_phrase_file(self.phrase_file)
        ids = {i for i, _ in self._entries}
        have_images = {p.name for p in (self.root / "images").iterdir()}
        have_masks = {p.name for p in (self.root / "masks").iterdir()}
        no_image = sorted(i for i in ids if f"{i}.tif" not in have_images)
        no_mask = sorted(i for i in ids if f"{i}.tif" not in have_masks)
        if self.collect_problems:
            self.problems.extend(f"{self.root / sub / (i + '.tif')}: listed in {self.phrase_file.name} but missing"
                                 for sub, ids_ in (("images", no_image), ("masks", no_mask)) for i in ids_)
            missing = set(no_image) | set(no_mask)
            self._entries = [e for e in self._entries if e[0] not in missing]
        elif no_image or no_mask:
            parts = [f"{what} missing for ID(s) {list_preview(v)}"
                     for what, v in (("images/<ID>.tif", no_image), ("masks/<ID>.tif", no_mask)) if v]
            raise DatasetNotFoundError(what=f"RefSegRS {self.phrase_file.name} lists samples whose files are missing",
                                       where=self.root, found="; ".join(parts))

    def __len__(self) -> int:
        return len(self._entries)

    def _source(self, idx: int) -> SampleSource:
        sample_id, phrase = self._entries[idx]
        return SampleSource(self.root / "images" / f"{sample_id}.tif", sample_id, phrase)

    def _load_mask(self, idx: int, source: SampleSource, image_hw: tuple[int, int]) -> np.ndarray:
        label = read_mask(self.root / "masks" / f"{source.image_name}.tif")
        return (label == 255 if self.foreground == "255" else label != 0).astype(np.uint8)
