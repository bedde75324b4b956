"""bf16/fp16 matrix products on CPUs without native low-precision kernels, computed in fp32.

Why: without oneDNN's bf16 kernels (AVX-512 bf16 / AMX; fp16 needs AVX-512 FP16) PyTorch runs bf16/fp16
matrix products and convolutions through its reference loops. Measured on 2 cores (oneDNN off, to get
that path on a CPU that has the kernels): a bf16 `a @ b` of 512x2048 by 2048x2048 at 0.4 GFLOP/s against
180 in fp32, a tiny-config training step 0.64 s against 0.09 s native, a full-size predict at 1024² 343 s
against 8 s; a full-size bf16 backward at 512² did not finish in 20 minutes on an AVX2-only EPYC. The CPU
flash attention's backward took 2.8x its fp32 time (Swin-B windows at 1024²), its forward the same as
fp32, so only the backward is taken over.

Under `Fp32Products` those ops upcast their operands (exact), compute in fp32 and round the result to
the input dtype once: what the native bf16 kernels do too (fp32 accumulation, one rounding), so the
numbers equal native bf16 up to summation order. Everything else (weights, stored activations, norms,
activations, the attention forward) stays in low precision. The tiny step then takes 0.13-0.15 s: the
rest is the Python dispatch of every op through the mode, which is why it is only switched on where the
reference loops would run.

`SEGEARTHR1_CPU_LOWP_PRODUCTS`: `auto` (default: on for bf16/fp16 on a CPU without the native kernels),
`fp32` (on for bf16/fp16 on every CPU), `native` (off: PyTorch's own kernels).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves, tree_map

logger = logging.getLogger(__name__)

ENV_VAR = "SEGEARTHR1_CPU_LOWP_PRODUCTS"
SETTINGS = ("auto", "fp32", "native")
LOW_PRECISION = (torch.bfloat16, torch.float16)

_aten = torch.ops.aten
# every output of these is rounded back to the inputs' dtype; the attention forward is left native (as fast
# as fp32 on the reference path)
PRODUCT_OPS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten.mv.default, _aten.addmv.default, _aten.dot.default,
    _aten.convolution.default, _aten.convolution_backward.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
})
# ops that natively take an fp32 tensor next to low-precision ones (the attention backward's logsumexp)
_MIXED_INPUT_OPS = {_aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _common_low_dtype(func, args, kwargs) -> torch.dtype | None:
    """The one low-precision dtype of the op's floating inputs, or None (nothing to do, or mixed dtypes:
    then the native op runs and raises or promotes exactly as it would without the mode)."""
    dtypes = {x.dtype for x in tree_leaves((args, kwargs)) if _floating(x)}
    low = dtypes & set(LOW_PRECISION)
    if len(low) != 1:
        return None
    rest = dtypes - low
    if rest and not (rest == {torch.float32} and func in _MIXED_INPUT_OPS):
        return None
    return low.pop()


class Fp32Products(TorchDispatchMode):
    """Runs `PRODUCT_OPS` on low-precision CPU tensors in fp32 and rounds their outputs back (module
    docstring: why, and what it costs). `calls` counts the ops it upcast, by name."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        low = _common_low_dtype(func, args, kwargs) if func in PRODUCT_OPS else None
        if low is None:
            return func(*args, **kwargs)
        self.calls[func.__name__] += 1
        args, kwargs = tree_map(lambda x: x.float() if _floating(x) and x.dtype == low else x, (args, kwargs))
        return tree_map(lambda y: y.to(low) if _floating(y) else y, func(*args, **kwargs))


def setting() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(SETTINGS)}")
    return value


def has_native_kernels(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs `dtype` matrix products on this CPU (it must be built in and enabled)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    name = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    check = getattr(torch.ops.mkldnn, name, None) if name else None
    return bool(check()) if check is not None else True


def needs_fp32_products(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `Fp32Products` applies to a model in `dtype` on `device` under the current setting."""
    if torch.device(device).type != "cpu" or dtype not in LOW_PRECISION:
        return False
    mode = setting()
    return mode == "fp32" or (mode == "auto" and not has_native_kernels(dtype))


def cpu_products_in_fp32(dtype: torch.dtype, device: torch.device | str) -> contextlib.AbstractContextManager:
    """`Fp32Products()` where `needs_fp32_products`, else a context that does nothing. Enter it around the
    forward *and* the backward (the mode is thread-local and the CPU backward runs on the calling thread)."""
    if not needs_fp32_products(dtype, device) or _active():
        return contextlib.nullcontext()
    _log_once(dtype)
    return Fp32Products()


def _active() -> bool:
    """An `Fp32Products` is already on this thread's mode stack (nesting would dispatch every op twice)."""
    return any(isinstance(m, Fp32Products) for m in _get_current_dispatch_mode_stack())


def cpu_products_in_fp32_for(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`cpu_products_in_fp32` for a module's first low-precision parameter (none: a context that does nothing)."""
    param = next((p for p in module.parameters() if p.dtype in LOW_PRECISION), None)
    return contextlib.nullcontext() if param is None else cpu_products_in_fp32(param.dtype, param.device)


@functools.lru_cache(maxsize=None)
def _log_once(dtype: torch.dtype) -> None:
    why = ("forced by " + ENV_VAR + "=fp32") if setting() == "fp32" else \
        "this CPU has no native kernels for it (no AVX-512 bf16/FP16 or AMX, or oneDNN is off)"
    logger.info("%s on CPU: matrix products, convolutions and the attention backward run in fp32 and are rounded "
                "back (%s; %s=native keeps PyTorch's reference kernels, several times slower)",
                str(dtype).replace("torch.", ""), why, ENV_VAR)
