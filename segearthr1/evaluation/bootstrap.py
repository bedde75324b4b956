"""Seeded percentile bootstrap over evaluation samples, plain and paired.

Why: a 0.4-point gIoU difference between two ablations means nothing without its sampling
uncertainty. Resampling the samples (with replacement) and recomputing the metric gives that
uncertainty without assumptions about the IoU distribution.

Recipe (so anyone can recompute the intervals exactly): ``rng = numpy.random.default_rng(seed)``;
the resample indices are ``rng.integers(0, n, size=(resamples, n))`` drawn row block by row block
(the stream is identical to one call); each row gives one value of the statistic; the interval is
``numpy.percentile(values, [100 * a / 2, 100 * (1 - a / 2)])`` (linear interpolation) with
``a = 1 - confidence``. A paired comparison uses the *same* index rows for both runs.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
CIOU_EPS = 1e-10  # the reference's cumulative-IoU epsilon (evaluation.metrics.CIOU_EPS)
_BLOCK_ELEMENTS = 4_000_000  # index rows are drawn in blocks of about this many entries (memory bound)

Statistic = Callable[[np.ndarray], np.ndarray]  # [k, n] resample indices -> [k] values


def index_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [k, n] int64 blocks of resample indices, `resamples` rows in total (see the module docstring)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one sample")
    if resamples < 1:
        raise ValueError(f"bootstrap resamples={resamples} must be at least 1")
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_ELEMENTS // n)
    done = 0
    while done < resamples:
        k = min(rows, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def giou_statistic(iou: np.ndarray) -> Statistic:
    """Mean per-sample IoU of each resample."""
    iou = np.asarray(iou, dtype=np.float64)
    return lambda idx: iou[idx].mean(axis=1)


def ciou_statistic(intersection: np.ndarray, union: np.ndarray) -> Statistic:
    """Cumulative IoU (sum I / (sum U + eps)) of each resample."""
    inter = np.asarray(intersection, dtype=np.float64)
    uni = np.asarray(union, dtype=np.float64)
    return lambda idx: inter[idx].sum(axis=1) / (uni[idx].sum(axis=1) + CIOU_EPS)


def bootstrap_values(statistics: dict[str, Statistic], n: int, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Every statistic evaluated on the same `resamples` index rows: {name: [resamples] values}."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for idx in index_blocks(n, resamples, seed):
        for name, fn in statistics.items():
            out[name].append(np.asarray(fn(idx), dtype=np.float64))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def percentile_interval(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> list[float]:
    """[low, high] percentile interval of bootstrap values."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1 (e.g. 0.95)")
    alpha = 1.0 - confidence
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(low), float(high)]


def metric_intervals(iou, intersection, union, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     confidence: float = DEFAULT_CONFIDENCE) -> dict[str, list[float]]:
    """{"giou": [lo, hi], "ciou": [lo, hi]} for one run's per-sample values."""
    stats = {"giou": giou_statistic(iou), "ciou": ciou_statistic(intersection, union)}
    values = bootstrap_values(stats, len(iou), resamples, seed)
    return {name: percentile_interval(v, confidence) for name, v in values.items()}


def paired_difference_statistic(stat_a: Statistic, stat_b: Statistic) -> Statistic:
    """stat_b - stat_a on the same resample rows (samples aligned between the two runs)."""
    return lambda idx: stat_b(idx) - stat_a(idx)
