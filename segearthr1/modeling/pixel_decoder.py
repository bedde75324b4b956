"""Mask2Former pixel decoder: deformable-attention encoder over the coarse levels + a small FPN.

Turns the backbone pyramid into (a) per-pixel embeddings at stride `common_stride` that mask logits
are read from and (b) refined multi-scale maps the transformer decoder attends to. Parameter names
follow the reference checkpoint (`pixel_decoder.*` in the upstream key listing).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segearthr1.configuration import DECODER_FEATURE_LEVELS, FEATURE_NAMES, GROUP_NORM_GROUPS, SegEarthR1Config
from segearthr1.modeling.ms_deform_attn import MSDeformAttn
from segearthr1.modeling.outputs import PixelDecoderOutput
from segearthr1.modeling.position_encoding import PositionEmbeddingSine

logger = logging.getLogger(__name__)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Detectron2's "c2 xavier" init (kaiming_uniform with a=1, zero bias) used for the FPN/mask convs."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention -> add & LN -> ReLU FFN -> add & LN."""

    def __init__(self, *, d_model: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int,
                 impl: str) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, num_levels=num_levels, num_heads=num_heads, num_points=num_points,
                                      impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """Stack of encoder layers (kept as `encoder.layers` so names match the reference)."""

    def __init__(self, layers: list[MSDeformAttnEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the position code and runs the encoder.

    No padding mask: every level is fully valid (valid ratios 1), as in the reference pipeline.
    """

    def __init__(self, *, d_model: int, num_heads: int, num_points: int, ffn_dim: int, num_layers: int, dropout: float,
                 num_levels: int, impl: str) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        layer = dict(d_model=d_model, ffn_dim=ffn_dim, dropout=dropout, num_levels=num_levels, num_heads=num_heads,
                     num_points=num_points, impl=impl)
        self.encoder = MSDeformAttnEncoder([MSDeformAttnEncoderLayer(**layer) for _ in range(num_layers)])
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Reference init: xavier for every matrix, then the deformable layers' own init, normal level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
        """Pixel centres of every level normalised to [0, 1]: [B, S, L, 2] (x, y), the same for each level."""
        points = []
        for height, width in shapes:
            ref_y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
            ref_x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
            points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
        ref = torch.cat(points, 0).to(dtype)
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """srcs / pos_embeds: per level [B, C, H_l, W_l] -> (memory [B, S, C], shapes [(H, W)], level_start_index [L])."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0] + sizes[:-1], device=src_flat.device).cumsum(0)
        # Pixel centres stay float32 in a bf16/fp16 model (bf16 would move them by up to half a pixel).
        reference_points = self.reference_points(shapes, src_flat.shape[0], src_flat.device, torch.float32)
        memory = self.encoder(src_flat, pos_flat, reference_points, shapes, level_start_index)
        return memory, shapes, level_start_index


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention pixel decoder with one FPN level per stride halving below the encoder levels.

    Differences from the original Mask2Former that the reference (and so we) have: the FPN lateral
    conv has a bias and is followed by GN **and ReLU**; the FPN convs are nn.Sequential(conv, GN[, ReLU])
    (names `adapter_k.{0,1}`, `layer_k.{0,1}`).
    Inputs are used in their own dtype (the projections and FFNs run in the model's dtype); the
    deformable sampling itself (reference points, locations, softmax weights, bilinear sampling) always
    runs in float32, because reduced precision loses the sub-pixel accuracy it depends on.
    """

    def __init__(
        self,
        *,
        input_channels: dict[str, int],
        input_strides: dict[str, int],
        conv_dim: int,
        mask_dim: int,
        num_heads: int,
        num_points: int,
        ffn_dim: int,
        num_encoder_layers: int,
        dropout: float,
        transformer_in_features: Sequence[str],
        common_stride: int,
        deform_attn_impl: str,
    ) -> None:
        super().__init__()
        # The rules between these arguments (levels, strides, widths) are checked by SegEarthR1Config.
        # Everything sorted fine -> coarse by stride; the encoder consumes the levels coarse -> fine.
        self.in_features = sorted(input_channels, key=lambda k: input_strides[k])
        self.transformer_in_features = sorted(transformer_in_features, key=lambda k: input_strides[k])
        self.num_levels = len(self.transformer_in_features)
        min_stride = input_strides[self.transformer_in_features[0]]
        self.num_fpn_levels = int(math.log2(min_stride // common_stride))
        fpn_features = self.in_features[: self.num_fpn_levels]
        self.common_stride = common_stride

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_channels[f], conv_dim, kernel_size=1), nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim))
            for f in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, num_heads=num_heads, num_points=num_points, ffn_dim=ffn_dim,
            num_layers=num_encoder_layers, dropout=dropout, num_levels=self.num_levels, impl=deform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=conv_dim // 2, normalize=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        # adapter_k / layer_k, k = 1 for the finest input; applied coarse -> fine in forward.
        for k, feature in enumerate(fpn_features, start=1):
            lateral = nn.Sequential(
                nn.Conv2d(input_channels[feature], conv_dim, kernel_size=1),
                nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim),
                nn.ReLU(inplace=True),
            )
            output = nn.Sequential(
                nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1),
                nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim),
                nn.ReLU(inplace=True),
            )
            c2_xavier_fill(lateral[0])
            c2_xavier_fill(output[0])
            self.add_module(f"adapter_{k}", lateral)
            self.add_module(f"layer_{k}", output)
        self._fpn_features = fpn_features

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> MSDeformAttnPixelDecoder:
        """The pixel decoder `config.pixel_decoder` describes, on the encoder maps `config.vision` gives."""
        pd = config.pixel_decoder
        return cls(
            input_channels=dict(zip(FEATURE_NAMES, config.encoder_channels)),
            input_strides=dict(zip(FEATURE_NAMES, config.encoder_strides)),
            conv_dim=pd.conv_dim, mask_dim=pd.mask_dim, num_heads=pd.num_heads, num_points=pd.num_points,
            ffn_dim=pd.ffn_dim, num_encoder_layers=pd.num_encoder_layers, dropout=pd.dropout,
            transformer_in_features=pd.transformer_in_features, common_stride=pd.common_stride,
            deform_attn_impl=pd.deform_attn_impl,
        )

    def forward_features(self, features: dict[str, torch.Tensor]) -> PixelDecoderOutput:
        """features: name -> [B, C_in, H/stride, W/stride] (must hold every configured input)."""
        missing = [f for f in self.in_features[: self.num_fpn_levels] + self.transformer_in_features if f not in features]
        if missing:
            raise ValueError(f"MSDeformAttnPixelDecoder.forward_features: missing features {missing}; got {sorted(features)}")
        srcs, pos = [], []
        for idx, name in enumerate(reversed(self.transformer_in_features)):
            x = features[name]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, shapes, _ = self.transformer(srcs, pos)
        batch = memory.shape[0]
        maps = [
            level.transpose(1, 2).reshape(batch, -1, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        out = maps[-1]
        for k in range(self.num_fpn_levels, 0, -1):  # coarse -> fine
            lateral = getattr(self, f"adapter_{k}")(features[self._fpn_features[k - 1]])
            merged = lateral + F.interpolate(out, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            out = getattr(self, f"layer_{k}")(merged)
        return PixelDecoderOutput(
            mask_features=self.mask_features(out),
            transformer_encoder_features=maps[0],
            multi_scale_features=maps[:DECODER_FEATURE_LEVELS],
        )

    def forward(self, features: dict[str, torch.Tensor]) -> PixelDecoderOutput:
        return self.forward_features(features)
