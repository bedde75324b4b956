"""bf16/fp16 matrix products in fp32 on CPUs without native low-precision kernels
(segearthr1/perf/cpu_low_precision.py).

The CPU here may have the native kernels (AVX-512 bf16); turning oneDNN off sends bf16 through PyTorch's
reference kernels, the path an AVX2-only CPU takes, so `auto` is exercised for real either way.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from model_utils import make_batch, tiny_model
from segearthr1.perf import cpu_low_precision as lowp
from segearthr1.perf.cpu_low_precision import Fp32Products, cpu_products_in_fp32, needs_fp32_products

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


@pytest.fixture
def reference_kernels(monkeypatch):
    """bf16 on PyTorch's reference CPU kernels (oneDNN off), `auto` setting."""
    monkeypatch.delenv(lowp.ENV_VAR, raising=False)
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _gen(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rounded_fp32(fn, *tensors, dtype=torch.bfloat16):
    out = fn(*(t.float() for t in tensors))
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_are_fp32_rounded_once(dtype):
    a, b, c = _gen(3, 40, 24, dtype=dtype, seed=1), _gen(3, 24, 16, dtype=dtype, seed=2), _gen(3, 40, 16, dtype=dtype)
    bias, x, w = _gen(16, dtype=dtype, seed=3), _gen(2, 4, 9, 9, dtype=dtype, seed=4), _gen(5, 4, 3, 3, dtype=dtype, seed=5)
    cases = {
        "mm": (lambda p, q: p @ q, (a[0], b[0])),
        "addmm": (lambda p, q, r: torch.addmm(r, p, q), (a[0], b[0], bias)),
        "bmm": (torch.bmm, (a, b)),
        "baddbmm": (lambda p, q, r: torch.baddbmm(r, p, q, beta=0.5, alpha=2.0), (a, b, c)),
        "convolution": (lambda p, q: F.conv2d(p, q, padding=1), (x, w)),
    }
    for name, (fn, args) in cases.items():
        with Fp32Products() as mode:
            out = fn(*args)
        assert mode.calls[f"{name}.default"] == 1, (name, dict(mode.calls))
        assert out.dtype == dtype, name
        torch.testing.assert_close(out, _rounded_fp32(fn, *args, dtype=dtype), rtol=0, atol=0, msg=name)


def test_attention_backward_in_fp32_forward_native():
    """The CPU flash attention: its forward is left to PyTorch (as fast as fp32 on the reference path, and
    bit-identical to native bf16), its backward runs in fp32 on the forward's own output and logsumexp."""
    q, k, v = (_gen(2, 3, 11, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.zeros(2, 1, 11, 11).masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf")).bfloat16()
    with Fp32Products() as mode:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().square().sum().backward()
    assert "_scaled_dot_product_flash_attention_for_cpu.default" not in mode.calls
    assert mode.calls["_scaled_dot_product_flash_attention_for_cpu_backward.default"] == 1
    native = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    torch.testing.assert_close(out.detach(), native, rtol=0, atol=0)
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    grads = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    (F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask.double()).square().sum()).backward()
    for got, ref in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_backward_products_are_covered_when_the_mode_spans_backward():
    """A linear layer's weight and input gradients: the backward's mm calls are upcast too."""
    w = _gen(6, 5, seed=1).requires_grad_()
    x = _gen(7, 5, seed=2).requires_grad_()
    with Fp32Products() as mode:
        y = F.linear(x, w)
        y.float().sum().backward()
    assert mode.calls["mm.default"] >= 3, dict(mode.calls)  # forward + grad_input + grad_weight
    ones = torch.ones(7, 6)
    torch.testing.assert_close(w.grad, (ones.t() @ x.detach().float()).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, (ones @ w.detach().float()).bfloat16(), rtol=0, atol=0)


def test_mixed_dtypes_and_fp32_pass_through_unchanged():
    a16, a32 = _gen(4, 4), _gen(4, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError) as native:
        a16 @ a32
    with Fp32Products() as mode, pytest.raises(RuntimeError) as moded:
        a16 @ a32
    assert str(moded.value) == str(native.value)
    with Fp32Products() as fresh:
        out = a32 @ a32
    assert out.dtype == torch.float32 and not mode.calls and not fresh.calls


def test_when_it_applies(monkeypatch):
    monkeypatch.delenv(lowp.ENV_VAR, raising=False)
    for native in (True, False):
        monkeypatch.setattr(lowp, "has_native_kernels", lambda dtype, native=native: native)
        assert needs_fp32_products(torch.bfloat16, "cpu") is (not native)
        assert needs_fp32_products(torch.float16, CPU) is (not native)
        assert not needs_fp32_products(torch.float32, "cpu")
        assert not needs_fp32_products(torch.bfloat16, "cuda")
    monkeypatch.setattr(lowp, "has_native_kernels", lambda dtype: True)
    monkeypatch.setenv(lowp.ENV_VAR, "fp32")
    assert needs_fp32_products(torch.bfloat16, "cpu") and not needs_fp32_products(torch.float32, "cpu")
    monkeypatch.setattr(lowp, "has_native_kernels", lambda dtype: False)
    monkeypatch.setenv(lowp.ENV_VAR, "native")
    assert not needs_fp32_products(torch.bfloat16, "cpu")
    assert isinstance(cpu_products_in_fp32(torch.bfloat16, "cpu"), contextlib.nullcontext)
    monkeypatch.setenv(lowp.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{lowp.ENV_VAR}='fast': expected one of auto, fp32, native"):
        needs_fp32_products(torch.bfloat16, "cpu")


def test_onednn_off_means_no_native_kernels(reference_kernels):
    assert not lowp.has_native_kernels(torch.bfloat16) and not lowp.has_native_kernels(torch.float16)
    assert isinstance(cpu_products_in_fp32(torch.bfloat16, "cpu"), Fp32Products)


def test_nested_contexts_dispatch_once(monkeypatch):
    monkeypatch.setenv(lowp.ENV_VAR, "fp32")
    with cpu_products_in_fp32(torch.bfloat16, "cpu") as outer:
        assert isinstance(outer, Fp32Products)
        assert isinstance(cpu_products_in_fp32(torch.bfloat16, "cpu"), contextlib.nullcontext)
    assert isinstance(cpu_products_in_fp32(torch.bfloat16, "cpu"), Fp32Products)


def test_model_predict_uses_it_and_matches_fp32(reference_kernels, monkeypatch):
    """`predict` in bf16 on the reference kernels runs its products in fp32 (counted) and its masks agree
    with fp32's as native bf16's must (test_low_precision.py: >= 99 %)."""
    seen = []
    original = Fp32Products.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        if func in lowp.PRODUCT_OPS:
            seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Fp32Products, "__torch_dispatch__", counting)
    model = tiny_model(image_size=128).eval()
    batch = make_batch("reason_seg", batch_size=2, image_size=128)
    ref = model.predict(**batch)
    model.to(torch.bfloat16)
    low = model.predict(**{k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
                           for k, v in batch.items()})
    assert len(seen) > 50, len(seen)  # Swin, LLM, projector and decoders all go through it
    assert torch.isfinite(low.mask_logits).all()
    agree = (low.masks == ref.masks).float().mean().item()
    assert agree >= 0.99, f"bf16 (fp32 products) masks agree with fp32 on {agree:.4f} of pixels"


def test_training_step_under_it_has_finite_losses_and_gradients(reference_kernels):
    torch.manual_seed(0)
    model = tiny_model(image_size=128).train().to(torch.bfloat16)
    batch = make_batch("reason_seg", batch_size=2, image_size=128)
    batch = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    with cpu_products_in_fp32(torch.bfloat16, "cpu") as mode:
        out = model(**batch)
        out.loss.backward()
    assert mode.calls["convolution_backward.default"] > 0 and mode.calls["mm.default"] > 0
    assert all(torch.isfinite(getattr(out, n)).all() for n in ("loss", "loss_mask", "loss_dice", "loss_llm"))
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_predictor_bf16_with_answers_goes_through_it(reference_kernels, monkeypatch, tmp_path):
    """A saved checkpoint loaded in bf16 (`Predictor(dtype="bf16")`, the CLI's path): the mask prediction
    and the answer generation (`explain=True`) both run their products in fp32, and the masks agree with
    the fp32 predictor's."""
    import numpy as np

    from model_utils import trained_tokenizer
    from segearthr1.inference.predictor import Predictor
    from segearthr1.weights.pretrained import save_pretrained

    tokenizer = trained_tokenizer()
    ckpt = save_pretrained(tiny_model(seed=0).eval(), tokenizer, tmp_path / "model")
    entered = []
    original = Fp32Products.__enter__
    monkeypatch.setattr(Fp32Products, "__enter__", lambda self: entered.append(self) or original(self))
    rgb = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    low = Predictor(ckpt, device="cpu", dtype="bf16").predict(rgb, "where is the red car?", explain=True,
                                                              max_new_tokens=4)
    assert len(entered) == 2 and all(mode.calls["mm.default"] > 0 for mode in entered)  # predict, then answers
    assert isinstance(low.answer, str) and 1 <= low.record["answer_tokens"] <= 4
    assert low.record["dtype"] == "bfloat16"
    ref = Predictor(ckpt, device="cpu", dtype="fp32").predict(rgb, "where is the red car?")
    assert len(entered) == 2  # fp32: not entered
    assert (low.mask == ref.mask).mean() >= 0.99
