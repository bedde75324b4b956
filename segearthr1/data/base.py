"""Shared skeleton of the three dataset classes (torchgeo style: verify -> index -> samples).

A dataset file only says where its files are (`_verify`, `_load_index`), what sample `idx` refers to
(`_source`) and how its mask is read (`_load_mask`); loading, size checks, letterboxing, text encoding
and the sample schema (DESIGN.md §2.9 keys plus ours) live here, so all datasets behave alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetCorruptedError, DatasetNotFoundError
from ..runtime import warning_once
from ..processing import TextEncoder
from .fast_decode import read_image_for_letterbox
from .image_io import read_image_rgb
from .spec import DatasetSpec
from .transforms import letterbox_image, letterbox_mask, normalize_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSource:
    """What sample `idx` is made of, before any file is read."""

    image_path: Path
    image_name: str
    instruction: str
    answer: str | None = None  # reasoning datasets only; None = no target ("There is no target ...")


def text_token_budget(model, max_length: int | None = None) -> int | None:
    """`max_text_tokens` for a dataset feeding `model`: the LLM positions left for text once the image
    tokens are in, under `max_length` (data.max_length) and the LLM's max_position_embeddings. The
    `<image>` placeholder counts as text in the dataset's tally, hence the +1."""
    limits = [v for v in (max_length, getattr(model.config.text_config, "max_position_embeddings", None)) if v]
    return min(limits) - model.connector.num_tokens() + 1 if limits else None


def list_preview(items, limit: int = 20) -> str:
    items = list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def check_cache_gb(value, name: str) -> None:
    """The sample-cache size must be a plain number >= 0 (NaN, bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}={value!r}; expected a number of GB >= 0 (decoded samples kept in memory; 0: off)")


class ReasoningSegDataset(Dataset):
    """Base class: one (image, instruction, mask) triple per index, letterboxed and tokenised.

    `tokenizer` may be None to inspect images and masks only (the text keys are then absent).
    `seed`: random question/sentence choices are drawn from (seed, epoch, index) alone, so a resumed run
    draws exactly what the uninterrupted one did (the trainer calls `set_epoch`).
    `max_text_tokens`: LLM positions the text may take (prompt + question + answer); a longer question
    is truncated (keeping its `[SEG]`) with a warning naming the sample. None: no limit.
    `collect_problems`: index-level problems (unpaired or unreadable files) are recorded in
    `self.problems` and the affected samples left out, instead of raising (`segearthr1 check-data`).
    `question_sampling` (alias `sentence_sampling`): which of a sample's texts is used, one of
    `spec.sampling_modes`; `foreground`: one of `spec.foreground_rules` (default: the first).
    `cache_gb`: keep up to this many GB of decoded, letterboxed images and masks in memory (0: off), so
    later epochs skip the file reads, decodes and resizes. Training applies no random augmentation, so
    a cached sample is exactly what decoding again would give; texts are still chosen per epoch. The
    cache lives in the process that reads: with DataLoader workers each worker fills its own, and
    non-persistent workers start empty every epoch.

    A dataset file declares `spec = DatasetSpec(...)`; `name`, `dataset_type` and `expected_tree`
    are read from it.
    """

    spec: ClassVar[DatasetSpec]
    name: ClassVar[str] = ""
    dataset_type: ClassVar[str] = ""
    expected_tree: ClassVar[str] = ""
    #: set by evaluation: samples also carry `orig_masks` (HxW uint8 at the image's resolution) and `answer`
    include_eval_extras: bool = False
    #: set by evaluation's --fast_decode: large JPEGs are decoded at reduced scale (fast_decode.py)
    fast_decode: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name, cls.dataset_type, cls.expected_tree = cls.spec.name, cls.spec.dataset_type, cls.spec.expected_tree

    def __init__(self, data_root, split: str, tokenizer, image_size: int = 1024, train: bool = True,
                 seed: int = 0, max_text_tokens: int | None = None, collect_problems: bool = False,
                 question_sampling: str = "first", foreground: str | None = None,
                 sentence_sampling: str | None = None, cache_gb: float = 0.0):
        spec = self.spec
        spec.check_option("split", split, spec.splits)
        option = "question_sampling"
        if sentence_sampling is not None:
            question_sampling, option = sentence_sampling, "sentence_sampling"
        self.question_sampling = spec.check_option(option, question_sampling, spec.sampling_modes or ("first",))
        self.foreground = spec.check_option("foreground", foreground or spec.default_foreground,
                                            spec.foreground_rules)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int (reference: 1024)")
        self.data_root = Path(data_root).expanduser()
        self.split = split
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.max_text_tokens = max_text_tokens
        self.collect_problems = collect_problems
        self.problems: list[str] = []
        check_cache_gb(cache_gb, "cache_gb")
        self._cache_budget = int(cache_gb * 2**30)
        self._cache: dict[int, tuple] = {}
        self._cache_bytes = 0
        if not self.data_root.is_dir():
            self._raise_missing(self.data_root, "data root")
        self._verify()
        self._load_index()
        if len(self) == 0:
            raise DatasetNotFoundError(what=f"{self.name} split {split!r} has no samples", where=self.root,
                                       expected=f"files laid out as\n{self.expected_tree}")
        self._text = TextEncoder(tokenizer, spec.prompt(self.train)) if tokenizer is not None else None
        if not collect_problems:
            self[0]  # cheap start-up check: the first sample opens and its image/mask sizes agree
        logger.info("%s/%s: %d samples from %s", self.name, split, len(self), self.root)
        if self._cache_budget:
            logger.info("%s/%s: keeping up to %.2f GB of decoded %d² samples in memory (data.cache_gb)", self.name,
                        split, cache_gb, image_size)

    # --- hooks implemented by each dataset file ----------------------------------------------------------
    @property
    def root(self) -> Path:
        raise NotImplementedError

    def _verify(self) -> None:
        """Raise DatasetNotFoundError if a directory or listing file of the split is missing."""
        raise NotImplementedError

    def _load_index(self) -> None:
        """Build the list of samples (no image or mask is decoded here)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _source(self, idx: int) -> SampleSource:
        raise NotImplementedError

    def sample_name(self, idx: int) -> str:
        """The image name of sample `idx` without decoding anything (evaluation's sample ids)."""
        return str(self._source(idx).image_name)

    def _load_mask(self, idx: int, source: SampleSource, image_hw: tuple[int, int]) -> np.ndarray:
        """HxW uint8 mask with values {0, 1}."""
        raise NotImplementedError

    # --- shared machinery -----------------------------------------------------------------------------------
    def _raise_missing(self, path: Path, what: str) -> NoReturn:
        raise DatasetNotFoundError(what=f"{self.name} {what} {path} does not exist",
                                   expected=f"(relative to data_root={self.data_root}):\n{self.expected_tree}")

    def _require(self, path: Path, what: str, is_dir: bool = True) -> None:
        if not (path.is_dir() if is_dir else path.is_file()):
            self._raise_missing(path, what)

    def _problem(self, message: str, error=DatasetCorruptedError) -> None:
        """Raise `error(message)`, or record it when collecting problems (check-data)."""
        if not self.collect_problems:
            raise error(message)
        self.problems.append(message)

    def _where(self, source: SampleSource) -> str:
        return f"{self.name}/{self.split} sample {source.image_name!r}"

    def __getitem__(self, idx: int) -> dict:
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise TypeError(f"{self.name} index must be an int, got {type(idx).__name__}")
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}/{self.split} index {idx} out of range for {n} samples")
        idx = int(idx) % n
        source = self._source(idx)
        use_cache = self._cache_budget > 0 and not self.include_eval_extras
        pixels = self._cache.get(idx) if use_cache else None
        if pixels is None:
            image, mask = self._decode(source, idx)
            pixels = self._letterboxed(image, mask)
            if use_cache:
                self._remember(idx, pixels)
            if self.include_eval_extras:
                return self._build_sample(pixels, source, extras={
                    "orig_masks": torch.from_numpy(np.ascontiguousarray(mask)), "answer": source.answer})
        return self._build_sample(pixels, source)

    def _decode(self, source: SampleSource, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) as read from disk; the image may be a reduced decode (fast_decode), the mask is full size."""
        try:
            if self.fast_decode:
                image, image_hw = read_image_for_letterbox(source.image_path, self.image_size)
            else:
                image = read_image_rgb(source.image_path)
                image_hw = image.shape[:2]
            mask = self._load_mask(idx, source, image_hw)
        except DatasetNotFoundError as err:
            raise DatasetNotFoundError(f"{self._where(source)}: {err}") from err
        except DatasetCorruptedError as err:
            raise DatasetCorruptedError(f"{self._where(source)}: {err}") from err
        if mask.shape != tuple(image_hw):
            raise DatasetCorruptedError(
                what=f"mask is {mask.shape[0]}x{mask.shape[1]} but image {source.image_path} is "
                     f"{image_hw[0]}x{image_hw[1]}", where=self._where(source), expected="the same size")
        return image, mask

    def _letterboxed(self, image: np.ndarray, mask: np.ndarray) -> tuple:
        """(uint8 [3,S,S] image, uint8 [1,S,S] mask, geometry, original (H, W)): what the cache keeps."""
        image_chw, geometry = letterbox_image(image, self.image_size, orig_hw=mask.shape)
        mask_t, _ = letterbox_mask(mask, self.image_size)
        return image_chw, mask_t, geometry, (int(mask.shape[0]), int(mask.shape[1]))

    def _remember(self, idx: int, pixels: tuple) -> None:
        size = pixels[0].nbytes + pixels[1].nbytes
        if self._cache_bytes + size > self._cache_budget:
            warning_once(f"{self.name}/{self.split}: the sample cache is full ({len(self._cache)} samples, "
                         f"{self._cache_bytes / 2**30:.2f} GB = data.cache_gb); the other samples are decoded "
                         f"every epoch")
            return
        self._cache[idx] = pixels
        self._cache_bytes += size

    def _build_sample(self, pixels: tuple, source: SampleSource, extras: dict | None = None) -> dict:
        image_chw, mask_t, geometry, orig_size = pixels
        # a cached mask is handed out as a copy: nothing downstream can change the cache in place
        sample: dict = {"images": normalize_image(image_chw), "masks": mask_t.clone() if self._cache_budget else mask_t}
        if self._text is not None:
            sample.update(self._truncated(self._text(source.instruction, source.answer), source))
        else:
            sample["dataset_type"] = self.dataset_type
        sample.update(
            image_name=source.image_name,
            image_path=str(source.image_path),
            orig_size=orig_size,
            letterbox=geometry.to_dict(),
            question=source.instruction,
        )
        sample.update(extras or {})
        return sample

    def _truncated(self, text: dict, source: SampleSource) -> dict:
        """Cut the question payload so the text fits `max_text_tokens` (see the class docstring)."""
        if self.max_text_tokens is None:
            return text
        payloads = ("token_refer_id", "token_answer_id")
        placeholders = sum(int(text[k].sum()) for k in ("refer_embedding_indices", "answer_embedding_indices")
                           if k in text)
        used = len(text["input_ids"]) - placeholders + sum(len(text[k]) for k in payloads if k in text)
        excess = used - self.max_text_tokens
        if excess <= 0:
            return text
        refer = text["token_refer_id"]
        keep = max(len(refer) - 1 - excess, 0)
        text["token_refer_id"] = torch.cat([refer[:keep], refer[-1:]])  # the last id is [SEG]
        warning_once(f"{self._where(source)}: the question has {len(refer) - 1} tokens but only {keep} fit the "
                     f"{self.max_text_tokens} text positions (data.max_length and the LLM's "
                     f"max_position_embeddings, minus the prompt, answer and image tokens); truncated to {keep}")
        return text

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop (accelerate's DataLoader) at the start of every epoch."""
        self.epoch = int(epoch)

    def _random_index(self, n: int, idx: int) -> int:
        """Uniform draw in [0, n) that depends only on (seed, epoch, idx): the same sample in the same
        epoch gets the same choice in every run, whatever was drawn before (exact resume)."""
        return int(np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, idx]).integers(n))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, samples={len(self)}, "
                f"image_size={self.image_size}, train={self.train})")
