"""The reference's configuration files <-> `SegEarthR1Config`: one table, read in both directions.

A released checkpoint's `config.json` (model_type `llava_phi`) carries the LLM and the connector; the
mask head's dimensions live in a detectron2-style YAML (`maskformer2_swin_base_384_bs16_50ep.yaml`)
with a `_BASE_` chain. `MASK_CONFIG_TABLE` and `RELEASE_CONFIG_TABLE` pair each reference key with our
field(s); loading a release (reference -> ours) and exporting one (ours -> reference) both walk them,
as `key_maps.UPSTREAM_KEY_MAP` does for parameter names. Other keys of the reference files are ignored.
`NOT_IN_REFERENCE` lists our fields the reference format cannot carry (a loaded release gets their
defaults, which are the reference's hard-coded values).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config_io import deep_merge
from ..configuration import PHI_1_5_TEXT_CONFIG, REFERENCE_CONNECTOR_NAMES, SegEarthR1Config
from ..errors import CheckpointNotFoundError

logger = logging.getLogger(__name__)

REFERENCE_MODEL_TYPES = ("llava_phi", "llava_llama", "segearth_r1", "psalm")
# The reference letterboxes to 1024² and its config.json does not say so.
REFERENCE_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Entry:
    """One reference key and the field(s) of ours it sets (dotted, e.g. `vision.embed_dim`)."""

    reference: str
    ours: tuple[str, ...]
    offset: int = 0  # reference value = ours + offset (DEC_LAYERS counts one layer more than it builds)
    names: Mapping[str, str] = field(default_factory=dict)  # reference spelling -> ours, for choices

    def to_ours(self, value: Any) -> Any:
        if self.offset:
            built = int(value) - self.offset
            if built < 1:
                raise ValueError(f"{self.reference}={value}: the reference builds {self.reference} - {self.offset} "
                                 f"layers, so it must be >= {self.offset + 1}")
            return built
        return self.names.get(value, value) if isinstance(value, str) else value

    def to_reference(self, value: Any) -> Any:
        if self.offset:
            return value + self.offset
        if isinstance(value, str):
            return {ours: ref for ref, ours in self.names.items()}.get(value, value)
        return list(value) if isinstance(value, tuple) else value


def _entries(prefix: str, ours_prefix: str, pairs: tuple[tuple[str, str], ...]) -> list[Entry]:
    return [Entry(f"{prefix}.{ref}", (f"{ours_prefix}.{ours}",)) for ref, ours in pairs]


# The mask-config YAML (MODEL.SWIN / SEM_SEG_HEAD / MASK_FORMER). The reference pixel decoder takes its
# heads and dropout from MASK_FORMER (its FFN is fixed at 1024), so NHEADS feeds both decoders.
MASK_CONFIG_TABLE: list[Entry] = [
    *_entries("MODEL.SWIN", "vision", (
        ("EMBED_DIM", "embed_dim"), ("DEPTHS", "depths"), ("NUM_HEADS", "num_heads"), ("WINDOW_SIZE", "window_size"),
        ("MLP_RATIO", "mlp_ratio"), ("DROP_PATH_RATE", "drop_path_rate"), ("PATCH_SIZE", "patch_size"))),
    *_entries("MODEL.SEM_SEG_HEAD", "pixel_decoder", (
        ("CONVS_DIM", "conv_dim"), ("MASK_DIM", "mask_dim"), ("TRANSFORMER_ENC_LAYERS", "num_encoder_layers"),
        ("COMMON_STRIDE", "common_stride"),
        ("DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "transformer_in_features"))),
    Entry("MODEL.MASK_FORMER.NHEADS", ("pixel_decoder.num_heads", "mask_decoder.num_heads")),
    Entry("MODEL.MASK_FORMER.DROPOUT", ("pixel_decoder.dropout",)),
    *_entries("MODEL.MASK_FORMER", "mask_decoder", (
        ("HIDDEN_DIM", "hidden_dim"), ("NUM_OBJECT_QUERIES", "num_queries"), ("DIM_FEEDFORWARD", "dim_feedforward"),
        ("PRE_NORM", "pre_norm"), ("ENFORCE_INPUT_PROJ", "enforce_input_project"))),
    Entry("MODEL.MASK_FORMER.DEC_LAYERS", ("mask_decoder.num_layers",), offset=1),
    *_entries("MODEL.MASK_FORMER", "loss", (
        ("TRAIN_NUM_POINTS", "num_points"), ("OVERSAMPLE_RATIO", "oversample_ratio"),
        ("IMPORTANCE_SAMPLE_RATIO", "importance_sample_ratio"), ("MASK_WEIGHT", "mask_weight"),
        ("DICE_WEIGHT", "dice_weight"), ("CLASS_WEIGHT", "class_weight"), ("DEEP_SUPERVISION", "deep_supervision"))),
]

# LLM keys of a release config.json, per LLM family (same name in the text config).
_PHI_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "partial_rotary_factor", "resid_pdrop", "embd_pdrop", "attention_dropout",
             "layer_norm_eps", "hidden_act", "max_position_embeddings", "rope_theta", "rope_scaling",
             "initializer_range", "qk_layernorm", "bos_token_id", "eos_token_id", "tie_word_embeddings")
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "initializer_range", "bos_token_id", "eos_token_id", "tie_word_embeddings",
               "attention_bias", "mlp_bias", "head_dim", "pretraining_tp")
TEXT_CONFIG_TABLES: dict[str, list[Entry]] = {
    family: [Entry(key, (f"text_config.{key}",)) for key in keys]
    for family, keys in (("phi", _PHI_KEYS), ("llama", _LLAMA_KEYS))}

# The release config.json besides the LLM keys. `SparseConv_1` is the reference's name of our `sparse_conv`.
RELEASE_CONFIG_TABLE: list[Entry] = [
    Entry("mm_projector_type", ("connector.kind",), names=REFERENCE_CONNECTOR_NAMES),
]
# Written on export, not read: what the reference loader expects of a Phi release.
RELEASE_FIXED = {"model_type": "llava_phi", "architectures": ["SegEarthR1"], "transformers_version": "4.36.2"}

# Our fields the reference files cannot carry (hard-coded there, runtime choices or training-only).
NOT_IN_REFERENCE = ("image_size", "seg_token_id", "pad_token_id", "llm_attn_implementation", "compile",
                    "vision.frozen", "vision.train_mode_when_frozen", "vision.qkv_bias", "vision.patch_norm",
                    "connector.kernel_size", "connector.stride", "description_projector.*",
                    "pixel_decoder.num_points", "pixel_decoder.ffn_dim", "pixel_decoder.deform_attn_impl",
                    "mask_decoder.query", "mask_decoder.sdpa_attention", "loss.llm_weight", "lora.*")


_MISSING = object()


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    """`node["A"]["B"]` (dicts) or `node.a.b` (sub-configs) for `dotted="A.B"`; `default` if absent."""
    for part in dotted.split("."):
        if isinstance(node, dict):
            if part not in node:
                return default
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


# ------------------------------------------------------------------------------------------------
# reference -> ours

def load_mask_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a detectron2-style YAML, resolving its `_BASE_` chain (relative to each file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            what=f"mask config {path} not found",
            hint="pass the reference's maskformer2 YAML (e.g. configs/mask2former/swin/"
                 "maskformer2_swin_base_384_bs16_50ep.yaml) with its _BASE_ files beside it")
    resolved = path.resolve()
    if resolved in _seen:
        raise ValueError(f"_BASE_ cycle in mask config: {' -> '.join(map(str, _seen + (resolved,)))}; remove one "
                         "of the _BASE_ links")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"mask config {path} must be a YAML mapping, found {type(data).__name__}")
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    parent = load_mask_config(path.parent / base, _seen + (resolved,))
    return deep_merge(parent, data)


def _read(table: list[Entry], source: dict[str, Any]) -> dict[str, Any]:
    """Our (nested) fields set by the reference keys present in `source`."""
    out: dict[str, Any] = {}
    for entry in table:
        value = _get(source, entry.reference)
        if value is not None:
            for ours in entry.ours:
                _set(out, ours, entry.to_ours(value))
    return out


def mask_config_to_sections(mask_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sub-config dicts (vision, pixel_decoder, mask_decoder, loss) a mask-config YAML defines.
    Keys absent from the YAML keep our defaults (= the reference's Swin-B values)."""
    read = _read(MASK_CONFIG_TABLE, mask_cfg)
    return {name: read.get(name, {}) for name in ("vision", "pixel_decoder", "mask_decoder", "loss")}


def _text_family(model_type: str) -> str:
    return "llama" if "llama" in model_type else "phi"


def text_config_from_reference(release: dict[str, Any]) -> dict[str, Any]:
    """The LLM part of a reference config.json as a text-config dict with `model_type`."""
    family = _text_family(release.get("model_type", "llava_phi"))
    text = {"model_type": "llama"} if family == "llama" else dict(PHI_1_5_TEXT_CONFIG)
    text.update(_read(TEXT_CONFIG_TABLES[family], release).get("text_config", {}))
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
    release_fields = _read(RELEASE_CONFIG_TABLE, release)
    return SegEarthR1Config(text_config=text_config_from_reference(release), image_size=image_size,
                            **release_fields, **sections, **overrides)


# ------------------------------------------------------------------------------------------------
# ours -> reference

def _write(table: list[Entry], config: Any) -> dict[str, Any]:
    """The reference (nested) keys of `table` for `config`; fields it lacks are left out."""
    out: dict[str, Any] = {}
    for entry in table:
        values = [_get(config, ours, default=_MISSING) for ours in entry.ours]
        present = [v for v in values if v is not _MISSING]
        if not present:
            continue
        if any(v != present[0] for v in present[1:]):
            fields = ", ".join(f"{ours}={v}" for ours, v in zip(entry.ours, values))
            raise ValueError(f"the reference has one {entry.reference} for {', '.join(entry.ours)}; {fields} "
                             "differ and cannot be exported: make them equal")
        _set(out, entry.reference, entry.to_reference(present[0]))
    return out


def _text_dict(config: SegEarthR1Config) -> dict[str, Any]:
    """The text config as flat reference-era keys (transformers >= 5 nests rope_theta and
    partial_rotary_factor under rope_parameters; the 4.36 release has them at the top)."""
    text = config.text_config.to_dict()
    rope = text.pop("rope_parameters", None) or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            text.setdefault(key, rope[key])
    return text


def mask_config_from(config: SegEarthR1Config) -> dict[str, Any]:
    """The reference mask-config dict holding this config's encoder/decoder dimensions."""
    return _write(MASK_CONFIG_TABLE, config)


def release_config_from(config: SegEarthR1Config) -> dict[str, Any]:
    """The config.json of a reference release of this config (Phi LLMs only, as the reference)."""
    family = config.text_config.model_type
    if family != "phi":
        raise ValueError(f"text_config.model_type={family!r}: the reference release format (llava_phi) holds "
                         "Phi LLMs only; export a Phi model or save it with save_pretrained")
    text_fields = _write(TEXT_CONFIG_TABLES[family], {"text_config": _text_dict(config)})
    return {**text_fields, **_write(RELEASE_CONFIG_TABLE, config), **RELEASE_FIXED,
            "projector_outdim": config.llm_hidden_size}


def write_mask_config_yaml(config: SegEarthR1Config, path: str | Path) -> Path:
    """A reference-style mask-config YAML holding this config's encoder/decoder dimensions."""
    data = mask_config_from(config)
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
