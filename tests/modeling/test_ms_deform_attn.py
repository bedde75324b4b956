"""Multi-scale deformable attention: both pure-PyTorch cores (grid_sample, gather) vs a slow per-point
reference and each other (values and gradients), init, impl choice."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from segearthr1.configuration import SegEarthR1Config
from segearthr1.errors import DependencyNotFoundError
from segearthr1.modeling import ms_deform_attn as mda
from segearthr1.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_gather, ms_deform_attn_core_pytorch

CORES = pytest.mark.parametrize("core", [ms_deform_attn_core_pytorch, ms_deform_attn_core_gather], ids=["grid_sample", "gather"])


def slow_core(value, shapes, locations, weights):
    """Obviously-correct loop version: bilinear interpolation by hand, zero outside the map.

    A location (x, y) in [0, 1] maps to continuous pixel coordinates (x*W - 0.5, y*H - 0.5)
    (align_corners=False: pixel centres at integer + 0.5 in [0, W)).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dim, dtype=torch.float64)
                        for yi, xi in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yi < h and 0 <= xi < w:
                                coef = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                sample += coef * value[b, starts[lvl] + yi * w + xi, m].double()
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * sample
    return out.reshape(batch, queries, heads * dim)


def _random_case(batch=2, heads=2, dim=3, shapes=((3, 4), (2, 2), (1, 3)), queries=5, points=2):
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    # Some locations fall outside [0, 1] to exercise zero padding.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    return value, list(shapes), locations, weights


@CORES
def test_core_matches_slow_reference(core):
    value, shapes, locations, weights = _random_case()
    fast = core(value, shapes, locations, weights)
    assert fast.shape == (2, 5, 6) and fast.dtype == value.dtype
    torch.testing.assert_close(fast.double(), slow_core(value, shapes, locations, weights), atol=1e-5, rtol=1e-5)
    # spatial shapes given as a long tensor (the reference call form) give the same result
    torch.testing.assert_close(core(value, torch.tensor(shapes), locations, weights), fast)


@CORES
def test_core_exact_pixel_centres_and_outside(core):
    """At a pixel centre the sample is that pixel; far outside the map, and on the far side of every
    border, it is zero; half a pixel beyond the last centre it is half that pixel (zero padding)."""
    value = torch.arange(1.0, 13.0).view(1, 12, 1, 1)  # one level 3x4, one head, dim 1; pixel (r, c) = 4r + c + 1
    shapes = [(3, 4)]
    cases = [((2.5 / 4, 1.5 / 3), 7.0), ((2.0, 2.0), 0.0), ((-1.0, 0.5), 0.0), ((0.5, -3.0), 0.0),
             ((0.5, 5.0), 0.0), ((1.0, 0.5 / 3), 2.0), ((0.0, 0.5 / 3), 0.5)]
    for (x, y), expected in cases:
        locations = torch.tensor([x, y]).view(1, 1, 1, 1, 1, 2)
        out = core(value, shapes, locations, torch.ones(1, 1, 1, 1, 1))
        assert out.item() == pytest.approx(expected, abs=1e-6), (x, y)


@CORES
def test_core_rejects_inconsistent_shapes(core):
    value, shapes, locations, weights = _random_case()
    with pytest.raises(ValueError, match="positions"):
        core(value, [(3, 4), (2, 2), (1, 2)], locations, weights)
    with pytest.raises(ValueError, match="levels"):
        core(value, shapes[:2], locations, weights)


def _core_with_grads(core, value, shapes, locations, weights, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = core(leaves[0], shapes, leaves[1], leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def test_gather_core_matches_grid_sample_core_with_gradients():
    """Values and all three gradients agree (odd level sizes, batch 2, locations in and around the maps).
    Locations stay off pixel centres, where bilinear sampling has a kink and each core may pick a side."""
    value, shapes, locations, weights = _random_case(batch=2, heads=3, dim=5, shapes=((7, 5), (4, 3), (2, 1)),
                                                     queries=11, points=3)
    grad_out = torch.randn(2, 11, 15)
    ref_out, ref_grads = _core_with_grads(ms_deform_attn_core_pytorch, value, shapes, locations, weights, grad_out)
    out, grads = _core_with_grads(ms_deform_attn_core_gather, value, shapes, locations, weights, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=name)


def test_gather_core_low_precision_inputs_are_sampled_in_fp32():
    """bf16 values/locations give the fp32 result of the same (rounded) inputs, returned in bf16."""
    value, shapes, locations, weights = _random_case(batch=1, heads=2, dim=4, shapes=((9, 6), (5, 3), (2, 2)),
                                                     queries=13, points=4)
    low = [t.bfloat16() for t in (value, locations, weights)]
    out = ms_deform_attn_core_gather(low[0], shapes, low[1], low[2])
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_core_pytorch(low[0].float(), shapes, low[1].float(), low[2].float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    strided = ms_deform_attn_core_gather(low[0].transpose(2, 3).contiguous().transpose(2, 3), shapes, low[1], low[2])
    torch.testing.assert_close(strided, out, atol=0, rtol=0)


def _gather_case(dtype=torch.float64):
    """Two (batch, head) maps of two padded levels (3x4 -> 6x7 rows, 2x2 -> 5x5) and 7 bags of 2 levels x 3
    points whose top-left corners are random valid positions, with repeats (shared corners)."""
    gen = torch.Generator().manual_seed(3)
    layout = mda._GatherLayout.for_shapes([(3, 4), (2, 2)])
    assert layout == mda._GatherLayout(rows_per_map=67, level_start=(0, 42), level_rows=(42, 25),
                                       corner_steps=((0, 1, 7, 8), (0, 1, 5, 6)))
    maps = torch.randint(0, 2, (7, 1, 1), generator=gen) * 67
    level0 = torch.randint(0, 5, (7, 1, 3), generator=gen) * 7 + torch.randint(0, 6, (7, 1, 3), generator=gen)
    level1 = 42 + torch.randint(0, 4, (7, 1, 3), generator=gen) * 5 + torch.randint(0, 4, (7, 1, 3), generator=gen)
    top_left = (maps + torch.cat([level0, level1], 1)).view(7, 6)
    top_left[3] = top_left[2]  # two bags sampling the very same corners
    top_left[5, 1] = top_left[5, 0]  # two samples of one bag on the same corner
    rows = torch.randn(134, 4, generator=gen, dtype=dtype)
    weight = torch.rand(7, 6, 4, generator=gen, dtype=dtype)
    return rows, top_left.to(torch.int32), weight, layout


def test_weighted_gather_cpu_backward_gradcheck():
    """The hand-written CPU backward (transposed embedding_bag + sampled_addmm) is the true gradient."""
    rows, top_left, weight, layout = _gather_case()
    fn = lambda r, w: mda._WeightedGatherCPU.apply(r, top_left, w, layout)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rows.requires_grad_(), weight.requires_grad_()))


def test_weighted_gather_cpu_matches_embedding_bag_autograd():
    """float32: same output and gradients as autograd through F.embedding_bag over the corner index (the
    CUDA path), and only the requested gradients are computed."""
    rows, top_left, weight, layout = _gather_case(torch.float32)
    grad_out = torch.randn(7, 4)
    index = mda._corner_index(top_left, layout)
    assert index.shape == (7, 24) and int(index.max()) < 134
    leaves = [rows.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = torch.nn.functional.embedding_bag(index, leaves[0], per_sample_weights=leaves[1].flatten(1), mode="sum")
    expected.backward(grad_out)
    mine = [rows.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = mda._WeightedGatherCPU.apply(mine[0], top_left, mine[1], layout)
    out.backward(grad_out)
    torch.testing.assert_close(out, expected.detach(), atol=0, rtol=0)
    for got, want in zip(mine, leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-6)
    frozen_rows = rows.clone()
    only_weight = weight.clone().requires_grad_()
    mda._WeightedGatherCPU.apply(frozen_rows, top_left, only_weight, layout).backward(grad_out)
    torch.testing.assert_close(only_weight.grad, leaves[1].grad, atol=1e-6, rtol=1e-6)
    assert frozen_rows.grad is None


@pytest.mark.parametrize("impl", ["pytorch", "gather"])
def test_layer_impls_agree(impl):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2, impl=impl)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.3)
    shapes = [(6, 5), (3, 3), (2, 1)]
    x = torch.randn(2, 41, 16)
    ref = torch.rand(2, 41, 3, 2)
    out = attn(x, ref, x, shapes)
    attn.impl = "pytorch"
    torch.testing.assert_close(out, attn(x, ref, x, shapes), atol=1e-5, rtol=1e-5)


def _interleaved_gather_inputs(attn, query, reference_points, shapes):
    """The gather core's (top-left row, corner weight) computed the way it was before the x/y planes: on
    [..., 2] location tensors broadcast against [L, 1, 2] sizes (the reference's formulation)."""
    batch, queries, _ = query.shape
    heads, levels, points = attn.num_heads, attn.num_levels, attn.num_points
    offsets = attn.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
    weights = torch.softmax(attn.attention_weights(query).view(batch, queries, heads, levels * points), -1)
    weights = weights.view(batch, queries, heads, levels, points)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    layout = mda._GatherLayout.for_shapes(shapes)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
    pixel = (((2 * locations - 1) + 1) * sizes - 1) / 2
    pixel = torch.maximum(torch.minimum(pixel, sizes), sizes.new_tensor(-1.0))
    corner = pixel.floor()
    frac_x, frac_y = (pixel - corner).unbind(-1)
    corner = corner.to(torch.int32) + 1
    pitch = torch.tensor([w + 3 for _, w in shapes], dtype=torch.int32)
    start = (torch.arange(batch * heads, dtype=torch.int32) * layout.rows_per_map).view(batch, 1, heads, 1, 1)
    start = start + torch.tensor(layout.level_start, dtype=torch.int32).view(levels, 1)
    top_left = corner[..., 1] * pitch[:, None] + corner[..., 0] + start
    weight_y = weights.unsqueeze(-1) * torch.stack([1 - frac_y, frac_y], -1)
    weight = (weight_y.unsqueeze(-1) * torch.stack([1 - frac_x, frac_x], -1).unsqueeze(-2)).flatten(-2)
    return top_left, weight


def test_gather_layer_on_xy_planes_is_bit_identical_to_the_interleaved_formulation(monkeypatch):
    """The layer computes x and y on separate planes (fast elementwise paths); values, index and weights, and
    every gradient must equal the interleaved [..., 2] arithmetic bit for bit, on and off the map's edges."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2, impl="gather")
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0, 0.5)
    shapes = [(7, 5), (4, 3), (2, 1)]
    queries = sum(h * w for h, w in shapes)
    query, values = torch.randn(2, queries, 16), torch.randn(2, queries, 16)
    reference_points = torch.rand(2, queries, 3, 2) * 1.4 - 0.2
    reference_points[0, :4] = torch.tensor([-1.0 / 10, 1.0 + 2.0 / 5]).view(1, 1, 2)  # clamped onto -1 / size
    seen = {}
    original = mda._WeightedGatherCPU.apply
    monkeypatch.setattr(mda._WeightedGatherCPU, "apply",
                        lambda rows, top_left, weight, layout: seen.update(top_left=top_left, weight=weight)
                        or original(rows, top_left, weight, layout))
    leaves = [t.clone().requires_grad_() for t in (query, reference_points, values)]
    out = attn(leaves[0], leaves[1], leaves[2], shapes)
    expected_top_left, expected_weight = _interleaved_gather_inputs(attn, query, reference_points, shapes)
    assert torch.equal(seen["top_left"].view_as(expected_top_left), expected_top_left)
    assert torch.equal(seen["weight"].view_as(expected_weight), expected_weight.detach())
    grad = torch.randn_like(out)
    out.backward(grad)
    grads = [leaf.grad for leaf in leaves] + [param.grad.clone() for param in attn.parameters()]

    attn.zero_grad()
    monkeypatch.setattr(mda._WeightedGatherCPU, "apply", original)
    old = [t.clone().requires_grad_() for t in (query, reference_points, values)]
    top_left, weight = _interleaved_gather_inputs(attn, old[0], old[1], shapes)
    value = attn.value_proj(old[2]).view(2, queries, 4, 4)
    batch_rows = torch.cat([torch.nn.functional.pad(v.view(2, h, w, 4, 4).permute(0, 3, 1, 2, 4), (0, 0, 1, 2, 1, 2))
                            .flatten(2, 3) for v, (h, w) in zip(value.split([h * w for h, w in shapes], 1), shapes)], 2)
    bags = 2 * queries * 4
    core = original(batch_rows.reshape(-1, 4), top_left.reshape(bags, -1), weight.reshape(bags, -1, 4),
                    mda._GatherLayout.for_shapes(shapes))
    old_out = attn.output_proj(core.view(2, queries, 16))
    assert torch.equal(out, old_out)
    old_out.backward(grad)
    for new_grad, old_grad in zip(grads, [leaf.grad for leaf in old] + [param.grad for param in attn.parameters()]):
        assert torch.equal(new_grad, old_grad)


def test_parameter_names_and_reference_init():
    attn = MSDeformAttn(d_model=16, num_levels=3, num_heads=4, num_points=2, impl="pytorch")
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (4 * 3 * 2 * 2, 16), "sampling_offsets.bias": (48,),
        "attention_weights.weight": (4 * 3 * 2, 16), "attention_weights.bias": (24,),
        "value_proj.weight": (16, 16), "value_proj.bias": (16,),
        "output_proj.weight": (16, 16), "output_proj.bias": (16,),
    }
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    # Radial grid: 4 heads at angles 0, 90, 180, 270 degrees; point p at distance p+1; same per level.
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, None, :] * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    torch.testing.assert_close(bias, expected.expand(4, 3, 2, 2), atol=1e-6, rtol=0)


def test_zero_offsets_sample_the_reference_pixel():
    """With zero offsets and one level, sampling at pixel centres returns each pixel's own value."""
    attn = MSDeformAttn(d_model=8, num_levels=1, num_heads=2, num_points=3, impl="pytorch")
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    h, w = 3, 5
    x = torch.randn(2, h * w, 8)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    ref = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None, :, None, :].expand(2, -1, 1, -1)
    out = attn(torch.randn(2, h * w, 8), ref, x, [(h, w)])
    torch.testing.assert_close(out, attn.output_proj(attn.value_proj(x)), atol=1e-5, rtol=1e-5)


def test_offsets_are_normalised_per_level_by_width_and_height():
    """An offset of (+1, 0) pixels on a level moves the sample exactly one pixel to the right there."""
    attn = MSDeformAttn(d_model=4, num_levels=2, num_heads=1, num_points=1, impl="pytorch")
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))  # level0: +1 px x; level1: +1 px y
        attn.attention_weights.bias.copy_(torch.tensor([0.0, -1e4]))  # only level 0 counts
        attn.value_proj.weight.copy_(torch.eye(4))
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.copy_(torch.eye(4))
        attn.output_proj.bias.zero_()
    shapes = [(2, 4), (4, 2)]
    values = torch.randn(1, 16, 4)
    ref = torch.tensor([[(0.5 / 4, 0.5 / 2), (0.5 / 2, 0.5 / 4)]])[:, None].expand(1, 1, 2, 2)
    out = attn(torch.zeros(1, 1, 4), ref, values, shapes)
    torch.testing.assert_close(out[0, 0], values[0, 1], atol=1e-5, rtol=1e-5)  # level 0, row 0, col 1


def test_impl_selection(caplog):
    with pytest.raises(ValueError, match=r"pixel_decoder.deform_attn_impl='triton'.*'auto', 'gather', 'pytorch', 'cuda'"):
        SegEarthR1Config(pixel_decoder={"deform_attn_impl": "triton"})
    attn = MSDeformAttn.from_config(SegEarthR1Config(pixel_decoder={"deform_attn_impl": "auto", "num_points": 2}))
    assert (attn.impl, attn.d_model, attn.num_levels, attn.num_heads, attn.num_points) == ("auto", 256, 3, 8, 2)
    if mda._compiled_op() is None:
        with pytest.raises(DependencyNotFoundError, match="MultiScaleDeformableAttention"):
            mda.resolve_impl("cuda", torch.device("cpu"))
    mda._log_auto_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="segearthr1.modeling.ms_deform_attn"):
        assert mda.resolve_impl("auto", torch.device("cpu")) == "gather"
        assert mda.resolve_impl("auto", torch.device("cpu")) == "gather"
    assert sum("impl=auto -> gather" in r.getMessage() for r in caplog.records) == 1
    assert mda.resolve_impl("pytorch", torch.device("cpu")) == "pytorch"
    assert mda.resolve_impl("gather", torch.device("cpu")) == "gather"


def test_gradients_reach_all_parameters():
    attn = MSDeformAttn(d_model=8, num_levels=2, num_heads=2, num_points=2, impl="pytorch")
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    shapes = [(3, 3), (2, 2)]
    x = torch.randn(1, 13, 8)
    ref = torch.rand(1, 13, 2, 2)
    attn(x, ref, x, shapes).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    value, shapes, locations, weights = _random_case(batch=2, heads=4, dim=8, shapes=((16, 12), (8, 6), (4, 3)), queries=50, points=4)
    cpu = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    dev = torch.device("cuda")
    for core in (ms_deform_attn_core_pytorch, ms_deform_attn_core_gather):
        gpu = core(value.to(dev), shapes, locations.to(dev), weights.to(dev))
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
    if mda._compiled_op() is not None:
        shapes_t = torch.tensor(shapes, device=dev)
        start = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
        compiled = mda._CompiledMSDeformAttnFunction.apply(value.to(dev), shapes_t, start, locations.to(dev), weights.to(dev))
        torch.testing.assert_close(compiled.cpu(), cpu, atol=1e-5, rtol=1e-4)
