"""ModelOutput dataclasses returned by the modules (fields documented with their shapes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput


@dataclass
class PixelDecoderOutput(ModelOutput):
    """Output of `MSDeformAttnPixelDecoder.forward_features`.

    mask_features: [B, mask_dim, H/4, W/4] per-pixel embeddings the mask logits are read from.
    transformer_encoder_features: [B, conv_dim, H/32, W/32] encoder output at the coarsest level
        (= multi_scale_features[0]).
    multi_scale_features: the encoder maps, LOW -> HIGH resolution (strides 32, 16, 8 by default),
        each [B, conv_dim, h_l, w_l]; the transformer decoder's memory.
    """

    mask_features: Optional[torch.Tensor] = None
    transformer_encoder_features: Optional[torch.Tensor] = None
    multi_scale_features: Optional[list[torch.Tensor]] = None


@dataclass
class MaskDecoderOutput(ModelOutput):
    """Output of `MaskDecoder.forward`.

    pred_masks: [B, Q, h, w] final mask logits (Q = 1 with the description query; num_queries in
        "learned" mode), at the resolution of mask_features.
    aux_pred_masks: num_layers earlier predictions [B, Q, h, w]; index 0 comes from the un-refined
        query, index i from the output of decoder layer i (deep supervision).
    pred_seg_logits: [B, Q] per-query score of matching the description embedding ("learned" mode
        only; None otherwise).
    aux_pred_seg_logits: num_layers [B, Q] scores aligned with aux_pred_masks ("learned" mode only).
    """

    pred_masks: Optional[torch.Tensor] = None
    aux_pred_masks: Optional[list[torch.Tensor]] = None
    pred_seg_logits: Optional[torch.Tensor] = None
    aux_pred_seg_logits: Optional[list[torch.Tensor]] = None
