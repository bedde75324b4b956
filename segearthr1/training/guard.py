"""Stop (or skip) a training step whose loss is NaN/Inf, on every process at once.

Why: a diverged run otherwise keeps going (HF's log even shows `loss 0` because its NaN filter
replaces the value), writes NaN weights into every checkpoint and exits 0. The decision must be
collective: if one process raised alone, the others would wait forever in the gradient all-reduce.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from ..runtime import all_gather_objects
from ..errors import NonFiniteError
from ..runtime import count_nonfinite

logger = logging.getLogger(__name__)

POLICIES = ("error", "skip")


def any_process(flag: torch.Tensor) -> bool:
    """True on every process if the 0/1 tensor `flag` is set on any: one tiny all-reduce and one host sync
    per call (this runs every training step)."""
    flag = flag.float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


class NonFiniteGuard:
    """`check(step, loss, parts)` -> True when the step must be skipped; raises NonFiniteError when the
    policy is `error` or the skip budget (`max_skips`) is used up. `last_good` is called only on that
    path, to name the checkpoint to go back to."""

    def __init__(self, policy: str = "error", max_skips: int = 0, last_good=lambda: None):
        if policy not in POLICIES:
            raise ValueError(f"train.nonfinite={policy!r}; choose one of {list(POLICIES)}")
        if not isinstance(max_skips, int) or isinstance(max_skips, bool) or max_skips < 0:
            raise ValueError(f"train.nonfinite_max_skips={max_skips!r} must be an int >= 0")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = 0
        self.last_good = last_good

    def check(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> bool:
        scalars = torch.stack([loss.detach().float().reshape(()), *(v.float().reshape(()) for v in parts.values())])
        if not any_process(~torch.isfinite(scalars).all()):
            return False
        values = {"loss": float(loss.detach().float())} | {k: float(v.float()) for k, v in parts.items()}
        per_rank = all_gather_objects(values)
        described = "; ".join(f"rank {r}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items())
                              for r, vals in enumerate(per_rank))
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            logger.warning("non-finite loss at step %d (%s): skipping this batch (%d of %d allowed skips used)",
                           step, described, self.skipped, self.max_skips)
            return True
        last = self.last_good()
        budget = (f" after skipping {self.skipped} step(s) (train.nonfinite_max_skips={self.max_skips})"
                  if self.policy == "skip" else "")
        raise NonFiniteError(
            f"non-finite loss at step {step}{budget} ({described}); training stopped before this step updated the "
            f"weights, nothing non-finite was saved. Last good checkpoint: {last or 'none yet'}. Lower "
            "train.learning_rate, enable train.max_grad_norm, or set train.nonfinite=skip with "
            "train.nonfinite_max_skips=N to skip isolated bad batches")


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss of exactly 0 connected to every trainable parameter, so a skipped step still runs the
    backward (and the gradient all-reduce every process takes part in) with all-zero gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([(p * 0).sum() for p in params]).sum()


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Raise NonFiniteError before `where` would write weights that hold NaN/Inf."""
    bad = {name: n for name, p in model.named_parameters() if (n := count_nonfinite(p.detach()))}
    if bad:
        names = ", ".join(list(bad)[:5]) + (f" ... (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise NonFiniteError(f"not saving {where}: {len(bad)} parameter tensor(s) hold NaN/Inf ({names}); the run "
                             "diverged. Resume from an earlier checkpoint with a lower learning rate")
