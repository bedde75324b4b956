"""Run-config schema and the reference command-line flags.

`resolve_run_config` turns a YAML file + `--set` overrides + reference-style flags into one
validated dict (saved as resolved_config.yaml with each run). Sections:
    model  SegEarthR1Config fields (+ `mask_config`: a reference mask-config YAML to read dims from)
    init   where weights come from (local paths only)
    data   dataset, root, splits and sampling
    train  HF TrainingArguments fields (+ `resume`)
    eval   evaluation options used after training
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config_io import (apply_overrides, check_known_keys, deep_merge, expand_env, load_yaml_config, parse_value,
                         set_dotted)
from ..data.base import check_cache_gb
from ..data.registry import canonical_dataset, foreground_choices
from ..data.spec import SAMPLING_MODES
from .typecheck import check_section, dataclass_hints

MODEL_KEYS = ("text_config", "image_size", "vision", "connector", "description_projector", "pixel_decoder",
              "mask_decoder", "loss", "lora", "llm_attn_implementation", "mask_config")
def _strict(cls, data: dict, section: str):
    check_known_keys(data, [f.name for f in dataclasses.fields(cls)], f"{section}.")
    return cls(**data)


@dataclass
class InitArgs:
    """Local weights to start from. `llm_path` None = a randomly initialised LLM from model.text_config
    (tests, the CPU quickstart); `mask2former_path` None = random encoder/decoders."""

    llm_path: str | None = None
    mask2former_path: str | None = None
    tokenizer_path: str | None = None  # default: llm_path

    def __post_init__(self):
        if self.llm_path is None and self.tokenizer_path is None:
            raise ValueError("init.tokenizer_path is required when init.llm_path is not set (the tokenizer must "
                             "come from a local directory)")


@dataclass
class DataArgs:
    dataset: str = "EarthReason"
    data_path: str = "datasets"
    train_split: str = "train"
    eval_split: str = "val"
    question_sampling: str = "first"  # which of a sample's texts (data/spec.py): first | random | all
    foreground: str = "255"  # mask foreground of datasets with a choice (RefSegRS): "255" (reference) | "nonzero"
    max_length: int | None = 2048  # model_max_length: longer prompts are truncated by the collator
    # GB of decoded, letterboxed training samples kept in memory so later epochs skip the decode (0: off, as the
    # reference). Same samples either way; per data-loader worker (data/base.py)
    cache_gb: float = 0.0

    def __post_init__(self):
        self.dataset = canonical_dataset(self.dataset)
        if self.question_sampling not in SAMPLING_MODES:
            raise ValueError(f"data.question_sampling={self.question_sampling!r}; choose one of {list(SAMPLING_MODES)}")
        if str(self.foreground) not in foreground_choices():
            raise ValueError(f"data.foreground={self.foreground!r}; choose one of {list(foreground_choices())}")
        self.foreground = str(self.foreground)
        check_cache_gb(self.cache_gb, "data.cache_gb")


@dataclass
class EvalArgs:
    batch_size: int = 1
    num_vis: int = 20
    split: str | None = None  # default: data.eval_split
    run_after_training: bool = False


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


# The training recipe (DESIGN.md §5) and the settings this code needs: the one place these values live.
# A run config's `train:` section holds only what differs (configs/base.yaml: DeepSpeed, bf16, gradient
# checkpointing, workers); `resolve_run_config` fills the rest in from here, so resolved_config.yaml shows
# every value a run used.
DEFAULT_TRAIN_ARGS = {
    "output_dir": "outputs/run",
    "num_train_epochs": 15,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # ratio of the total steps (float < 1)
    "logging_steps": 10,
    "save_strategy": "epoch",
    "report_to": [],
    "remove_unused_columns": False,  # our batch dict carries lists and strings the model needs
    "dataloader_num_workers": 2,
    "seed": 42,
    # HF replaces a NaN/Inf loss by the running mean in its log ("loss 0" while the parts are nan);
    # the non-finite guard stops such a run, and the log shows the real value.
    "logging_nan_inf_filter": False,
}

# Ours, not TrainingArguments: resume, and the non-finite guard (error: stop at the first NaN/Inf loss;
# skip: skip up to nonfinite_max_skips such steps, then stop).
OUR_TRAIN_KEYS = ("resume", "nonfinite", "nonfinite_max_skips")
OUR_TRAIN_TYPES = {"resume": bool, "nonfinite": typing.Literal["error", "skip"], "nonfinite_max_skips": int}
# Older TrainingArguments names the reference scripts use -> their current equivalents
# (transformers 5 takes a warmup ratio as a float warmup_steps < 1).
TRAIN_ALIASES = {"warmup_ratio": "warmup_steps"}


def apply_train_aliases(train: dict) -> dict:
    for old, new in TRAIN_ALIASES.items():
        if old in train:
            if new in train and train[new] != train[old]:
                raise ValueError(f"train.{old} and train.{new} are both set; {old} is an alias of {new}")
            train[new] = train.pop(old)
    return train


def validate_train_section(train: dict) -> None:
    valid = _training_argument_names() | set(OUR_TRAIN_KEYS) | set(TRAIN_ALIASES)
    check_known_keys(train, sorted(valid), "train.", valid_note="train.* takes HF TrainingArguments fields")
    check_section("train", train, _train_types())
    if train.get("nonfinite_max_skips", 0) < 0:
        raise ValueError(f"train.nonfinite_max_skips={train['nonfinite_max_skips']} must be >= 0")


@functools.lru_cache(maxsize=1)
def _train_types() -> dict:
    from transformers import TrainingArguments

    hints = dataclass_hints(TrainingArguments) | OUR_TRAIN_TYPES
    return hints | {old: hints[new] for old, new in TRAIN_ALIASES.items()}


def validate_run_config(config: dict) -> dict:
    """Check every section; returns the config with typed sub-sections (as plain dicts)."""
    from ..configuration import SegEarthR1Config

    model = dict(config.get("model", {}))
    check_known_keys(model, MODEL_KEYS, "model.")
    SegEarthR1Config(**build_model_kwargs(model))  # raises on bad sub-keys / values
    validate_train_section(config.get("train", {}))
    # The resolved config is complete and canonical (defaults filled in, dataset names normalised).
    for section, cls in (("init", InitArgs), ("data", DataArgs), ("eval", EvalArgs)):
        values = config.get(section, {})
        check_section(section, {k: v for k, v in values.items() if k != "foreground"}, dataclass_hints(cls))
        config[section] = dataclasses.asdict(_strict(cls, values, section))
    return config


def build_model_kwargs(model_section: dict) -> dict:
    """SegEarthR1Config kwargs from the model section; a `mask_config` YAML supplies the decoder dims
    (explicit model keys win over it)."""
    from ..weights.reference_config import load_mask_config, mask_config_to_sections

    model = dict(model_section)
    mask_config = model.pop("mask_config", None)
    if mask_config:
        sections = mask_config_to_sections(load_mask_config(mask_config))
        model = deep_merge({k: v for k, v in sections.items() if v}, model)
    return model


# ------------------------------------------------------------------------------------------------
# reference command-line flags (PSALM/SegEarth-R1 scripts/train.sh) -> config paths

REFERENCE_FLAG_PATHS: dict[str, str] = {
    "data_path": "data.data_path",
    "model_name_or_path": "init.llm_path",
    "vision_tower": "init.mask2former_path",
    "mask_config": "model.mask_config",
    "dataset_type": "data.dataset",
    "mm_projector_type": "model.connector.kind",
    "model_max_length": "data.max_length",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_enable": "model.lora.enabled",
    "question_sampling": "data.question_sampling",
    "sentence_sampling": "data.question_sampling",  # the reference's RRSIS-D name of the same switch
    "tokenizer_path": "init.tokenizer_path",
}
# Flags of the reference scripts that configure features we do not have or that are fixed here;
# accepted (so a reference command runs unchanged) and reported as ignored.
REFERENCE_NOOP_FLAGS = ("version", "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token",
                        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "lazy_preprocess", "group_by_modality_length",
                        "seg_task", "json_path", "region_json_path", "panoptic_json_path", "ref_coco_path",
                        "ref_coco_plus_path", "ref_coco_g_path", "image_folder", "refcoco_image_folder",
                        "mmconv_path", "mm_vision_select_layer", "pretrain_mm_mlp_adapter", "with_norm",
                        "with_layernorm", "projector_outdim", "swin_type", "bits", "double_quant", "quant_type",
                        "mm_projector_lr", "freeze_backbone", "lora_bias", "lora_weight_path")


def split_cli_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """`--key value` / `--key=value` / `--flag` (-> "true") pairs from leftover argv."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; flags look like --name value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def apply_reference_flags(config: dict, pairs: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Map reference flags and HF TrainingArguments flags onto the config. Returns (config, ignored)."""
    training_names = _training_argument_names() | set(OUR_TRAIN_KEYS) | set(TRAIN_ALIASES)
    ignored, unknown = [], []
    for key, raw in pairs:
        value = parse_value(raw)
        if key in REFERENCE_FLAG_PATHS:
            set_dotted(config, REFERENCE_FLAG_PATHS[key], value)
        elif key == "train_backbone":
            set_dotted(config, "model.vision.frozen", not bool(value))
        elif key in training_names:
            set_dotted(config, f"train.{TRAIN_ALIASES.get(key, key)}", value)
        elif key in REFERENCE_NOOP_FLAGS:
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown flag(s) {['--' + k for k in unknown]}: not a segearthr1 option, a reference "
                         "train.sh flag or an HF TrainingArguments field (see python -m segearthr1.train --help)")
    return config, ignored


def resolve_run_config(config_path: str | Path | None, overrides: list[str] | None = None,
                       flag_pairs: list[tuple[str, str]] | None = None) -> tuple[dict, list[str]]:
    """YAML (+ base chain) -> --set overrides -> reference/HF flags -> env expansion -> validation."""
    config = load_yaml_config(config_path) if config_path else {}
    for section in ("model", "init", "data", "train", "eval"):
        config.setdefault(section, {})
    config = apply_overrides(config, overrides or [])
    config, ignored = apply_reference_flags(config, flag_pairs or [])
    config = expand_env(config)
    config["train"] = {**DEFAULT_TRAIN_ARGS, **apply_train_aliases(config["train"])}
    validate_run_config(config)
    return config, ignored


def data_args(config: dict) -> DataArgs:
    return DataArgs(**config.get("data", {}))


def init_args(config: dict) -> InitArgs:
    return InitArgs(**config.get("init", {}))


def eval_args(config: dict) -> EvalArgs:
    return EvalArgs(**config.get("eval", {}))
