"""Mask2Former masked-attention transformer decoder driven by ONE query: the description embedding.

The query attends to one multi-scale level per layer, restricted to where the previous prediction
is foreground (masked attention), and each layer's output is turned into mask logits by a dot
product with the pixel decoder's per-pixel embeddings (deep supervision: one prediction before the
first layer and one after each layer). Parameter names follow the reference checkpoint
(`predictor.*` in the upstream key listing), including tables that the reference builds but never
uses (see UNUSED_PARAMETERS).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from segearthr1.configuration import DECODER_FEATURE_LEVELS, SegEarthR1Config
from segearthr1.modeling.outputs import MaskDecoderOutput
from segearthr1.modeling.pixel_decoder import c2_xavier_fill
from segearthr1.modeling.position_encoding import PositionEmbeddingSine

logger = logging.getLogger(__name__)

# Exist for checkpoint compatibility; take no part in the computation in the default
# ("description") mode, so they never receive a gradient. In "learned" mode query_feat,
# query_embed and SEG_proj are used. (Upstream names carry a "predictor." prefix.)
UNUSED_PARAMETERS = (
    "query_feat.weight",
    "query_embed.weight",
    "SEG_query_embed.weight",
    "new_query_embed.weight",
    "SEG_proj.layers.0.weight",
    "SEG_proj.layers.0.bias",
    "SEG_proj.layers.1.weight",
    "SEG_proj.layers.1.bias",
    "CLASS_proj.layers.0.weight",
    "CLASS_proj.layers.0.bias",
    "CLASS_proj.layers.1.weight",
    "CLASS_proj.layers.1.bias",
)

# By default nn.MultiheadAttention is called with need_weights=True, like the reference (the PyTorch
# default): that selects the explicit (baddbmm + softmax) kernel path, which reproduces the reference
# bit-exactly, whereas the SDPA path (need_weights=False) differs by ~1e-6 — enough to flip
# sigmoid(logit) < 0.5 mask bits of near-zero logits and diverge in later layers. The head-averaged
# weights it returns are [B, Q, S]: negligible for one query. `sdpa_attention=True` opts into SDPA.

# Sigmoid probability below which a memory position is hidden from the query (Mask2Former).
MASK_THRESHOLD = 0.5
# The reference's transformer decoder builds every layer with dropout 0 (MASK_FORMER.DROPOUT only
# reaches the pixel decoder), so the decoder has no dropout switch.
DECODER_DROPOUT = 0.0
# Layers of the mask-embedding MLP and of the learned-query scoring MLPs (fixed by the checkpoint).
MASK_EMBED_LAYERS = 3
SEG_PROJ_LAYERS = 2


def _xavier_matrices(module: nn.Module) -> None:
    """Mask2Former's per-layer init: xavier_uniform for every weight matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries with add & LayerNorm (post-norm unless pre_norm)."""

    def __init__(self, *, d_model: int, num_heads: int, dropout: float, pre_norm: bool, sdpa: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        self.sdpa = sdpa
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tgt, query_pos: [Q, B, C] (sequence first, as the reference)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        q = x if query_pos is None else x + query_pos
        out = self.self_attn(q, q, value=x, need_weights=not self.sdpa)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one memory level, with add & LayerNorm."""

    def __init__(self, *, d_model: int, num_heads: int, dropout: float, pre_norm: bool, sdpa: bool) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        self.sdpa = sdpa
        _xavier_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        pos: torch.Tensor,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt [Q, B, C]; memory, pos [S, B, C]; memory_mask [B*heads, Q, S] bool (True = blocked)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        q = x if query_pos is None else x + query_pos
        out = self.multihead_attn(q, memory + pos, value=memory, attn_mask=memory_mask, need_weights=not self.sdpa)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """ReLU feed-forward block with add & LayerNorm."""

    def __init__(self, *, d_model: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last), stored as `layers.N`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Masked-attention transformer decoder (Mask2Former) with a single description query.

    query_mode "description" (default, the reference): the query is the projected description
    embedding [B, 1, C]; its positional embedding is zero. query_mode "learned" (ablation
    `use_seg_query`): `num_queries` learned queries (`query_feat`, positional `query_embed`) are
    decoded instead, and each is scored against the description embedding with
    ``pred_seg_logits[b, q] = <SEG_proj(decoder_norm(x_q)), query_b> / sqrt(hidden_dim)``
    (scaled dot product, so logits start O(1) at init); the caller picks/matches a query with it.
    `num_layers` is the number of layers actually built (the reference's DEC_LAYERS minus one).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_dim: int,
        num_queries: int,
        num_heads: int,
        dim_feedforward: int,
        num_layers: int,
        mask_dim: int,
        pre_norm: bool,
        num_feature_levels: int,
        enforce_input_project: bool,
        query_mode: str,
        sdpa_attention: bool,
    ) -> None:
        super().__init__()
        # Widths, head divisibility, layer count and query_mode are checked by MaskDecoderConfig.
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.query_mode = query_mode
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, normalize=True)

        attn = dict(d_model=hidden_dim, num_heads=num_heads, dropout=DECODER_DROPOUT, pre_norm=pre_norm,
                    sdpa=sdpa_attention)
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(**attn) for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(**attn) for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d_model=hidden_dim, dim_feedforward=dim_feedforward, dropout=DECODER_DROPOUT, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.SEG_query_embed = nn.Embedding(num_queries + 1, hidden_dim)
        self.new_query_embed = nn.Embedding(1, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, MASK_EMBED_LAYERS)
        self.SEG_proj = MLP(hidden_dim, hidden_dim, hidden_dim, SEG_PROJ_LAYERS)
        self.CLASS_proj = MLP(hidden_dim, hidden_dim, hidden_dim, SEG_PROJ_LAYERS)

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> MaskDecoder:
        """The decoder `config.mask_decoder` describes, reading the pixel decoder's maps and embeddings."""
        md, pd = config.mask_decoder, config.pixel_decoder
        return cls(in_channels=pd.conv_dim, hidden_dim=md.hidden_dim, num_queries=md.num_queries,
                   num_heads=md.num_heads, dim_feedforward=md.dim_feedforward, num_layers=md.num_layers,
                   mask_dim=pd.mask_dim, pre_norm=md.pre_norm, num_feature_levels=DECODER_FEATURE_LEVELS,
                   enforce_input_project=md.enforce_input_project, query_mode=md.query,
                   sdpa_attention=md.sdpa_attention)

    def _prediction_heads(self, output, mask_features, target_size, description):
        """output [Q, B, C] -> (mask logits [B, Q, h, w], blocked-attention mask [B*heads, Q, h_t*w_t], seg logits)."""
        decoded = self.decoder_norm(output).transpose(0, 1)  # [B, Q, C]
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        seg_logits = None
        if self.query_mode == "learned" and description is not None:
            seg_logits = torch.einsum("bqc,bc->bq", self.SEG_proj(decoded), description[:, 0]) / math.sqrt(self.hidden_dim)
        resized = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        blocked = resized.sigmoid().flatten(2) < MASK_THRESHOLD  # [B, Q, S]
        blocked = blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        # A query that would see nothing attends everywhere instead (avoids an all -inf softmax row).
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return masks, blocked.detach(), seg_logits

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> MaskDecoderOutput:
        """
        Args:
            multi_scale_features: num_feature_levels maps [B, in_channels, h_l, w_l], LOW -> HIGH resolution.
            mask_features: [B, mask_dim, h, w] per-pixel embeddings.
            query: [B, 1, hidden_dim] description embedding (the query in "description" mode; the
                embedding the learned queries are scored against in "learned" mode, optional there).
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"MaskDecoder: got {len(multi_scale_features)} feature levels, built for num_feature_levels="
                f"{self.num_feature_levels}; pass the pixel decoder's multi_scale_features"
            )
        batch = mask_features.shape[0]
        if query is not None and (query.dim() != 3 or query.shape[0] != batch or query.shape[1] != 1 or query.shape[2] != self.hidden_dim):
            raise ValueError(
                f"MaskDecoder: query has shape {tuple(query.shape)}, expected [B={batch}, 1, hidden_dim={self.hidden_dim}]"
            )
        memory, memory_pos, sizes = [], [], []
        for level, x in enumerate(multi_scale_features):
            sizes.append(tuple(x.shape[-2:]))
            memory_pos.append(self.pe_layer(x).flatten(2).permute(2, 0, 1))
            src = self.input_proj[level](x).flatten(2) + self.level_embed.weight[level][None, :, None]
            memory.append(src.permute(2, 0, 1))  # [S, B, C]

        if self.query_mode == "description":
            if query is None:
                raise ValueError("MaskDecoder: query_mode='description' needs the description query [B, 1, C]; got None")
            output = query.transpose(0, 1)  # [1, B, C]
            query_pos = None  # zero positional embedding (adding zeros is skipped)
        else:
            output = self.query_feat.weight.unsqueeze(1).expand(-1, batch, -1)
            query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, batch, -1)

        masks, blocked, seg_logits = self._prediction_heads(output, mask_features, sizes[0], query)
        all_masks, all_seg = [masks], [seg_logits]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](output, memory[level], blocked, memory_pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            masks, blocked, seg_logits = self._prediction_heads(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels], query
            )
            all_masks.append(masks)
            all_seg.append(seg_logits)
        has_seg = all_seg[-1] is not None
        return MaskDecoderOutput(
            pred_masks=all_masks[-1],
            aux_pred_masks=all_masks[:-1],
            pred_seg_logits=all_seg[-1],
            aux_pred_seg_logits=all_seg[:-1] if has_seg else None,
        )
