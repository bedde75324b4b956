"""DeepSpeed's per-step gradient work that is the identity when the whole job is one process.

After every backward, DeepSpeed's stage-0 engine flattens all gradients into one buffer, "all-reduces"
it over the data-parallel group and copies it back; before the optimizer step it clips with a Python
loop of one norm per parameter plus a gloo all-reduce of the total. In a one-process job (the CPU
quickstart, a single-GPU run with `scripts/zero0.json`) the all-reduces sum one term and divide by 1,
so both are exact no-ops in cost only: py-spy on the quickstart put the reduction at 4.6 % and the
clipping at 3.2 % of a step. `skip_identity_collectives` replaces the reduction by what it leaves behind
(zero gradients for parameters that got none) and swaps in a clipping with the same arithmetic done by
foreach kernels; gradients and weights stay bit-identical (tests/test_lone_process.py compares them
against the untouched engine).
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _one_process_job() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() == 1


def identity_collectives_reason(engine) -> str | None:
    """Why the engine's reductions are *not* plain identities here (None = they are)."""
    from deepspeed import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        return f"not a DeepSpeed engine ({type(engine).__name__})"
    if not _one_process_job():
        return "more than one process (or no process group)"
    if engine.zero_optimization_stage() != 0:
        return f"ZeRO stage {engine.zero_optimization_stage()} keeps its own partitioned gradient buffers"
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        return "fp16/bf16 engines reduce through their own optimizer wrappers"
    if engine.has_moe_layers or getattr(engine, "sparse_gradients_enabled", lambda: False)():
        return "MoE layers or sparse gradients"
    if engine.communication_data_type != torch.float32:
        return f"gradients are communicated in {engine.communication_data_type} (a rounding round-trip)"
    if engine.gradient_predivide_factor() != 1.0:
        return f"gradient_predivide_factor {engine.gradient_predivide_factor()} (two multiplications)"
    return None


def clip_gradients_foreach(parameters, max_norm: float) -> torch.Tensor:
    """DeepSpeed's `runtime.utils.clip_grad_norm_` (2-norm, no model parallelism) for one process, with the
    same operations in the same order: per-tensor fp32 norms, stacked, squared and summed, square root, then
    every gradient times min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(1)
    norms = torch._foreach_norm([g.detach().float() for g in grads], 2.0)  # .float() of an fp32 tensor is itself
    total_norm = torch.stack(norms).pow(2.0).sum().float().pow(0.5)
    clip_coef = torch.min(torch.tensor([1.0], device=total_norm.device),
                          torch.tensor([float(max_norm)], device=total_norm.device) / (total_norm + 1e-6))
    torch._foreach_mul_(grads, clip_coef.reshape(()))
    return total_norm


def _zero_fill_missing_gradients(engine) -> None:
    """What the reduction leaves behind besides the sum: at an accumulation boundary every trainable
    parameter without a gradient gets a zero one (engine._get_gradients_for_reduction), which AdamW then
    steps (weight decay, moment decay, its step count) instead of skipping the parameter."""
    if not engine.is_gradient_accumulation_boundary():
        return
    for param in engine.module.parameters():
        if param.requires_grad and param.numel() and param.grad is None:
            param.grad = torch.zeros(param.size(), dtype=param.dtype, device=param.device)


def skip_identity_collectives(engine) -> bool:
    """Replace the no-op reductions of a one-process stage-0 DeepSpeed engine (see the module docstring).
    Returns whether it did; logs why not otherwise."""
    reason = identity_collectives_reason(engine)
    if reason is not None:
        logger.debug("DeepSpeed gradient reduction kept: %s", reason)
        return False
    module = engine.module
    engine.allreduce_gradients = lambda *args, **kwargs: _zero_fill_missing_gradients(engine)
    engine.clip_fp32_gradients = lambda: clip_gradients_foreach(module.parameters(), engine.gradient_clipping())
    logger.info("one-process DeepSpeed job: no identity all-reduce of the gradients (flatten, sum of one, copy "
                "back), clipping with foreach kernels (same numbers)")
    return True
