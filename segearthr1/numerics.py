"""Non-finite detection shared by training, evaluation and inference.

A diverged model produces NaN/Inf logits, and `logits > 0` turns those into empty masks that look like
ordinary (bad) predictions. Every stage that reads model outputs checks them here, so the message is worded
the same way everywhere and names where it happened.
"""
from __future__ import annotations

import logging

import torch

from .errors import NonFiniteError


def count_nonfinite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf elements (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum().item())


def check_finite_logits(logits: torch.Tensor, where: str, logger: logging.Logger, strict: bool = False) -> int:
    """Warn (or raise NonFiniteError when `strict`) if `logits` hold NaN/Inf; returns the count.

    `where` names the sample(s) or stage, e.g. "evaluation batch 3 (img_001, img_002)".
    """
    bad = count_nonfinite(logits)
    if bad:
        message = (f"{where}: the model produced {bad} non-finite mask logits of {logits.numel()} "
                   "(NaN/Inf); its masks are meaningless. The checkpoint has probably diverged: check the "
                   "training log for non-finite losses and use an earlier checkpoint")
        if strict:
            raise NonFiniteError(message)
        logger.warning(message)
    return bad
