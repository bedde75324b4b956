"""Hierarchical shifted-window vision encoder (Swin) with the Mask2Former "D2SwinTransformer" layout.

Why not ``timm.models.SwinTransformer``: its parameter names differ (``layers.N.downsample`` sits at
the start of the next stage, no ``norm0..norm3``), it requires the input size to be fixed at
construction, and it neither pads tokens to a window multiple nor keeps shifting windows once a
stage is smaller than a window. The released checkpoints (and DESIGN.md §2.2) depend on exactly
that behaviour, so the block/stage logic lives here; the timm building blocks (``Mlp``,
``DropPath``, ``trunc_normal_``) are reused where they fit.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configuration import FEATURE_NAMES, IMAGE_CHANNELS, SegEarthR1Config

logger = logging.getLogger(__name__)

# Additive logit for token pairs from different regions of a shifted window (reference value).
SHIFT_MASK_VALUE = -100.0
# Std of the truncated-normal init of linear weights and relative-position tables (Swin default).
INIT_STD = 0.02


def _relative_position_index(window_size: int) -> torch.Tensor:
    """Index [N, N] into the (2w-1)^2 bias table for every (query, key) pair of a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # [N, N, 2]
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def _window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, Hp, Wp, C] -> [B, nW, w*w, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def _window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: [B, nW, w*w, C] -> [B, Hp, Wp, C]."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


@functools.lru_cache(maxsize=64)
def _window_token_index(height: int, width: int, window_size: int, shift: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Token gather indices that do pad -> cyclic shift -> window partition in one copy, and back.

    Returns (to_windows [nW*N], from_windows [H*W], padded). ``to_windows[j]`` is the raster index of
    the token at windowed position j, or H*W (a zero row appended to the tokens) for padding;
    ``from_windows[t]`` is the windowed position of raster token t, so gathering with it also crops.
    Pure data movement, so the result is bit-identical to F.pad + torch.roll + view/permute, which
    cost five to eight full copies of the feature map per block (roll alone is two ``cat`` per dim).
    """
    hp, wp = height + (-height) % window_size, width + (-width) % window_size
    rows = torch.arange(hp)[:, None].expand(hp, wp)
    cols = torch.arange(wp)[None, :].expand(hp, wp)
    raster = torch.where((rows < height) & (cols < width), rows * width + cols, torch.tensor(height * width))
    if shift:
        raster = torch.roll(raster, shifts=(-shift, -shift), dims=(0, 1))
    to_windows = _window_partition(raster[None, :, :, None], window_size).reshape(-1)
    from_windows = torch.empty(height * width + 1, dtype=torch.long)
    from_windows[to_windows] = torch.arange(to_windows.numel())
    return to_windows.to(device), from_windows[:-1].to(device), bool(hp != height or wp != width)


def _shift_region_mask(height: int, width: int, window_size: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask [nW, N, N] for shifted windows: token pairs from different image regions get -100.

    The padded (Hp, Wp) map is cut into 3 row bands and 3 column bands (the standard Swin regions);
    after the cyclic shift a window may contain tokens of several regions that must not attend.
    """
    def bands(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        return (pos >= n - window_size).long() + (pos >= n - shift).long()

    region = bands(height)[:, None] * 3 + bands(width)[None, :]  # [Hp, Wp]
    windows = _window_partition(region[None, :, :, None], window_size)[0, :, :, 0]  # [nW, N]
    differs = windows[:, None, :] != windows[:, :, None]
    return differs.float() * SHIFT_MASK_VALUE


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv; pads the image right/bottom to a patch multiple first."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        _, _, h, w = images.shape
        pad_h, pad_w = (-h) % self.patch_size, (-w) % self.patch_size
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = self.proj(images)
        hp, wp = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, hp*wp, C]
        if self.norm is not None:
            x = self.norm(x)
        return x, hp, wp


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent int64 buffer: it is part of the reference checkpoints.
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=INIT_STD)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] bias looked up from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # contiguous: added to the [nW, 1, N, N] shift mask, a permuted bias would make the sum
        # channels-last and its reshape below a full copy (48 MB per shifted Swin-B stage-3 block)
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """windows [B, nW, N, C]; shift_mask [nW, N, N] additive or None -> [B, nW, N, C]."""
        return self.proj(self.attend(self.qkv(windows), shift_mask))

    def attend(self, qkv: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """qkv [B, nW, N, 3C] (the qkv projection of the windows) -> attention output [B, nW, N, C] before
        `proj`, so that a caller can crop the padded tokens before projecting.

        SDPA with the additive bias as ``attn_mask`` matches the explicit softmax(qk^T*scale + bias)
        of the reference within fp32 noise (checked against swin.pt at atol 1e-5). With a shift
        mask the windows are folded into the head axis so that the [nW*heads, N, N] mask broadcasts
        over the batch instead of being copied per sample.
        """
        b, nw, n, c3 = qkv.shape
        h, d = self.num_heads, self.head_dim
        qkv = qkv.view(b, nw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # [3, B, nW, h, N, d]
        bias = self.relative_position_bias()
        if shift_mask is None:
            q, k, v = qkv.reshape(3, b * nw, h, n, d).unbind(0)
            mask = bias.unsqueeze(0)
        else:
            q, k, v = qkv.reshape(3, b, nw * h, n, d).unbind(0)
            mask = (bias.unsqueeze(0) + shift_mask.unsqueeze(1)).reshape(1, nw * h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return out.reshape(b, nw, h, n, d).permute(0, 1, 3, 2, 4).reshape(b, nw, n, c3 // 3)


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window-attention block; pads the normalised tokens to a window multiple."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, height: int, width: int, shift_mask: torch.Tensor | None) -> torch.Tensor:
        b, _, c = x.shape
        ws = self.window_size
        to_windows, from_windows, padded = _window_token_index(height, width, ws, self.shift_size, x.device)
        y = self.norm1(x)
        shift_mask = shift_mask if self.shift_size else None
        if padded and not torch.is_grad_enabled():
            y = self._attention_on_real_tokens(y, to_windows, from_windows, shift_mask)
        else:
            if padded:
                # Padded zero tokens are deliberately NOT masked: the reference lets them take part in attention.
                y = torch.cat([y, y.new_zeros(b, 1, c)], dim=1)
            windows = y.index_select(1, to_windows).view(b, -1, ws * ws, c)  # pad + shift + partition
            y = self.attn(windows, shift_mask)
            y = y.reshape(b, -1, c).index_select(1, from_windows)  # reverse + unshift + crop
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attention_on_real_tokens(self, y: torch.Tensor, to_windows: torch.Tensor, from_windows: torch.Tensor,
                                  shift_mask: torch.Tensor | None) -> torch.Tensor:
        """The padded-window attention with `qkv` and `proj` run on the real tokens only (inference).

        A padded token is a zero row, so its qkv projection is exactly the qkv bias: the projection is taken
        of the H*W real tokens, the bias appended as the padding row, and the windows gathered from that;
        `proj` comes after the crop. At 1024² the padding is 6 % of Swin-B's stage-1/2 tokens and 27 % of
        stages 3/4 (64 -> 72, 32 -> 36 for window 12), which is ~7 % of the encoder's FLOPs. On CPU the
        outputs are bit-identical (a product's rows do not depend on the other rows there;
        tests/modeling/test_vision_encoder.py compares both paths); a GPU library may pick another kernel
        for the smaller product, which changes rounding only. With gradients on, the projections' weight
        gradients would be summed over other rows, so training keeps the padded path.
        """
        b, _, c = y.shape
        n = self.window_size * self.window_size
        qkv = self.attn.qkv(y)
        pad = (self.attn.qkv.bias if self.attn.qkv.bias is not None else qkv.new_zeros(3 * c)).to(qkv.dtype)
        qkv = torch.cat([qkv, pad.expand(b, 1, 3 * c)], dim=1)
        windows = qkv.index_select(1, to_windows).view(b, -1, n, 3 * c)  # pad + shift + partition
        out = self.attn.attend(windows, shift_mask)
        return self.attn.proj(out.reshape(b, -1, c).index_select(1, from_windows))  # reverse + unshift + crop


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (padding odd sizes) -> LN(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Order (row, col): (even, even), (odd, even), (even, odd), (odd, odd) -- fixed by the weights.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks (every odd one shifted by window//2) and an optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_paths: Sequence[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias,
                      drop_paths[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (stage output tokens, merged tokens for the next stage or None)."""
        ws = self.window_size
        hp, wp = height + (-height) % ws, width + (-width) % ws
        shift_mask = _shift_region_mask(hp, wp, ws, self.shift_size, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, height, width, shift_mask, use_reentrant=False)
            else:
                x = blk(x, height, width, shift_mask)
        merged = self.downsample(x, height, width) if self.downsample is not None else None
        return x, merged


class SwinEncoder(nn.Module):
    """Swin backbone returning ``{"res2".."res5"}`` NCHW maps, each through its own LayerNorm ``norm{i}``.

    Drop-path rates grow linearly over all blocks from 0 to ``drop_path_rate`` and are active only in
    train mode. The numbers (Swin-B for SegEarth-R1, DESIGN.md §2.2) and their checks live in
    ``VisionConfig``; build with :meth:`from_config`.
    """

    def __init__(self, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path_rate: float, patch_size: int, in_chans: int,
                 patch_norm: bool, use_checkpoint: bool):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        channels = [embed_dim * 2 ** i for i in range(len(depths))]
        self.out_channels = channels
        self.out_strides = [patch_size * 2 ** i for i in range(len(depths))]
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        # Explicit CPU device so the encoder can also be built under a meta-device context.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList([
            SwinStage(channels[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                      rates[starts[i]:starts[i] + depths[i]], downsample=i < len(depths) - 1,
                      use_checkpoint=use_checkpoint)
            for i in range(len(depths))
        ])
        for i, c in enumerate(channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> SwinEncoder:
        """The encoder `config.vision` describes (gradient checkpointing off; the trainer turns it on)."""
        vc = config.vision
        return cls(embed_dim=vc.embed_dim, depths=vc.depths, num_heads=vc.num_heads, window_size=vc.window_size,
                   mlp_ratio=vc.mlp_ratio, qkv_bias=vc.qkv_bias, drop_path_rate=vc.drop_path_rate,
                   patch_size=vc.patch_size, in_chans=IMAGE_CHANNELS, patch_norm=vc.patch_norm,
                   use_checkpoint=False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def use_checkpoint(self) -> bool:
        return all(stage.use_checkpoint for stage in self.layers)

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        for stage in self.layers:
            stage.use_checkpoint = bool(value)

    def freeze(self) -> SwinEncoder:
        """Stop gradients to every parameter. The train/eval mode is left alone (drop-path follows it)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"SwinEncoder expects images [B, C, H, W]; got shape {tuple(images.shape)}")
        x, h, w = self.patch_embed(images)
        outputs: dict[str, torch.Tensor] = {}
        for i, (name, stage) in enumerate(zip(FEATURE_NAMES, self.layers)):
            out, merged = stage(x, h, w)
            out = getattr(self, f"norm{i}")(out)
            outputs[name] = out.view(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            if merged is not None:
                x, h, w = merged, (h + 1) // 2, (w + 1) // 2
        return outputs
