"""Writing a model in the reference release layout, so the reference code (and our loader) can read it.

The layout: a llava_phi config.json (from `reference_config.RELEASE_CONFIG_TABLE`), reference
parameter names with fused Phi attention (`key_maps`), and the tokenizer. The mask-decoder dimensions
are not in it: write the matching mask-config YAML with `write_mask_config_yaml` and pass it when
loading, as with the released models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from .key_maps import convert_to_upstream_state_dict
from .reference_config import release_config_from


def export_reference_release(model: SegEarthR1ForReasoningSegmentation, tokenizer, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors (reference names) and the tokenizer to `out_dir`."""
    from safetensors.torch import save_file

    config = model.config
    release = release_config_from(config)  # raises for non-Phi LLMs before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    upstream = convert_to_upstream_state_dict(state, config.text_config.num_attention_heads)
    # The reference registers an unused `seg_query` table of one row per object query.
    upstream["seg_query"] = torch.zeros(config.mask_decoder.num_queries, config.llm_hidden_size,
                                        dtype=next(iter(state.values())).dtype)
    save_file(upstream, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(release, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
