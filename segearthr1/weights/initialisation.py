"""A model ready to train: LLM weights from a local HF directory, encoder/decoders from a Mask2Former `.pkl`.

Both copies are strict (every tensor named by `key_maps` and shape-checked); only the documented
Mask2Former gaps (`MASK2FORMER_EXPECTED_MISSING`) stay at their initial value, as in the reference.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from ..configuration import SegEarthR1Config
from ..errors import CheckpointNotFoundError
from ..modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from .embeddings import setup_tokenizer_and_embeddings
from .files import load_state_dict_files, load_tokenizer, read_json, require_dir
from .key_maps import ConversionReport, convert_mask2former_state_dict, llm_keys_from_hf, verify_keys

logger = logging.getLogger(__name__)

# Keys of an LLM's config.json that describe the file, not the model.
_LLM_FILE_KEYS = ("architectures", "transformers_version", "torch_dtype", "auto_map", "dtype")


def _copy_into(model: torch.nn.Module, state: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Copy `state` into `model` after checking that it has exactly `keys` with the model's shapes."""
    model_state = model.state_dict()
    verify_keys(state, keys, {k: tuple(v.shape) for k, v in model_state.items()})
    with torch.no_grad():
        for key, value in state.items():
            model_state[key].copy_(value.to(model_state[key].dtype))


def load_mask2former_weights(model: SegEarthR1ForReasoningSegmentation, pkl_path: str | Path) -> list[str]:
    """Initialise encoder, pixel decoder and transformer decoder from a Mask2Former `.pkl`
    (a pickled dict whose `model` entry maps names to numpy arrays). Returns the keys left at init."""
    pkl_path = Path(pkl_path)
    if not pkl_path.is_file():
        raise CheckpointNotFoundError(
            what=f"Mask2Former checkpoint {pkl_path} not found",
            expected="pretrained/Swin_base/model_final_54b88a.pkl (Mask2Former Swin-B COCO panoptic)")
    with open(pkl_path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    weights = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{pkl_path} is not a Mask2Former checkpoint: expected a dict with a 'model' mapping, "
                         f"found {type(data).__name__}; pass the model_final_*.pkl of the Mask2Former model zoo")
    state, left_at_init = convert_mask2former_state_dict(weights, model.state_dict().keys())
    _copy_into(model, state, [k for k in model.state_dict() if k in state])
    logger.info("initialised %d encoder/decoder tensors from %s; %d left at init: %s", len(state), pkl_path,
                len(left_at_init), left_at_init)
    return left_at_init


def load_llm_weights(model: SegEarthR1ForReasoningSegmentation, llm_dir: str | Path) -> ConversionReport:
    """Copy a local HF causal-LM checkpoint (Phi fused-4.36 or split layout, or LLaMA) into the model."""
    llm_dir = Path(llm_dir)
    require_dir(llm_dir, "LLM")
    report = ConversionReport()
    state = llm_keys_from_hf(load_state_dict_files(llm_dir), model.config.text_config.num_attention_heads, report)
    _copy_into(model, state, [k for k in model.state_dict() if k.startswith("language_model.")])
    logger.info("initialised the LLM from %s (%d tensors; %d fused q|k|v split; dropped %s)", llm_dir, len(state),
                len(report.fused_qkv_split), report.dropped)
    return report


def build_for_training(config: SegEarthR1Config, llm_dir: str | Path | None, mask2former_pkl: str | Path | None,
                       tokenizer_dir: str | Path | None = None):
    """A model ready to train: LLM config + weights from `llm_dir` (if given), encoder/decoders from
    `mask2former_pkl` (if given), tokenizer set up with `[PAD]`/`[SEG]`. Returns (model, tokenizer)."""
    tokenizer_dir = tokenizer_dir or llm_dir
    if tokenizer_dir is None:
        raise ValueError("build_for_training needs llm_dir or tokenizer_dir for the tokenizer; set init.llm_path "
                         "or init.tokenizer_path")
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    if llm_dir is not None:
        text = read_json(Path(llm_dir) / "config.json")
        text.setdefault("model_type", "phi")
        text_config = {k: v for k, v in text.items() if not k.startswith("_") and k not in _LLM_FILE_KEYS}
        config = SegEarthR1Config.from_dict({**config.to_dict(), "text_config": text_config})
    model = SegEarthR1ForReasoningSegmentation(config)
    if llm_dir is not None:
        load_llm_weights(model, llm_dir)
    if mask2former_pkl is not None:
        load_mask2former_weights(model, mask2former_pkl)
    setup_tokenizer_and_embeddings(model, tokenizer)
    return model, tokenizer
