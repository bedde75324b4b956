"""2-D sine position embedding (DETR / Mask2Former style) for feature maps without padding."""
from __future__ import annotations

import math

import torch
from torch import nn

# Cached grids are keyed by (H, W, device, dtype); a handful of sizes occur per model, bound it anyway.
_MAX_CACHE_ENTRIES = 32
# DETR / Mask2Former constants: longest wavelength, the range normalised positions are scaled to, and
# the epsilon of the normalisation (the reference's values; no model varies them).
TEMPERATURE = 10000.0
SCALE = 2 * math.pi
EPS = 1e-6


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine embedding of normalised (y, x) pixel positions.

    Output channels are ``[y-features, x-features]``, each ``num_pos_feats`` wide with sin/cos
    interleaved (even channel = sin, odd = cos), exactly as Mask2Former's ``PositionEmbeddingSine``
    with no padding mask. The maths runs in float32 (as the reference) and is cast to ``x.dtype``.
    """

    def __init__(self, *, num_pos_feats: int, normalize: bool) -> None:
        super().__init__()
        # num_pos_feats is half a channel width; the config checks those widths are multiples of 4.
        self.num_pos_feats = num_pos_feats
        self.normalize = normalize
        self._cache: dict[tuple, torch.Tensor] = {}

    def _grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[2*num_pos_feats, H, W] float32 embedding (ops in the reference's order for bitwise parity)."""
        y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)[:, None].expand(height, width)
        x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)[None, :].expand(height, width)
        if self.normalize:
            # Same expression as the reference: cumsum / (last cumsum + eps) * scale.
            y_embed = y_embed / (y_embed[-1:, :] + EPS) * SCALE
            x_embed = x_embed / (x_embed[:, -1:] + EPS) * SCALE
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = TEMPERATURE ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, None] / dim_t
        pos_y = y_embed[:, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
        return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] (only its shape, device and dtype are used) -> [B, 2*num_pos_feats, H, W]."""
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine expects a [B, C, H, W] map, got shape {tuple(x.shape)}")
        batch, _, height, width = x.shape
        key = (height, width, x.device, x.dtype)
        pos = self._cache.get(key)
        if pos is None:
            pos = self._grid(height, width, x.device).to(x.dtype)
            if len(self._cache) >= _MAX_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = pos
        return pos.unsqueeze(0).expand(batch, -1, -1, -1)
