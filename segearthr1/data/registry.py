"""The dataset registry: every supported dataset, found by name or alias (case-insensitive).

Adding a dataset = one file with a `ReasoningSegDataset` subclass carrying its `DatasetSpec`, plus
one `register(...)` line below. The registry order fixes each dataset's synthetic random stream,
so new datasets are appended. Where the data lives by default: $SEGEARTH_DATA, else ./datasets.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..processing import PromptTemplate, TextEncoder, build_conversation as render_prompt
from .base import ReasoningSegDataset
from .earthreason import EarthReasonDataset
from .refsegrs import RefSegRSDataset
from .rrsisd import RRSISDDataset
from .spec import DatasetSpec

DATASETS: dict[str, type[ReasoningSegDataset]] = {}  # canonical name -> class, in registration order
DATA_ROOT_ENV = "SEGEARTH_DATA"


def _lookup() -> dict[str, str]:
    """lower-cased name or alias -> canonical name (derived on each call: tests may add entries)."""
    return {key.lower(): name for name, cls in DATASETS.items() for key in (name, *cls.spec.aliases)}


def register(cls: type[ReasoningSegDataset]) -> type[ReasoningSegDataset]:
    """Add `cls` under `cls.spec.name`; a name or alias already taken is an error."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"{cls.__name__} has no `spec = DatasetSpec(...)`; declare one to register it")
    taken = [k for k in (spec.name, *spec.aliases) if k.lower() in _lookup()]
    if taken:
        raise ValueError(f"dataset {spec.name}: name/alias {taken} already registered; choose unique names")
    DATASETS[spec.name] = cls
    return cls


for _cls in (EarthReasonDataset, RRSISDDataset, RefSegRSDataset):
    register(_cls)


def canonical_dataset(name: str) -> str:
    """The registered name of dataset `name` (a name or alias, any case)."""
    key = str(name).strip().lower()
    lookup = _lookup()
    if key not in lookup:
        raise ValueError(f"unknown dataset {name!r}: not supported; choose one of {list(DATASETS)} "
                         f"(aliases: {sorted(k for k in lookup if k not in {n.lower() for n in DATASETS})})")
    return lookup[key]


def get_spec(name: str) -> DatasetSpec:
    return DATASETS[canonical_dataset(name)].spec


def names_for_task(task: str) -> set[str]:
    """Lower-cased names and aliases of the datasets whose task is `task` (reasoning | referring)."""
    return {key for key, name in _lookup().items() if DATASETS[name].spec.task == task}


def foreground_choices() -> tuple[str, ...]:
    """Every value a run config's data.foreground may take: the rules of datasets that offer a choice."""
    rules = [r for cls in DATASETS.values() if len(cls.spec.foreground_rules) > 1 for r in cls.spec.foreground_rules]
    return tuple(dict.fromkeys(rules))


def synthetic_names() -> list[str]:
    """Registered datasets that have a look-alike data generator."""
    return [name for name, cls in DATASETS.items() if cls.spec.write_synthetic is not None]


def default_data_root() -> Path:
    """DATA_ROOT from $SEGEARTH_DATA, or ./datasets when unset."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "datasets")


def build_dataset(name: str, data_root, split: str, tokenizer, **kwargs) -> ReasoningSegDataset:
    """Instantiate dataset `name` (a name or alias); kwargs go to its constructor."""
    return DATASETS[canonical_dataset(name)](data_root if data_root is not None else default_data_root(), split,
                                             tokenizer, **kwargs)


# --- the prompt of a dataset, by name ---------------------------------------------------------------
def prompt_template(dataset: str, train: bool = True) -> PromptTemplate:
    """The prompt template dataset `dataset` uses for training (`train`) or evaluation."""
    return get_spec(dataset).prompt(train)


def build_conversation(dataset: str, train: bool = True) -> str:
    """The full prompt string of `dataset` (train or eval variant); identical for all its samples."""
    return render_prompt(prompt_template(dataset, train))


def encode_sample_text(tokenizer, dataset: str, instruction: str, answer: str | None = None,
                       train: bool = True) -> dict:
    """Text-side sample dict of a dataset (DESIGN §2.9 keys, matches prompts.pt).

    Returns input_ids, labels, token_refer_id, refer_embedding_indices, dataset_type, and for
    reasoning prompts token_answer_id, answer_embedding_indices (answer None or "" -> NO_TARGET_ANSWER).
    """
    return TextEncoder(tokenizer, prompt_template(dataset, train))(instruction, answer)
