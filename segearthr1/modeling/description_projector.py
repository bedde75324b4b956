"""Description projector: fuses the LLM's description states with res5 visual tokens into the
mask decoder's single query (DESIGN.md §2.5).

Reference quirk, kept for checkpoint parity: the perceiver's keys/values are the media tokens plus
only the *first* latent, and only the first latent is returned. Attention, residuals, FF and
LayerNorms act per latent, so latents 1..n-1 can never influence the output. In
:class:`DescriptionProjector` the first latent is the projected mean-pooled description, so the
per-token description states (``d_all``) are computed (as the reference does) but are dead inputs.
We keep computing them: it is cheap and keeps the module an exact drop-in for the reference; it
also makes padding of variable-length descriptions harmless.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import SegEarthR1Config

logger = logging.getLogger(__name__)


class PerceiverAttention(nn.Module):
    """Latents attend to (media tokens + first latent); no biases, max-subtracted softmax."""

    def __init__(self, *, dim: int, dim_head: int, num_heads: int):
        super().__init__()
        inner = dim_head * num_heads
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[b, T, n, h*d] -> [b*T, h, n, d]."""
        b, frames, n, _ = t.shape
        return t.view(b, frames, n, self.num_heads, self.dim_head).permute(0, 1, 3, 2, 4).reshape(
            b * frames, self.num_heads, n, self.dim_head)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, frames, n, _ = latents.shape
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents[:, :, 0:1]], dim=-2)).chunk(2, dim=-1)
        # softmax(q k^T / sqrt(d)) v; SDPA's softmax is max-subtracted like the reference's explicit one.
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        out = out.view(b, frames, self.num_heads, n, self.dim_head).permute(0, 1, 3, 2, 4).reshape(b, frames, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: float) -> nn.Sequential:
    """LN -> Linear (no bias) -> GELU -> Linear (no bias); indices 0..3 are checkpoint names."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """Stack of (PerceiverAttention, FF) residual layers; returns ``norm(latents)[:, 0, 0:1]`` -> [b, 1, D]."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, num_heads: int, ff_mult: float):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, num_heads=num_heads),
                           _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """latents [b, T, n, D], x [b, T, v, D] -> first latent of the first frame [b, 1, D]."""
        if latents.dim() != 4 or x.dim() != 4 or latents.shape[:2] != x.shape[:2]:
            raise ValueError(f"PerceiverResampler expects latents [b, T, n, D] and x [b, T, v, D] with equal "
                             f"b, T; got {tuple(latents.shape)} and {tuple(x.shape)}")
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)[:, 0, 0:1]


def _gather_descriptions(hidden_states: torch.Tensor, description_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align each row's description states into [B, Tmax, H] (zeros after row i's T_i) and
    return it with the per-row mean [B, H] (AdaptiveAvgPool1d(1) over the T_i states)."""
    counts = description_mask.sum(dim=1)  # [B]
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"description_mask has no True position in batch rows {rows}; every sample needs "
                         "its description tokens (question + [SEG]) marked (check refer_embedding_indices)")
    t_max = int(counts.max())
    # Stable sort on "is not description" puts each row's True positions first, in order.
    order = torch.argsort((~description_mask).to(torch.int32), dim=1, stable=True)[:, :t_max]
    gathered = hidden_states.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
    valid = torch.arange(t_max, device=counts.device)[None, :] < counts[:, None]
    d_all = torch.where(valid.unsqueeze(-1), gathered, torch.zeros((), dtype=gathered.dtype,
                                                                   device=gathered.device))
    d_mean = (d_all.float().sum(dim=1) / counts[:, None].float()).to(hidden_states.dtype)
    return d_all, d_mean


class DescriptionProjector(nn.Module):
    """LLM description states (+ res5 visual tokens) -> one mask-decoder query [B, 1, out_dim].

    ``kind="perceiver"`` is the reference; ``kind="none"`` (ablation) maps the pooled description
    with a single Linear(H -> out_dim). Sizes and their checks: ``DescriptionProjectorConfig``.
    """

    def __init__(self, *, llm_hidden_size: int, visual_channels: int, dim: int, out_dim: int, depth: int,
                 num_heads: int, dim_head: int, ff_mult: float, kind: str):
        super().__init__()
        self.kind = kind
        self.visual_channels = visual_channels
        if kind == "none":
            self.SEG_token_projector = nn.Linear(llm_hidden_size, out_dim)
            return
        self.text_projector = nn.Linear(llm_hidden_size, dim)
        self.origin_SEG_token_projector = nn.Linear(llm_hidden_size, dim)
        self.local_project = nn.Linear(visual_channels, dim)
        self.SEG_token_projector = nn.Linear(2 * dim, out_dim)
        self.d_layers = PerceiverResampler(dim=dim, depth=depth, dim_head=dim_head, num_heads=num_heads,
                                           ff_mult=ff_mult)

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> DescriptionProjector:
        """LLM width + res5 width in, the mask decoder's width out (one query per sample)."""
        dp = config.description_projector
        return cls(llm_hidden_size=config.llm_hidden_size, visual_channels=config.encoder_channels[-1], dim=dp.dim,
                   out_dim=config.mask_decoder.hidden_dim, depth=dp.depth, num_heads=dp.num_heads,
                   dim_head=dp.dim_head, ff_mult=dp.ff_mult, kind=dp.kind)

    def forward(self, hidden_states: torch.Tensor, description_mask: torch.Tensor,
                visual_features: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, L, H], description_mask [B, L] (True = description token),
        visual_features res5 [B, C, h, w] (unused for kind='none') -> [B, 1, out_dim]."""
        if hidden_states.dim() != 3 or description_mask.shape != hidden_states.shape[:2]:
            raise ValueError(f"DescriptionProjector expects hidden_states [B, L, H] and description_mask [B, L]; "
                             f"got {tuple(hidden_states.shape)} and {tuple(description_mask.shape)}")
        d_all, d_mean = _gather_descriptions(hidden_states, description_mask.bool())
        if self.kind == "none":
            return self.SEG_token_projector(d_mean).unsqueeze(1)
        if (visual_features is None or visual_features.dim() != 4
                or visual_features.shape[0] != hidden_states.shape[0]
                or visual_features.shape[1] != self.visual_channels):
            got = None if visual_features is None else tuple(visual_features.shape)
            raise ValueError(f"DescriptionProjector expects visual_features (res5) [B={hidden_states.shape[0]}, "
                             f"C={self.visual_channels}, h, w]; got {got}")
        origin = self.origin_SEG_token_projector(d_mean).unsqueeze(1)  # [B, 1, dim]
        latents = self.text_projector(torch.cat([d_mean.unsqueeze(1), d_all], dim=1)).unsqueeze(1)
        local = self.local_project(visual_features.flatten(2).transpose(1, 2)).unsqueeze(1)  # [B, 1, hw, dim]
        fused = self.d_layers(latents, local)  # [B, 1, dim]
        return self.SEG_token_projector(torch.cat([origin, fused], dim=-1))
