"""Translate the reference's configuration files into a `SegEarthR1Config`.

A released checkpoint's `config.json` (model_type `llava_phi`) carries the LLM and connector; the
mask head's dimensions live in a detectron2-style YAML (`maskformer2_swin_base_384_bs16_50ep.yaml`)
with a `_BASE_` chain. We read only the keys that shape the model (`MODEL.SWIN.*`,
`MODEL.SEM_SEG_HEAD.*`, `MODEL.MASK_FORMER.*`); everything else in those files is ignored."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from .config_io import deep_merge
from .configuration import PHI_1_5_TEXT_CONFIG, SegEarthR1Config
from .errors import CheckpointNotFoundError

logger = logging.getLogger(__name__)

REFERENCE_MODEL_TYPES = ("llava_phi", "llava_llama", "segearth_r1", "psalm")

# LLM keys of a llava_phi config.json that belong to the text config.
_PHI_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "partial_rotary_factor", "resid_pdrop", "embd_pdrop", "attention_dropout",
             "layer_norm_eps", "hidden_act", "max_position_embeddings", "rope_theta", "rope_scaling",
             "initializer_range", "qk_layernorm", "bos_token_id", "eos_token_id", "tie_word_embeddings")
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "initializer_range", "bos_token_id", "eos_token_id", "tie_word_embeddings",
               "attention_bias", "mlp_bias", "head_dim", "pretraining_tp")


def load_mask_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a detectron2-style YAML, resolving its `_BASE_` chain (relative to each file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"mask config {path} not found; pass the reference's maskformer2 YAML (e.g. "
            f"configs/mask2former/maskformer2_swin_base_384_bs16_50ep.yaml) with its _BASE_ files beside it")
    resolved = path.resolve()
    if resolved in _seen:
        raise ValueError(f"_BASE_ cycle in mask config: {' -> '.join(map(str, _seen + (resolved,)))}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"mask config {path} must be a YAML mapping, found {type(data).__name__}")
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    parent = load_mask_config(path.parent / base, _seen + (resolved,))
    return deep_merge(parent, data)


def _get(cfg: dict, dotted: str, default=None):
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def mask_config_to_sections(mask_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sub-config dicts (vision, pixel_decoder, mask_decoder, loss) a mask-config YAML defines.
    Keys absent from the YAML keep our defaults (= the reference's Swin-B values)."""
    vision, pixel, decoder, loss = {}, {}, {}, {}
    for ours, theirs in (("embed_dim", "EMBED_DIM"), ("depths", "DEPTHS"), ("num_heads", "NUM_HEADS"),
                         ("window_size", "WINDOW_SIZE"), ("mlp_ratio", "MLP_RATIO"),
                         ("drop_path_rate", "DROP_PATH_RATE"), ("patch_size", "PATCH_SIZE")):
        value = _get(mask_cfg, f"MODEL.SWIN.{theirs}")
        if value is not None:
            vision[ours] = value
    for ours, theirs in (("conv_dim", "CONVS_DIM"), ("mask_dim", "MASK_DIM"),
                         ("num_encoder_layers", "TRANSFORMER_ENC_LAYERS"), ("common_stride", "COMMON_STRIDE"),
                         ("transformer_in_features", "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")):
        value = _get(mask_cfg, f"MODEL.SEM_SEG_HEAD.{theirs}")
        if value is not None:
            pixel[ours] = value
    # The reference pixel decoder takes its heads and dropout from MASK_FORMER (FFN fixed at 1024).
    for ours, theirs in (("num_heads", "NHEADS"), ("dropout", "DROPOUT")):
        value = _get(mask_cfg, f"MODEL.MASK_FORMER.{theirs}")
        if value is not None:
            pixel[ours] = value
    for ours, theirs in (("hidden_dim", "HIDDEN_DIM"), ("num_queries", "NUM_OBJECT_QUERIES"),
                         ("num_heads", "NHEADS"), ("dim_feedforward", "DIM_FEEDFORWARD"),
                         ("pre_norm", "PRE_NORM"), ("enforce_input_project", "ENFORCE_INPUT_PROJ")):
        value = _get(mask_cfg, f"MODEL.MASK_FORMER.{theirs}")
        if value is not None:
            decoder[ours] = value
    dec_layers = _get(mask_cfg, "MODEL.MASK_FORMER.DEC_LAYERS")
    if dec_layers is not None:
        if dec_layers < 2:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS={dec_layers}: the reference builds DEC_LAYERS - 1 >= 1 layers")
        decoder["num_layers"] = int(dec_layers) - 1
    for ours, theirs in (("num_points", "TRAIN_NUM_POINTS"), ("oversample_ratio", "OVERSAMPLE_RATIO"),
                         ("importance_sample_ratio", "IMPORTANCE_SAMPLE_RATIO"), ("mask_weight", "MASK_WEIGHT"),
                         ("dice_weight", "DICE_WEIGHT"), ("class_weight", "CLASS_WEIGHT"),
                         ("deep_supervision", "DEEP_SUPERVISION")):
        value = _get(mask_cfg, f"MODEL.MASK_FORMER.{theirs}")
        if value is not None:
            loss[ours] = value
    return {"vision": vision, "pixel_decoder": pixel, "mask_decoder": decoder, "loss": loss}


def text_config_from_reference(release: dict[str, Any]) -> dict[str, Any]:
    """The LLM part of a reference config.json as a text-config dict with `model_type`."""
    model_type = release.get("model_type", "llava_phi")
    if "llama" in model_type:
        keys, text = _LLAMA_KEYS, {"model_type": "llama"}
    else:
        keys, text = _PHI_KEYS, dict(PHI_1_5_TEXT_CONFIG)
    for key in keys:
        if key in release:
            text[key] = release[key]
    text["tie_word_embeddings"] = bool(release.get("tie_word_embeddings", False))
    return text


def is_reference_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") in REFERENCE_MODEL_TYPES or "mm_projector_type" in data


def config_from_reference(release: dict[str, Any], mask_cfg: dict[str, Any] | None,
                          image_size: int = 1024, **overrides) -> SegEarthR1Config:
    """`SegEarthR1Config` for a reference release (its config.json dict + its mask-config dict)."""
    if mask_cfg is None:
        logger.warning("no mask config given for a reference checkpoint: using the reference defaults "
                       "(Swin-B + maskformer2_swin_base_384_bs16_50ep values)")
        mask_cfg = {}
    sections = mask_config_to_sections(mask_cfg)
    connector = {"kind": release.get("mm_projector_type", "SparseConv_1")}
    return SegEarthR1Config(text_config=text_config_from_reference(release), image_size=image_size,
                            connector=connector, **sections, **overrides)
