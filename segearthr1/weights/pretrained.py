"""Loading and saving models from local directories (nothing is downloaded).

- `load_pretrained(model_dir)`: our HF-style checkpoints *and* reference release directories
  (`model_type` `llava_phi`, reference parameter names, + the mask-config YAML).
- `save_pretrained(model, tokenizer, out_dir)`: config.json + safetensors + tokenizer files.
Export in the reference layout is `export.py`; a fresh model for training is `initialisation.py`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..configuration import SegEarthR1Config
from ..errors import CheckpointNotFoundError
from ..modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from ..processing import SEG_TOKEN
from ..runtime import resolve_device, resolve_dtype
from .files import load_state_dict_files, load_tokenizer, read_json, require_dir
from .key_maps import convert_upstream_state_dict, verify_keys
from .reference_config import REFERENCE_IMAGE_SIZE, config_from_reference, is_reference_config, load_mask_config

logger = logging.getLogger(__name__)



@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip random initialisation while building a model whose every parameter is loaded next
    (the strict load guarantees nothing is left uninitialised). Saves minutes at full size."""
    names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _token_ids(tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    if SEG_TOKEN not in vocab:
        raise ValueError(f"tokenizer has no {SEG_TOKEN} token; a SegEarth-R1 checkpoint's tokenizer must have it "
                         "(set it up with segearthr1.processing.setup_tokenizer)")
    return {"seg_token_id": vocab[SEG_TOKEN], "pad_token_id": tokenizer.pad_token_id}


def _config_of(model_dir: Path, raw: dict, ids: dict[str, int], mask_config, image_size) -> SegEarthR1Config:
    """Our config for the directory: translated for a reference release, read as saved for ours."""
    if is_reference_config(raw):
        mask_cfg = load_mask_config(mask_config) if mask_config is not None else None
        logger.info("%s is a reference release (model_type %s); mask config: %s", model_dir, raw.get("model_type"),
                    mask_config or "reference defaults")
        return config_from_reference(raw, mask_cfg, image_size=image_size or REFERENCE_IMAGE_SIZE, **ids)
    if raw.get("model_type") != SegEarthR1Config.model_type:
        raise CheckpointNotFoundError(
            what=f"{model_dir} is not a SegEarth-R1 checkpoint: its config.json has model_type "
                 f"{raw.get('model_type')!r}",
            expected=f"{SegEarthR1Config.model_type!r} (ours) or a reference release ('llava_phi')")
    if mask_config is not None:
        logger.warning("--mask_config is ignored for %s: our checkpoints carry the full config", model_dir)
    config = SegEarthR1Config.from_dict(raw)
    if image_size is not None and image_size != config.image_size:
        raise ValueError(f"image_size={image_size} differs from the checkpoint's {config.image_size}; the "
                         "connector's LayerNorm shapes depend on it, so drop image_size for our checkpoints")
    return config


def load_pretrained(model_dir: str | Path, mask_config: str | Path | None = None, device: str | torch.device | None = "cpu",
                    dtype: str | torch.dtype | None = None, image_size: int | None = None):
    """Load (model, tokenizer) from our checkpoint directory or a reference release directory.

    Args:
        model_dir: directory with config.json, weights and tokenizer files.
        mask_config: the reference mask-config YAML (only for reference releases; its `_BASE_` chain
            is followed). Defaults to the reference Swin-B values when omitted.
        device: "cpu", "cuda", "auto" or a torch.device.
        dtype: "auto" (bf16 on CUDA, fp32 otherwise), "fp32", "bf16", "fp16" or a torch.dtype.
        image_size: override the letterbox size of a reference release (default 1024).
    Loading is strict: missing keys are an error; unexpected keys only from the documented drop list.
    """
    model_dir = Path(model_dir)
    require_dir(model_dir, "model")
    raw = read_json(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir)
    config = _config_of(model_dir, raw, _token_ids(tokenizer), mask_config, image_size)
    with skip_init():
        model = SegEarthR1ForReasoningSegmentation(config)
    state = load_state_dict_files(model_dir)
    model_state = model.state_dict()
    if is_reference_config(raw):
        state, report = convert_upstream_state_dict(state, config.text_config.num_attention_heads)
        logger.info("converted reference weights: %s", report.summary())
    verify_keys(state, model_state.keys(), {k: tuple(v.shape) for k, v in model_state.items()})
    model.load_state_dict(state, strict=True)
    device = resolve_device(device)
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.eval()
    logger.info("loaded SegEarth-R1 from %s (%s, %s)", model_dir, device, next(model.parameters()).dtype)
    return model, tokenizer


def save_pretrained(model: SegEarthR1ForReasoningSegmentation, tokenizer, out_dir: str | Path,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors + tokenizer files (+ optional text files, e.g. the
    resolved run config) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    logger.info("saved model and tokenizer to %s", out_dir)
    return out_dir
