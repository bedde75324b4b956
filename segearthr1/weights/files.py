"""Finding and reading the files of a model directory (nothing is downloaded).

Why separate: loading, evaluation and training initialisation all need "where are the weights of
this directory, read them, read its config.json, load its tokenizer", and each failure should name
the directory layout the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointCorruptedError, CheckpointNotFoundError
from .integrity import check_file, check_json

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MODEL_DIR_LAYOUT = ("expected a directory with config.json, model.safetensors (or sharded *.safetensors + "
                    "model.safetensors.index.json, or pytorch_model.bin) and tokenizer files "
                    "(tokenizer_config.json + vocab.json/merges.txt or tokenizer.json)")


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CheckpointNotFoundError(what=f"{what} directory {path} does not exist", hint=MODEL_DIR_LAYOUT)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(what=f"{path} not found", hint=MODEL_DIR_LAYOUT)
    return check_json(path)


def weight_paths(model_dir: Path) -> list[Path]:
    """The weight file(s) of `model_dir`, shards resolved through their index."""
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(read_json(path)["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointNotFoundError(what=f"{path} lists shards that are missing", found=missing)
            return [model_dir / s for s in shards]
        return [path]
    raise CheckpointNotFoundError(what=f"no weights in {model_dir}", expected=f"one of {list(WEIGHT_FILES)}",
                                  hint=MODEL_DIR_LAYOUT)


def load_state_dict_files(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or torch checkpoint, on CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_paths(model_dir):
        check_file(path)  # a truncated file is named here, not as a bare SafetensorError
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state.update(load_file(str(path), device="cpu"))
            except SafetensorError as err:
                raise CheckpointCorruptedError(what=f"{path} is damaged and cannot be read: {err}") from err
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    logger.info("read %d tensors from %s", len(state), model_dir)
    return state


class _DropForeignConfigWarning(logging.Filter):
    """AutoTokenizer reads config.json to guess the tokenizer class; for a model type transformers does
    not know (ours, `segearthr1`, or the reference `llava_phi`) it falls back to a bare config and warns
    "model of type `segearthr1` to instantiate a model of type ``" on every load. The tokenizer comes
    from tokenizer_config.json either way, so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type ``" not in record.getMessage()


def load_tokenizer(path: Path):
    """The tokenizer saved beside a checkpoint (local files only)."""
    from transformers import AutoTokenizer

    config_logger = logging.getLogger("transformers.configuration_utils")
    quiet = _DropForeignConfigWarning()
    config_logger.addFilter(quiet)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointNotFoundError(what=f"could not load a tokenizer from {path}: {err}",
                                      hint=MODEL_DIR_LAYOUT) from err
    finally:
        config_logger.removeFilter(quiet)
