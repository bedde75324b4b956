"""bf16 (and fp16) against fp32: every module finite and close, a training step with finite losses and
gradients, and predict on awkward inputs. CPU low-precision kernels have real bugs (a non-contiguous bf16
`grid_sample` returns ~1e30), so nothing here assumes that a cast model still computes the same thing.

Tolerances: bf16 keeps 8 mantissa bits, so one rounding is ~4e-3 relative; a stack of layers compounds it.
Module outputs must be within 5e-2 relative (Frobenius) error of fp32 and predicted masks agree on >= 99 %
of pixels.
"""
from __future__ import annotations

import pytest
import torch

from model_utils import make_batch, tiny_model
from modeling.test_connector import _config as connector_config
from modeling.test_vision_encoder import encoder, fixture_encoder
from segearthr1.configuration import SegEarthR1Config
from segearthr1.modeling.connector import build_connector
from segearthr1.modeling.description_projector import DescriptionProjector, PerceiverResampler
from segearthr1.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch
from segearthr1.modeling.pixel_decoder import MSDeformAttnPixelDecoder

REL_TOL = 5e-2
MASK_AGREEMENT = 0.99
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (tools/gpu_check.sh runs these on a GPU)")])]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":  # fp32 parity on CUDA means no TF32 shortcuts
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.param)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def assert_fp32_parity(module_out, fixture_out, device, what: str) -> None:
    """On CUDA also check fp32 against the reference recording (CPU parity is tested in tests/modeling)."""
    if device.type != "cpu":
        torch.testing.assert_close(module_out.float().cpu(), fixture_out, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def rel_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    low, ref = low.float(), ref.float()
    return ((low - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_close_low(low, ref, tol: float = REL_TOL, what: str = "output") -> None:
    assert torch.isfinite(low).all(), f"{what}: non-finite values in low precision"
    err = rel_error(low, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _cast(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.nn.Module:
    import copy
    return copy.deepcopy(module).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- regression
@pytest.mark.parametrize("batch", [1, 2])
def test_deform_core_bf16_on_non_contiguous_value_views(batch):
    """The per-level value maps are strided views of `value`; sampled in bf16 they used to come back as
    garbage (~1e30) on CPU. The core must return what fp32 returns, to bf16 accuracy."""
    torch.manual_seed(0)
    shapes = [(8, 8), (16, 16), (32, 32)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, 8, 32)
    locations = torch.rand(batch, 200, 8, 3, 4, 2)
    weights = torch.softmax(torch.randn(batch, 200, 8, 12), -1).view(batch, 200, 8, 3, 4)
    ref = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    # locations kept in fp32 as MSDeformAttn does; value/weights in bf16
    low = ms_deform_attn_core_pytorch(value.bfloat16(), shapes, locations, weights.bfloat16())
    assert low.dtype == torch.bfloat16
    assert low.abs().max() < 10 * ref.abs().max(), "bf16 sampling returned garbage"
    assert_close_low(low, ref, tol=1e-2, what="deform core")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_msdeformattn_layer_low_precision_full_dims(dtype):
    """Full-size dims (256-d, 8 heads, 3 levels, 4 points) on small maps."""
    torch.manual_seed(0)
    attn = MSDeformAttn.from_config(SegEarthR1Config())  # full-size dims
    with torch.no_grad():  # non-trivial offsets/weights (the reference init has zero weights)
        attn.sampling_offsets.weight.normal_(0, 0.05)
        attn.attention_weights.weight.normal_(0, 0.05)
    shapes = [(8, 8), (16, 16), (32, 32)]
    s = sum(h * w for h, w in shapes)
    x = torch.randn(2, s, 256)
    ref_points = torch.rand(2, s, 3, 2)
    with torch.no_grad():
        ref = attn(x, ref_points, x, shapes)
        low = _cast(attn, dtype)(x.to(dtype), ref_points.to(dtype), x.to(dtype), shapes)
    assert low.dtype == dtype
    assert_close_low(low, ref, what=f"MSDeformAttn {dtype}")


# ---------------------------------------------------------------------------------------------- modules
def test_swin_bf16_golden_weights(reference, device):
    fx = reference("swin.pt")
    enc = fixture_encoder(fx)
    x = fx["x1"].to(device)  # 200x264: every padding path
    with torch.no_grad():
        full = _cast(enc, torch.float32, device)(x)
        low = _cast(enc, torch.bfloat16, device)(x.bfloat16())
    for name, ref in zip(("res2", "res3", "res4", "res5"), fx["out1"]):
        assert_fp32_parity(full[name], ref, device, f"swin {name}")
        assert_close_low(low[name].cpu(), ref, what=f"swin {name}")


def test_swin_b_dims_bf16():
    """Swin-B widths and window 12 (the released encoder) on a small, odd-sized image."""
    torch.manual_seed(0)
    enc = encoder(depths=(2, 2, 2, 2), drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        ref = enc(x)
        low = _cast(enc, torch.bfloat16)(x.bfloat16())
    for name in ref:
        assert_close_low(low[name], ref[name], what=f"swin-B {name}")


def test_connector_bf16_golden_weights(reference, device):
    fx = reference("connector.pt")
    con = build_connector(connector_config("sparse_conv", 64, 48, 32))
    con.load_state_dict(fx["state_dict"])
    x = fx["x"].to(device)
    with torch.no_grad():
        assert_fp32_parity(_cast(con, torch.float32, device)(x), fx["y"], device, "connector")
        low = _cast(con, torch.bfloat16, device)(x.bfloat16())
    assert_close_low(low.cpu(), fx["y"], what="connector")


def test_description_projector_bf16_golden_weights(reference, device):
    fx = reference("description_projector.pt")
    cfg = fx["meta"]["config"]
    perceiver = PerceiverResampler(dim=cfg["dim"], depth=cfg["depth"], dim_head=cfg["dim_head"],
                                   num_heads=cfg["heads"], ff_mult=cfg["ff_mult"]).eval()
    perceiver.load_state_dict(fx["state_dict"])
    latents, x = on(device, fx["latents"], fx["x"])
    with torch.no_grad():
        assert_fp32_parity(_cast(perceiver, torch.float32, device)(latents=latents, x=x), fx["y"], device, "perceiver")
        low = _cast(perceiver, torch.bfloat16, device)(latents=latents.bfloat16(), x=x.bfloat16())
    assert_close_low(low.cpu(), fx["y"], what="perceiver")


def test_description_projector_full_dims_bf16():
    """Phi-1.5 width (2048) into the released 512-d projector, with variable-length descriptions."""
    torch.manual_seed(0)
    proj = DescriptionProjector.from_config(SegEarthR1Config()).eval()
    hidden = torch.randn(2, 40, 2048)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 5:17] = True
    mask[1, 8:30] = True
    res5 = torch.randn(2, 1024, 8, 8)
    with torch.no_grad():
        ref = proj(hidden, mask, res5)
        low = _cast(proj, torch.bfloat16)(hidden.bfloat16(), mask, res5.bfloat16())
    assert_close_low(low, ref, what="description projector (full dims)")


def test_pixel_decoder_bf16_golden_weights(reference, device):
    from modeling.test_pixel_decoder import _from_fixture_config

    fx = reference("pixel_decoder.pt")
    dec = _from_fixture_config(fx["meta"]["config"])
    dec.load_state_dict(fx["state_dict"])
    dec.eval()
    feats = {k: v.to(device) for k, v in fx["features"].items()}
    with torch.no_grad():
        full = _cast(dec, torch.float32, device).forward_features(feats)
        low = _cast(dec, torch.bfloat16, device).forward_features({k: v.bfloat16() for k, v in feats.items()})
    assert_fp32_parity(full.mask_features, fx["mask_features"], device, "pixel decoder mask_features")
    assert_close_low(low.mask_features.cpu(), fx["mask_features"], what="pixel decoder mask_features")
    for mine, ref in zip(low.multi_scale_features, fx["multi_scale_features"]):
        assert_close_low(mine.cpu(), ref, what="pixel decoder multi-scale")


def test_pixel_decoder_full_dims_bf16():
    """The released pixel decoder's dims (256-d, 6 deformable layers, FFN 1024) on a 128² image's maps."""
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder.from_config(SegEarthR1Config()).eval()
    feats = {f"res{i}": torch.randn(1, c, 128 // 2 ** i, 128 // 2 ** i) for i, c in zip(range(2, 6), (128, 256, 512, 1024))}
    with torch.no_grad():
        ref = dec.forward_features(feats)
        low = _cast(dec, torch.bfloat16).forward_features({k: v.bfloat16() for k, v in feats.items()})
    assert_close_low(low.mask_features, ref.mask_features, what="pixel decoder (full dims)")


def test_mask_decoder_bf16_golden_weights(reference, device):
    from modeling.test_mask_decoder import _from_fixture

    fx = reference("mask_decoder.pt")
    dec = _from_fixture(fx)
    feats = on(device, *fx["multi_scale_features"])
    mask_features, query = on(device, fx["mask_features"], fx["SEG_embedding"])
    with torch.no_grad():
        full = _cast(dec, torch.float32, device)(feats, mask_features, query)
        low = _cast(dec, torch.bfloat16, device)([f.bfloat16() for f in feats], mask_features.bfloat16(),
                                                 query.bfloat16())
    assert_fp32_parity(full.pred_masks, fx["pred_masks"], device, "mask decoder")
    assert_close_low(low.pred_masks.cpu(), fx["pred_masks"], what="mask decoder")
    agree = ((low.pred_masks.float().cpu() > 0) == (fx["pred_masks"] > 0)).float().mean().item()
    assert agree >= MASK_AGREEMENT, f"mask decoder: bf16 masks agree on {agree:.4f} of pixels"


# ---------------------------------------------------------------------------------------------- full model
def _to(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            v = [t.to(device) for t in v]
        out[k] = v
    return out


def _predict(model, batch, dtype, device="cpu"):
    return model.to(device=device, dtype=dtype).eval().predict(**_to(batch, device, dtype))


@pytest.mark.parametrize("image_size", [128, 200])
def test_model_predict_bf16_matches_fp32(image_size, device):
    """Whole model, bf16 vs fp32; 200 is not a multiple of the window or of 32 (every padding path)."""
    model = tiny_model(image_size=image_size).eval()
    batch = make_batch("reason_seg", batch_size=2, image_size=image_size)
    ref = model.predict(**batch)
    low = _predict(model, batch, torch.bfloat16, device)
    assert torch.isfinite(low.mask_logits).all()
    assert_close_low(low.mask_logits.cpu(), ref.mask_logits, what="model mask logits")
    agree = (low.masks.cpu() == ref.masks).float().mean().item()
    assert agree >= MASK_AGREEMENT, f"bf16 masks agree with fp32 on {agree:.4f} of pixels"


def test_model_predict_non_contiguous_images_bf16():
    """Images that are a strided view (a crop of a larger batch, channels-last) give the same masks."""
    model = tiny_model(image_size=128).eval()
    batch = make_batch("refer_seg", batch_size=2, image_size=128)
    ref = model.predict(**batch)
    big = torch.zeros(2, 3, 160, 150)
    big[:, :, 16:144, 11:139] = batch["images"]
    strided = dict(batch, images=big[:, :, 16:144, 11:139])
    assert not strided["images"].is_contiguous()
    low = _predict(model, strided, torch.bfloat16)
    agree = (low.masks == ref.masks).float().mean().item()
    assert agree >= MASK_AGREEMENT, f"non-contiguous bf16 input: masks agree on {agree:.4f}"


@pytest.mark.parametrize("kind", ["reason_seg", "refer_seg"])
def test_training_step_bf16_finite(kind):
    """Forward + backward in bf16: every loss part and every trainable gradient finite, and the
    losses close to fp32's."""
    torch.manual_seed(0)
    model = tiny_model(image_size=128)
    model.point_sampler = lambda logits: torch.rand(logits.shape[0], 64, 2, generator=torch.Generator().manual_seed(1)).to(logits.device)
    batch = make_batch(kind, batch_size=2, image_size=128)
    model.train()
    ref = model(**batch)
    low_model = model.to(torch.bfloat16)
    low_batch = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    out = low_model(**low_batch)
    for name in ("loss", "loss_mask", "loss_dice", "loss_llm"):
        value = getattr(out, name)
        assert torch.isfinite(value).all(), f"{name} is not finite in bf16"
        assert abs(value.float().item() - getattr(ref, name).item()) <= 0.05 * abs(getattr(ref, name).item()) + 1e-3, name
    out.loss.backward()
    trainable = [(n, p) for n, p in low_model.named_parameters() if p.requires_grad]
    with_grad = {n.split(".")[0] for n, p in trainable if p.grad is not None}
    assert {"connector", "language_model", "description_projector", "pixel_decoder",
            "mask_decoder"} <= with_grad, with_grad
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite bf16 gradients: {bad[:5]}"
