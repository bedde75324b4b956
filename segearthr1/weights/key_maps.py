"""Checkpoint key conversion (pure functions, no file I/O): reference names <-> ours.

One ordered, anchored rename table maps every reference (upstream) parameter name to our module
tree; the inverse is derived for export. Conversion is strict: every source key must match a rule or
a documented drop pattern, and every model key must be produced, or `CheckpointKeyError` lists the
offenders (DESIGN.md §3). The Mask2Former (`.pkl`) table used to initialise training is here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointKeyError

# upstream prefix -> our prefix; first match wins (order matters: `model.vision_tower.` before `model.`).
# Identity rules are listed too, so coverage is total; the inverse (export) uses the same pairs.
UPSTREAM_KEY_MAP: list[tuple[str, str]] = [
    ("model.vision_tower.", "vision_encoder."),
    ("model.mm_projector.", "connector."),
    ("model.", "language_model.model."),  # embed_tokens, layers, final_layernorm (Phi) / norm (LLaMA)
    ("lm_head.", "language_model.lm_head."),
    ("text_projector.", "description_projector.text_projector."),
    ("origin_SEG_token_projector.", "description_projector.origin_SEG_token_projector."),
    ("local_project.", "description_projector.local_project."),
    ("SEG_token_projector.", "description_projector.SEG_token_projector."),
    ("d_layers.", "description_projector.d_layers."),
    ("pixel_decoder.", "pixel_decoder."),
    ("predictor.", "mask_decoder."),
]

# Reference entries that never take part in the computation and have no counterpart here.
# `seg_query` [100, H] is registered by the reference but unused (its own comment says so); rotary
# caches are non-persistent buffers that some exports still contain.
UPSTREAM_KEYS_TO_DROP: list[str] = [
    r"^seg_query$",
    r"rotary_emb\.(inv_freq|cos_cached|sin_cached|original_inv_freq)$",
]

# Our keys (after the table) of parameters that exist for checkpoint compatibility but are unused:
# the mask decoder's learned-query tables and SEG/CLASS projections (used only by the learned-query
# ablation). They are saved and loaded like any other parameter.
UNUSED_REFERENCE_PARAMETERS: list[str] = [
    "seg_query",
    "predictor.query_feat.weight",
    "predictor.query_embed.weight",
    "predictor.SEG_query_embed.weight",
    "predictor.new_query_embed.weight",
    "predictor.SEG_proj.layers.0.weight",
    "predictor.SEG_proj.layers.0.bias",
    "predictor.SEG_proj.layers.1.weight",
    "predictor.SEG_proj.layers.1.bias",
    "predictor.CLASS_proj.layers.0.weight",
    "predictor.CLASS_proj.layers.0.bias",
    "predictor.CLASS_proj.layers.1.weight",
    "predictor.CLASS_proj.layers.1.bias",
]

_FUSED_QKV = re.compile(r"^(?P<prefix>.*\.self_attn)\.query_key_value\.(?P<kind>weight|bias)$")
_SPLIT_QKV = re.compile(r"^(?P<prefix>.*\.self_attn)\.(?P<proj>q_proj|k_proj|v_proj)\.(?P<kind>weight|bias)$")


@dataclass
class ConversionReport:
    """What a conversion did: renamed keys, dropped keys and the rule each key used."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    fused_qkv_split: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.renamed)} keys renamed, {len(self.fused_qkv_split)} fused q|k|v tensors split, "
                f"{len(self.dropped)} unused keys dropped")


def _format_offenders(title: str, keys: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}):\n  {shown}{more}"


def rename_upstream_key(key: str) -> str | None:
    """Our name for a reference key, or None if no rule matches."""
    for upstream, ours in UPSTREAM_KEY_MAP:
        if key.startswith(upstream):
            return ours + key[len(upstream):]
    return None


def rename_to_upstream_key(key: str) -> str | None:
    """Inverse of `rename_upstream_key` (same table, read right to left)."""
    for upstream, ours in UPSTREAM_KEY_MAP:
        if key.startswith(ours):
            return upstream + key[len(ours):]
    return None


def split_fused_qkv(tensor: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers-4.36 Phi `query_key_value` rows are ordered (head, q|k|v, head_dim) -> q, k, v."""
    rows = tensor.shape[0]
    if rows % (3 * num_heads):
        raise ValueError(f"fused q|k|v tensor has {rows} rows, not divisible by 3 x {num_heads} heads; the "
                         "checkpoint's LLM does not match text_config.num_attention_heads")
    head_dim = rows // (3 * num_heads)
    grouped = tensor.reshape(num_heads, 3, head_dim, *tensor.shape[1:])
    return tuple(grouped[:, i].reshape(num_heads * head_dim, *tensor.shape[1:]).contiguous() for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `split_fused_qkv` (for exporting in the reference layout)."""
    head_dim = q.shape[0] // num_heads
    parts = [t.reshape(num_heads, head_dim, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * num_heads * head_dim, *q.shape[1:]).contiguous()


def split_fused_attention(state_dict: Mapping[str, torch.Tensor], num_heads: int,
                          report: ConversionReport | None = None) -> dict[str, torch.Tensor]:
    """Replace every `*.self_attn.query_key_value.{weight,bias}` by `q_proj/k_proj/v_proj` entries."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _FUSED_QKV.match(key)
        if not m:
            out[key] = value
            continue
        q, k, v = split_fused_qkv(value, num_heads)
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
            out[f"{m['prefix']}.{proj}.{m['kind']}"] = part
        if report is not None:
            report.fused_qkv_split.append(key)
    return out


def fuse_split_attention(state_dict: Mapping[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Inverse of `split_fused_attention`."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _SPLIT_QKV.match(key)
        if not m:
            out[key] = value
            continue
        group = pending.setdefault((m["prefix"], m["kind"]), {})
        group[m["proj"]] = value
        if len(group) == 3:
            out[f"{m['prefix']}.query_key_value.{m['kind']}"] = fuse_qkv(
                group["q_proj"], group["k_proj"], group["v_proj"], num_heads)
    incomplete = [f"{p}.*.{k}" for (p, k), g in pending.items() if len(g) != 3]
    if incomplete:
        raise CheckpointKeyError(what=_format_offenders("incomplete q/k/v groups", incomplete))
    return out


def convert_upstream_state_dict(state_dict: Mapping[str, torch.Tensor], num_heads: int,
                                model_keys: Iterable[str] | None = None,
                                ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Reference (release) names -> ours. Strict: unknown source keys and (when `model_keys` is given)
    missing model keys raise `CheckpointKeyError` listing the first 20 offenders."""
    report = ConversionReport()
    kept: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in UPSTREAM_KEYS_TO_DROP):
            report.dropped.append(key)
            continue
        new_key = rename_upstream_key(key)
        if new_key is None:
            unmatched.append(key)
            continue
        kept[new_key] = value
        report.renamed[key] = new_key
    if unmatched:
        raise CheckpointKeyError(what=_format_offenders(
            "checkpoint keys that match no rule of UPSTREAM_KEY_MAP and no drop pattern", unmatched))
    converted = split_fused_attention(kept, num_heads, report)
    if model_keys is not None:
        verify_keys(converted, model_keys)
    return converted, report


def convert_to_upstream_state_dict(state_dict: Mapping[str, torch.Tensor], num_heads: int,
                                   fuse_attention: bool = True) -> dict[str, torch.Tensor]:
    """Ours -> reference names (inverse table; Phi attention re-fused like the released checkpoints)."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state_dict.items():
        new_key = rename_to_upstream_key(key)
        if new_key is None:
            unmatched.append(key)
        else:
            out[new_key] = value
    if unmatched:
        raise CheckpointKeyError(what=_format_offenders("model keys without an upstream name", unmatched))
    return fuse_split_attention(out, num_heads) if fuse_attention else out


def verify_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str],
                model_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise `CheckpointKeyError` if keys are missing/unexpected or (given shapes) mis-shaped."""
    model_keys = list(model_keys)
    missing = sorted(set(model_keys) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_keys))
    problems = []
    if missing:
        problems.append(_format_offenders("missing keys (the model has them, the checkpoint does not)", missing))
    if unexpected:
        problems.append(_format_offenders("unexpected keys (the checkpoint has them, the model does not)", unexpected))
    if model_shapes is not None:
        wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(model_shapes[k])}"
                 for k in model_keys if k in state_dict and tuple(state_dict[k].shape) != tuple(model_shapes[k])]
        if wrong:
            problems.append(_format_offenders("shape mismatches", wrong))
    if problems:
        raise CheckpointKeyError(what="state dict does not match the model:\n" + "\n".join(problems))


# ------------------------------------------------------------------------------------------------
# Mask2Former Swin-B COCO panoptic checkpoint (`model_final_54b88a.pkl`) -> encoder + decoders.

MASK2FORMER_PREFIXES: list[tuple[str, str]] = [
    ("backbone.", "vision_encoder."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "mask_decoder."),
]
MASK2FORMER_RENAMES: list[tuple[str, str]] = [  # applied after the prefix, on the remainder
    (r"^(adapter_\d+)\.weight$", r"\1.0.weight"),
    (r"^(adapter_\d+)\.norm\.(weight|bias)$", r"\1.1.\2"),
    (r"^(layer_\d+)\.weight$", r"\1.0.weight"),
    (r"^(layer_\d+)\.norm\.(weight|bias)$", r"\1.1.\2"),
    (r"^static_query\.weight$", "query_feat.weight"),
]
# Checkpoint entries with no counterpart (class heads, pixel normalisation buffers).
MASK2FORMER_IGNORED: list[str] = [r"^pixel_mean$", r"^pixel_std$", r"^sem_seg_head\.predictor\.class_embed\."]
# Model parameters the checkpoint does not provide (kept at their initial value, like the reference):
# FPN conv biases (Mask2Former has none: a norm follows) and the SegEarth-R1-only decoder tables.
MASK2FORMER_EXPECTED_MISSING: list[str] = [
    r"^pixel_decoder\.(adapter|layer)_\d+\.0\.bias$",
    r"^mask_decoder\.(SEG_query_embed|new_query_embed)\.weight$",
    r"^mask_decoder\.(SEG_proj|CLASS_proj)\.",
]


def convert_mask2former_state_dict(weights: Mapping[str, object], model_keys: Iterable[str]
                                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a Mask2Former `model` dict (numpy arrays or tensors) onto our encoder/decoder keys.
    Returns (state dict, model keys intentionally left at init). Strict otherwise."""
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in weights.items():
        if any(re.search(p, key) for p in MASK2FORMER_IGNORED):
            continue
        for prefix, target in MASK2FORMER_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                for pattern, replacement in MASK2FORMER_RENAMES:
                    rest = re.sub(pattern, replacement, rest)
                out[target + rest] = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
                break
        else:
            unmatched.append(key)
    model_keys = [k for k in model_keys if k.split(".")[0] in {"vision_encoder", "pixel_decoder", "mask_decoder"}]
    unexpected = sorted(set(out) - set(model_keys))
    missing = sorted(set(model_keys) - set(out))
    left_at_init = [k for k in missing if any(re.search(p, k) for p in MASK2FORMER_EXPECTED_MISSING)]
    missing = [k for k in missing if k not in left_at_init]
    problems = []
    if unmatched:
        problems.append(_format_offenders("Mask2Former keys outside backbone./sem_seg_head.", unmatched))
    if unexpected:
        problems.append(_format_offenders("Mask2Former keys with no model counterpart", unexpected))
    if missing:
        problems.append(_format_offenders("model keys the Mask2Former checkpoint should provide", missing))
    if problems:
        raise CheckpointKeyError(what="Mask2Former checkpoint does not match the model:\n" + "\n".join(problems))
    return out, left_at_init


def llm_keys_from_hf(state_dict: Mapping[str, torch.Tensor], num_heads: int,
                     report: ConversionReport | None = None) -> dict[str, torch.Tensor]:
    """A causal-LM HF state dict (either Phi layout) -> our `language_model.*` keys. Phi's `lm_head.bias`
    is dropped: the reference rebuilds lm_head without bias (DESIGN.md §3)."""
    out = {}
    for key, value in split_fused_attention(state_dict, num_heads, report).items():
        if key == "lm_head.bias" or any(re.search(p, key) for p in UPSTREAM_KEYS_TO_DROP):
            if report is not None:
                report.dropped.append(key)
            continue
        out[f"language_model.{key}"] = value
    return out
