"""Multi-scale deformable attention (Deformable DETR) with a pure-PyTorch core.

The core samples each head's value map bilinearly at a few learned locations per level and mixes the
samples with softmax weights. ``ms_deform_attn_core_pytorch`` is the reference formulation
(``grid_sample``), ``ms_deform_attn_core_gather`` the same arithmetic as one weighted gather (faster on
CPU); a compiled CUDA op, when one is importable, is an optional accelerator. All give the same results
to float32 rounding; ``impl`` chooses (see :func:`resolve_impl`).
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segearthr1.configuration import SegEarthR1Config
from segearthr1.errors import DependencyNotFoundError

logger = logging.getLogger(__name__)

# Module name of the compiled extension built from the Deformable-DETR CUDA sources.
_COMPILED_OP_MODULE = "MultiScaleDeformableAttention"
# Batch chunk size the compiled op processes at once (its customary default).
_IM2COL_STEP = 64


def _check_core_shapes(value: torch.Tensor, spatial_shapes, levels: int) -> list[tuple[int, int]]:
    """(H, W) per level as ints, checked against the value and the sampling locations."""
    shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)]
    if len(shapes) != levels:
        raise ValueError(
            f"deformable attention core: {len(shapes)} spatial shapes but sampling_locations has {levels} levels; "
            "pass one (H, W) per level"
        )
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(
            f"deformable attention core: value has {value.shape[1]} positions but spatial shapes {shapes} "
            f"sum to {sum(h * w for h, w in shapes)}; flatten every level into value"
        )
    return shapes


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention core, pure PyTorch.

    Args:
        value: [B, S, M, D] per-head values of all levels, flattened row-major per level and
            concatenated (S = sum H_l*W_l).
        spatial_shapes: [L, 2] (H_l, W_l) per level.
        sampling_locations: [B, Q, M, L, P, 2] (x, y) in [0, 1] per level (0 = left/top edge of the map).
        attention_weights: [B, Q, M, L, P], already normalised over (L, P).

    Returns:
        [B, Q, M*D]. Samples use bilinear interpolation with zero padding, align_corners=False,
        i.e. ``grid_sample`` at ``2*loc - 1``.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _check_core_shapes(value, spatial_shapes, levels)
    out_dtype = value.dtype
    # Sampling runs in float32 whatever the model dtype, on contiguous per-level maps. Why:
    # * on CPU, bf16/fp16 `grid_sample` on a non-contiguous input (the per-level value views below are)
    #   returns garbage (~1e30), and on contiguous input it was still slower than fp32 (no vectorised
    #   low-precision kernel; one measurement on a loaded 2-core machine, full size 1024²: 1.9 vs 1.2 s);
    # * bf16 has 8 mantissa bits: a location in [0, 1] is only resolved to 1/256, i.e. half a pixel of
    #   the finest (128²) level; fp32 locations keep the sub-pixel accuracy the reference has.
    # In fp32, contiguous vs strided input measured within ±10 % of each other on a quiet machine.
    value_list = value.float().split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations.float() - 1
    # Points on the output's row axis and queries on its column axis ([B*M, D, P, Q]) and the weighted sum
    # per level: the reference stacks every level's samples into one [B*M, D, Q, L*P] tensor first (a
    # 264 MB copy per layer at 1024²). Quiet machine, 2 threads, one layer's core: forward 0.51 vs 0.57 s
    # (1024²) and 0.07 vs 0.13 s (512²); forward + backward 0.27 vs 0.31 s at 512² but 2.0 vs 1.7 s at
    # 1024² (a per-point fused multiply-add accumulator was slower than both).
    weights = attention_weights.float().permute(0, 2, 3, 4, 1).reshape(batch * heads, levels, 1, points, queries)
    output = None
    for level, (height, width) in enumerate(shapes):
        # [B, H*W, M, D] -> [B*M, D, H, W], contiguous
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width).contiguous()
        # [B, Q, M, P, 2] -> [B*M, P, Q, 2]
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 3, 1, 4).flatten(0, 1)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        contribution = (sampled * weights[:, level]).sum(-2)  # [B*M, D, Q]
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, queries).transpose(1, 2).to(out_dtype).contiguous()


def ms_deform_attn_core_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention core as one weighted gather (``F.embedding_bag``); same arguments and result
    as :func:`ms_deform_attn_core_pytorch` (equal to float32 rounding).

    Why: ``grid_sample`` reads a [C, H, W] map, so each bilinear corner touches C cache lines, and the
    attention-weighted sum is a second pass over the samples. Here every level's map is laid out as rows
    of D channels (one or two cache lines per corner) and each (query, head) is one bag of
    levels * points * 4 corners whose per-sample weight is attention weight times bilinear weight, so
    sampling and mixing are a single fused kernel. 2-core CPU, one full-size layer (8 heads x 32, 3 levels,
    4 points), fp32, vs grid_sample (tools/bench_deform_attn.py): forward 0.15 vs 0.70 s at 1024² and 0.035
    vs 0.069 s at 512²; forward + backward 2.01 vs 3.41 s and 0.378 vs 0.395 s (the backward is a sorted
    scatter and gains little).
    Each level is padded by one zero row/column before and two after, and pixel coordinates are clamped
    to [-1, size]: every corner index is then valid and out-of-map corners read zeros
    (``padding_mode="zeros"``) without a validity mask. Runs in float32 like the reference core.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _check_core_shapes(value, spatial_shapes, levels)
    device = value.device
    padded = []
    for value_l, (height, width) in zip(value.float().split([h * w for h, w in shapes], dim=1), shapes):
        value_l = value_l.view(batch, height, width, heads, head_dim).permute(0, 3, 1, 2, 4)  # [B, M, H, W, D]
        padded.append(F.pad(value_l, (0, 0, 1, 2, 1, 2)).flatten(2, 3))
    rows = torch.cat(padded, 2)  # [B, M, S', D], S' = sum (H+3)(W+3)
    rows_per_map = rows.shape[2]
    index_dtype = torch.int32 if rows.shape[0] * heads * rows_per_map < 2**31 else torch.int64
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)[:, None, :]  # [L, 1, 2]
    # grid_sample's own unnormalisation of grid = 2*loc - 1 (align_corners=False), to its rounding
    pixel = (((2 * sampling_locations.float() - 1) + 1) * sizes - 1) / 2
    pixel = torch.maximum(torch.minimum(pixel, sizes), sizes.new_tensor(-1.0))
    corner = pixel.floor()
    frac_x, frac_y = (pixel - corner).unbind(-1)
    corner = corner.to(index_dtype) + 1  # position in the padded map
    pitch = torch.tensor([w + 3 for _, w in shapes], dtype=index_dtype, device=device)  # [L]
    level_start = [0]
    for height, width in shapes[:-1]:
        level_start.append(level_start[-1] + (height + 3) * (width + 3))
    start = (torch.arange(batch * heads, dtype=index_dtype, device=device) * rows_per_map).view(batch, 1, heads, 1, 1)
    start = start + torch.tensor(level_start, dtype=index_dtype, device=device).view(levels, 1)
    top_left = corner[..., 1] * pitch[:, None] + corner[..., 0] + start  # [B, Q, M, L, P]
    steps = torch.stack([torch.zeros_like(pitch), torch.ones_like(pitch), pitch, pitch + 1], -1)  # [L, 4]
    index = top_left.unsqueeze(-1) + steps[:, None, :]  # corners (y0x0, y0x1, y1x0, y1x1)
    weight_y = attention_weights.float().unsqueeze(-1) * torch.stack([1 - frac_y, frac_y], -1)
    weight = (weight_y.unsqueeze(-1) * torch.stack([1 - frac_x, frac_x], -1).unsqueeze(-2)).flatten(-2)
    bags = batch * queries * heads
    output = F.embedding_bag(index.view(bags, -1), rows.view(-1, head_dim),
                             per_sample_weights=weight.view(bags, -1), mode="sum")
    return output.view(batch, queries, heads * head_dim).to(value.dtype)


@functools.lru_cache(maxsize=None)
def _compiled_op():
    """The compiled extension module, or None when it is not installed (cached: imported once)."""
    try:
        return importlib.import_module(_COMPILED_OP_MODULE)
    except ImportError:
        return None


class _CompiledMSDeformAttnFunction(torch.autograd.Function):
    """Autograd binding of the compiled op (forward/backward kernels from the Deformable-DETR sources)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        op = _compiled_op()
        output = op.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, _IM2COL_STEP
        )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _compiled_op().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), _IM2COL_STEP,
        )
        return grad_value, None, None, grad_locations, grad_weights


@functools.lru_cache(maxsize=None)
def _log_auto_choice(choice: str, reason: str) -> None:
    logger.info("MSDeformAttn impl=auto -> %s (%s)", choice, reason)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map the configured impl to the core used on `device`: "pytorch" (grid_sample, the reference's
    formulation), "gather" (one embedding_bag) or "cuda" (the compiled op). "auto" takes the compiled
    op on CUDA when it is importable, else "gather" (the fastest measured on CPU; on CUDA it is timed
    against grid_sample by tools/gpu_check.sh)."""
    if impl in ("pytorch", "gather"):
        return impl
    if impl == "cuda":
        if _compiled_op() is None:
            raise DependencyNotFoundError(
                f"MSDeformAttn impl='cuda' needs the compiled extension '{_COMPILED_OP_MODULE}', which is not "
                "importable. It is not part of segearthr1: build it from the Deformable-DETR / Mask2Former "
                "sources (models/ops or mask2former/modeling/pixel_decoder/ops: `sh make.sh`, which installs "
                f"'{_COMPILED_OP_MODULE}'), or set pixel_decoder.deform_attn_impl to 'gather', 'pytorch' or 'auto'"
            )
        if device.type != "cuda":
            raise ValueError(f"MSDeformAttn impl='cuda' got tensors on {device}; move the model to a CUDA device or use impl='auto'")
        return "cuda"
    if device.type == "cuda" and _compiled_op() is not None:
        _log_auto_choice("cuda", f"compiled op '{_COMPILED_OP_MODULE}' found")
        return "cuda"
    reason = f"tensors on {device.type}" if device.type != "cuda" else f"compiled op '{_COMPILED_OP_MODULE}' not importable"
    _log_auto_choice("gather", reason)
    return "gather"


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (parameter names as the reference).

    ``sampling_offsets`` output features are ordered (head, level, point, xy) and are divided by
    (W, H) of their level; ``attention_weights`` are softmax-normalised over levels*points per head.
    ``d_model % num_heads == 0`` and the ``impl`` name are checked by ``PixelDecoderConfig``.
    """

    def __init__(self, *, d_model: int, num_levels: int, num_heads: int, num_points: int, impl: str) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> MSDeformAttn:
        """One layer of the pixel decoder's deformable encoder (`config.pixel_decoder`)."""
        pd = config.pixel_decoder
        return cls(d_model=pd.conv_dim, num_levels=len(pd.transformer_in_features), num_heads=pd.num_heads,
                   num_points=pd.num_points, impl=pd.deform_attn_impl)

    def _reset_parameters(self) -> None:
        """Deformable-DETR init: zero offset weights, offsets start on a radial grid (head h points at
        angle 2*pi*h/heads, point p at distance p+1), uniform attention, xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Q, C] (content + position embedding).
            reference_points: [B, Q, L, 2] (x, y) in [0, 1] per level.
            input_flatten: [B, S, C] values of all levels, flattened row-major and concatenated.
            spatial_shapes: (H, W) per level, as Python ints (avoids a device sync per layer).
            level_start_index: [L] long start offsets; only the compiled op needs it (derived if None).
        Returns:
            [B, Q, C].
        """
        batch, queries, _ = query.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        if len(shapes) != self.num_levels:
            raise ValueError(f"MSDeformAttn: got {len(shapes)} levels {shapes}, built for num_levels={self.num_levels}")
        if reference_points.shape[-1] != 2:
            raise ValueError(
                f"MSDeformAttn: reference_points must end in (x, y), got shape {tuple(reference_points.shape)}; "
                "box reference points are not supported"
            )
        value = self.value_proj(input_flatten).view(batch, input_flatten.shape[1], self.num_heads, self.d_model // self.num_heads)
        offsets = self.sampling_offsets(query).view(batch, queries, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.num_heads, self.num_levels * self.num_points)
        weights = F.softmax(weights.float(), -1).view(batch, queries, self.num_heads, self.num_levels, self.num_points)
        # Locations in float32 even for a bf16/fp16 model: bf16 cannot resolve half a pixel of a 128² map.
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=offsets.device)
        locations = (reference_points.float()[:, :, None, :, None, :]
                     + offsets.float() / normalizer[None, None, None, :, None, :])
        impl = resolve_impl(self.impl, value.device)
        if impl == "cuda":
            shapes_t = torch.tensor(shapes, dtype=torch.long, device=value.device)
            if level_start_index is None:
                level_start_index = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
            # The Deformable-DETR kernels dispatch on float/double only: run them in fp32, like the core.
            output = _CompiledMSDeformAttnFunction.apply(value.float(), shapes_t, level_start_index, locations,
                                                         weights.float()).to(value.dtype)
        else:
            core = ms_deform_attn_core_gather if impl == "gather" else ms_deform_attn_core_pytorch
            output = core(value, shapes, locations, weights)
        return self.output_proj(output)
