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
import warnings
from collections.abc import Sequence
from typing import NamedTuple

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


class _GatherLayout(NamedTuple):
    """Where the zero-padded level maps lie in the row table of :func:`ms_deform_attn_core_gather`."""

    rows_per_map: int  # rows of one (batch, head) map: all levels, padded
    level_start: tuple[int, ...]  # first row of each level inside a map
    level_rows: tuple[int, ...]  # rows of each padded level
    corner_steps: tuple[tuple[int, int, int, int], ...]  # per level: row offset of the 4 corners from top-left

    @classmethod
    def for_shapes(cls, shapes: Sequence[tuple[int, int]]) -> _GatherLayout:
        """Each (H, W) level padded to (H+3) x (W+3) rows, levels one after another in every map."""
        level_rows = tuple((h + 3) * (w + 3) for h, w in shapes)
        level_start = tuple(sum(level_rows[:i]) for i in range(len(level_rows)))
        return cls(sum(level_rows), level_start, level_rows, tuple((0, 1, w + 3, w + 4) for _, w in shapes))


class _WeightedGatherCPU(torch.autograd.Function):
    """``out[n] = sum_(j, c) weight[n, j, c] * rows[top_left[n, j] + corner_steps[level(j)][c]]`` with a
    CPU backward written as two fast kernels instead of ``embedding_bag``'s generic one.

    Why: ``embedding_bag``'s forward is a fused weighted gather, but its backward sorts all N*J*4 indices and
    scatters rows one by one (then computes the weight gradient in a second slow pass): 10x the forward's
    time. Here (1) the row gradient is a forward ``embedding_bag`` over the *transposed* structure: the
    N*J top-left indices (4x fewer than the corners) are sorted once, each corner's weighted sum of output
    gradients is gathered per top-left row, and the four sums are added in at their corner offsets; (2) the
    weight gradient ``rows[index] . grad[n]`` is exactly a sampled dense product, ``torch.sparse.sampled_addmm``
    over the CSR pattern (bag n, column index), which never materialises the gathered rows. One full-size
    layer, 2 threads, forward + backward: 2.61 -> 1.03 s at 1024², 0.54 -> 0.21 s at 512²; the tiny config's
    layer 67 -> 29 ms (1 thread). The sort is stable, so results are deterministic; gradients equal
    embedding_bag's to float32 rounding (tests/modeling/test_ms_deform_attn.py, plus a float64 gradcheck).
    """

    @staticmethod
    def forward(ctx, rows, top_left, weight, layout: _GatherLayout):
        ctx.layout = layout
        ctx.save_for_backward(rows, top_left, weight)
        return F.embedding_bag(_corner_index(top_left, layout), rows, per_sample_weights=weight.flatten(1), mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        rows, top_left, weight = ctx.saved_tensors
        layout = ctx.layout
        grad_output = grad_output.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = _row_gradient(grad_output, rows.shape[0], top_left, weight, layout)
        if ctx.needs_input_grad[2]:
            bags, per_bag = top_left.shape[0], top_left.shape[1] * 4
            # recomputed rather than saved: 4x the top-left indices, kept only while it is used
            index = _corner_index(top_left, layout).reshape(-1).long()
            crow = torch.arange(0, bags * per_bag + 1, per_bag, dtype=torch.long)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is exact and tested here
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, index, rows.new_zeros(index.numel()), size=(bags, rows.shape[0]),
                                                  check_invariants=False)  # columns are unsorted, may repeat
                grad_weight = torch.sparse.sampled_addmm(pattern, grad_output, rows.t(), beta=0.0).values()
            grad_weight = grad_weight.view(weight.shape)
        return grad_rows, None, grad_weight, None


def _corner_index(top_left: torch.Tensor, layout: _GatherLayout) -> torch.Tensor:
    """[N, J] top-left rows -> [N, J*4] rows of the 4 corners (J = levels * points, level-major)."""
    steps = torch.tensor(layout.corner_steps, dtype=top_left.dtype, device=top_left.device)  # [L, 4]
    bags, per_bag = top_left.shape
    levels = steps.shape[0]
    return (top_left.view(bags, levels, per_bag // levels, 1) + steps[None, :, None, :]).view(bags, per_bag * 4)


def _row_gradient(grad_output, num_rows: int, top_left, weight, layout: _GatherLayout) -> torch.Tensor:
    """d out / d rows: for every row r, sum over the samples whose corner c lands on r of weight * grad."""
    per_bag = top_left.shape[1]
    flat = top_left.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_rows)
    starts = counts.cumsum(0) - counts
    bag_of_sample = order // per_bag
    weight_sorted = weight.reshape(-1, 4).index_select(0, order)
    # per top-left row and corner c: the sum of weight(corner c) * grad over the samples with that top-left
    at_top_left = [F.embedding_bag(bag_of_sample, grad_output, starts,
                                   per_sample_weights=weight_sorted[:, c].contiguous(), mode="sum") for c in range(4)]
    grad_rows = at_top_left[0]  # corner 0 is the top-left itself on every level
    dst = grad_rows.view(num_rows // layout.rows_per_map, layout.rows_per_map, -1)
    for c in (1, 2, 3):
        src = at_top_left[c].view_as(dst)
        for start, size, steps in zip(layout.level_start, layout.level_rows, layout.corner_steps):
            step = steps[c]  # corners stay inside their padded level, so the last `step` rows carry nothing
            dst[:, start + step: start + size] += src[:, start: start + size - step]
    return grad_rows


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
    4 points), fp32, 2 threads, vs grid_sample (tools/bench_deform_attn.py, one session): forward 0.23 vs
    0.70 s at 1024² and 0.050 vs 0.076 s at 512²; forward + backward 1.03 vs 3.14 s and 0.21 vs 0.38 s. On
    CPU the backward is :class:`_WeightedGatherCPU`'s (embedding_bag's own took 2.61 s and 0.54 s there);
    on CUDA it is embedding_bag's.
    Each level is padded by one zero row/column before and two after, and pixel coordinates are clamped
    to [-1, size]: every corner index is then valid and out-of-map corners read zeros
    (``padding_mode="zeros"``) without a validity mask. Runs in float32 like the reference core.
    """
    levels = sampling_locations.shape[3]
    shapes = _check_core_shapes(value, spatial_shapes, levels)
    loc_x, loc_y = sampling_locations.float().unbind(-1)
    return _gather_from_planes(value, shapes, loc_x, loc_y, attention_weights)


def _level_sizes(shapes: Sequence[tuple[int, int]], axis: int, device) -> torch.Tensor:
    """[L, 1] float32 width (axis 1) or height (axis 0) of each level, broadcasting over [..., L, P]."""
    return torch.tensor([float(shape[axis]) for shape in shapes], dtype=torch.float32, device=device).view(-1, 1)


def _gather_from_planes(value: torch.Tensor, shapes: list[tuple[int, int]], loc_x: torch.Tensor, loc_y: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """:func:`ms_deform_attn_core_gather` on the x and y sampling locations as separate [B, Q, M, L, P] planes.

    Why planes: elementwise ops whose innermost dimension is the (x, y) pair of size 2, broadcast against
    per-level [L, 1, 2] sizes, run through TensorIterator's slow non-vectorised path. The same arithmetic
    (same operations, same order, so bit-identical) on planes took 22 vs 32 ms for the pixel coordinates and
    11 vs 37-43 ms for the bilinear weights per layer (reference-tiny-sized model at 1024², batch 2, 2 threads).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points = loc_x.shape
    device = value.device
    padded = []
    for value_l, (height, width) in zip(value.float().split([h * w for h, w in shapes], dim=1), shapes):
        value_l = value_l.view(batch, height, width, heads, head_dim).permute(0, 3, 1, 2, 4)  # [B, M, H, W, D]
        padded.append(F.pad(value_l, (0, 0, 1, 2, 1, 2)).flatten(2, 3))
    rows = torch.cat(padded, 2)  # [B, M, S', D], S' = sum (H+3)(W+3)
    layout = _GatherLayout.for_shapes(shapes)
    rows_per_map = layout.rows_per_map  # = rows.shape[2]
    index_dtype = torch.int32 if rows.shape[0] * heads * rows_per_map < 2**31 else torch.int64
    # grid_sample's own unnormalisation of grid = 2*loc - 1 (align_corners=False), to its rounding; clamped to
    # [-1, size] (see the docstring above)
    planes = []
    for loc, size in ((loc_x, _level_sizes(shapes, 1, device)), (loc_y, _level_sizes(shapes, 0, device))):
        pixel = (((2 * loc - 1) + 1) * size - 1) / 2
        pixel = torch.maximum(torch.minimum(pixel, size), size.new_tensor(-1.0))  # (not clamp: ties split the gradient)
        corner = pixel.floor()
        planes.append((corner.to(index_dtype) + 1, pixel - corner))  # position in the padded map, fraction
    (corner_x, frac_x), (corner_y, frac_y) = planes
    pitch = torch.tensor([w + 3 for _, w in shapes], dtype=index_dtype, device=device)  # [L]
    start = (torch.arange(batch * heads, dtype=index_dtype, device=device) * rows_per_map).view(batch, 1, heads, 1, 1)
    start = start + torch.tensor(layout.level_start, dtype=index_dtype, device=device).view(levels, 1)
    top_left = corner_y * pitch[:, None] + corner_x + start  # [B, Q, M, L, P]
    # bilinear weight of the 4 corners (top-left, top-right, bottom-left, bottom-right) times the attention weight
    attention = attention_weights.float()
    upper, lower, left = attention * (1 - frac_y), attention * frac_y, 1 - frac_x
    weight = torch.stack([upper * left, upper * frac_x, lower * left, lower * frac_x], -1)  # [B, Q, M, L, P, 4]
    bags = batch * queries * heads
    if rows.device.type == "cpu":
        output = _WeightedGatherCPU.apply(rows.view(-1, head_dim), top_left.view(bags, -1),
                                          weight.view(bags, -1, 4), layout)
    else:  # embedding_bag's own backward is fine on CUDA
        output = F.embedding_bag(_corner_index(top_left.view(bags, -1), layout), rows.view(-1, head_dim),
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
        impl = resolve_impl(self.impl, value.device)
        if impl == "gather":  # x and y as separate planes, the same arithmetic (see _gather_from_planes)
            (ref_x, ref_y), (offset_x, offset_y) = reference_points.float().unbind(-1), offsets.float().unbind(-1)
            loc_x = ref_x[:, :, None, :, None] + offset_x / _level_sizes(shapes, 1, offsets.device)
            loc_y = ref_y[:, :, None, :, None] + offset_y / _level_sizes(shapes, 0, offsets.device)
            return self.output_proj(_gather_from_planes(value, shapes, loc_x, loc_y, weights))
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=offsets.device)
        locations = (reference_points.float()[:, :, None, :, None, :]
                     + offsets.float() / normalizer[None, None, None, :, None, :])
        if impl == "cuda":
            shapes_t = torch.tensor(shapes, dtype=torch.long, device=value.device)
            if level_start_index is None:
                level_start_index = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
            # The Deformable-DETR kernels dispatch on float/double only: run them in fp32, like the core.
            output = _CompiledMSDeformAttnFunction.apply(value.float(), shapes_t, level_start_index, locations,
                                                         weights.float()).to(value.dtype)
        else:
            output = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
        return self.output_proj(output)
