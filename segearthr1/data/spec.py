"""What the rest of the package may know about a dataset, declared once per dataset file.

Each dataset class carries one `DatasetSpec` (`spec = DatasetSpec(...)`); the registry lists the
classes. Train, evaluate, predict, `check-data`, the synthetic generator and the CLIs read names,
aliases, the task, splits, the text-sampling switch and the foreground rule from here, so no module
branches on a dataset's name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..processing import DATASET_TYPES, TASK_OF_TYPE, PromptTemplate

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The text-sampling switch has one name everywhere: `question_sampling` (YAML data.question_sampling,
# --question_sampling, the dataset constructors); `sentence_sampling`, the reference's RRSIS-D
# spelling, is accepted as an alias by the dataset base class and the evaluate CLI.
SAMPLING_MODES = ("first", "random", "all")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's facts.

    sampling_modes: values of `question_sampling` (which of a sample's several questions/sentences
        is used); () = one text per sample, the switch does not apply.
    foreground_rules: how a mask's foreground is read; with more than one rule the dataset takes a
        `foreground` option (the first rule is the default).
    write_synthetic: `(root, seed, stream, counts, options) -> {split: samples}` writing look-alike
        data in the real layout (`data/synthetic.py`), or None when there is no generator.
    """

    name: str
    dataset_type: str
    expected_tree: str
    train_prompt: PromptTemplate
    eval_prompt: PromptTemplate
    aliases: tuple[str, ...] = ()
    splits: tuple[str, ...] = SPLITS
    sampling_modes: tuple[str, ...] = ()
    foreground_rules: tuple[str, ...] = ("nonzero",)
    write_synthetic: Callable | None = None

    def __post_init__(self):
        if self.dataset_type not in DATASET_TYPES:
            raise ValueError(f"dataset {self.name}: dataset_type={self.dataset_type!r} is not one of "
                             f"{list(DATASET_TYPES)}")
        for prompt in (self.train_prompt, self.eval_prompt):
            if prompt.dataset_type != self.dataset_type:
                raise ValueError(f"dataset {self.name} is {self.dataset_type} but one of its prompts is "
                                 f"{prompt.dataset_type}; use prompts of its own type")
        unknown = [m for m in self.sampling_modes if m not in SAMPLING_MODES]
        if unknown:
            raise ValueError(f"dataset {self.name}: sampling_modes {unknown} are not in {list(SAMPLING_MODES)}")
        if not self.foreground_rules:
            raise ValueError(f"dataset {self.name}: foreground_rules is empty; declare at least one rule")

    @property
    def task(self) -> str:
        """"reasoning" | "referring": the inference task (and prompt family) of this dataset."""
        return TASK_OF_TYPE[self.dataset_type]

    @property
    def default_foreground(self) -> str:
        return self.foreground_rules[0]

    def prompt(self, train: bool) -> PromptTemplate:
        return self.train_prompt if train else self.eval_prompt

    def check_option(self, option: str, value: str, allowed: tuple[str, ...]) -> str:
        """`value` if it is one of `allowed`, else a ValueError naming the dataset, option and choices."""
        if value not in allowed:
            raise ValueError(f"{self.name}: {option}={value!r} is not one of {list(allowed)}")
        return value

    def dataset_options(self, question_sampling: str = "first", foreground: str | None = None) -> dict:
        """Constructor options for the switches this dataset has, so callers never branch on the
        dataset name. A sampling mode other than "first" for a one-text dataset is logged; the run
        config's `foreground` (default "255") is simply unused by fixed-rule datasets."""
        options: dict = {}
        if self.sampling_modes:
            options["question_sampling"] = question_sampling
        elif question_sampling != "first":
            logger.warning("question_sampling=%s has no effect on %s: it has one text per sample",
                           question_sampling, self.name)
        if len(self.foreground_rules) > 1:
            options["foreground"] = foreground or self.default_foreground
        return options
