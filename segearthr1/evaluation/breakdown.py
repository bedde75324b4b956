"""Metrics beyond the reference protocol, computed from per-sample counts (metrics.json blocks).

Why here and not in `SegmentationMeter`: the reference numbers must stay bit for bit what the meter
gives; everything in this module is *additional*, labelled by its own key, and is a pure function
of the per-sample columns written to per_sample.csv, so anyone can recompute it from that file.

A block (``metric_block``) holds, for one resolution (letterboxed S×S or original H×W):

* ``giou``, ``ciou``, ``precision@t``, ``num_samples``: the reference formulas (metrics.py);
* ``ci95``: percentile-bootstrap intervals of gIoU and cIoU (bootstrap.py; resamples and seed are
  in metrics.json ``bootstrap``);
* ``empty_target``: samples whose ground truth has no foreground pixel ("empty", EarthReason's
  absent targets) versus the rest ("target"): gIoU/cIoU of each group (an empty target scores 1.0
  only when the prediction is empty too; cIoU of the empty group is 0 by construction, since its
  intersection is 0), ``false_alarm_rate`` = empty targets with any predicted pixel / empty targets,
  ``miss_rate`` = targets with an empty prediction / targets (null when a group is empty), and the
  four ``confusion`` counts;
* ``per_image``: each image's samples (its questions under ``--question_sampling all``) averaged
  first (IoU, intersection, union), then the reference formulas over images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, metric_intervals
from .metrics import CIOU_EPS, THRESHOLDS


def reference_metrics(iou: Sequence[float], intersection: Sequence[int], union: Sequence[int],
                      thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """gIoU, cIoU, P@t and the count with the reference formulas; gIoU summed in the given order."""
    n = len(iou)
    if n == 0:
        return {"giou": None, "ciou": None, **{f"precision@{t}": None for t in thresholds}, "num_samples": 0}
    total = 0.0
    for v in iou:  # sequential float64 sum, like SegmentationMeter
        total += float(v)
    out = {"giou": total / n, "ciou": sum(intersection) / (sum(union) + CIOU_EPS)}
    for t in thresholds:
        out[f"precision@{t}"] = sum(1 for v in iou if v > t) / n
    out["num_samples"] = n
    return out


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def empty_target_breakdown(iou, intersection, union, gt_pixels, pred_pixels) -> dict:
    """Target / empty-target metrics, false-alarm and miss rates (see the module docstring)."""
    empty = [g == 0 for g in gt_pixels]
    predicted = [p > 0 for p in pred_pixels]

    def subset(flag: bool) -> dict:
        keep = [i for i, e in enumerate(empty) if e == flag]
        m = reference_metrics([iou[i] for i in keep], [intersection[i] for i in keep], [union[i] for i in keep])
        return {"giou": m["giou"], "ciou": m["ciou"], "num_samples": m["num_samples"]}

    confusion = {
        "target_predicted": sum(1 for e, p in zip(empty, predicted) if not e and p),
        "target_missed": sum(1 for e, p in zip(empty, predicted) if not e and not p),
        "empty_false_alarm": sum(1 for e, p in zip(empty, predicted) if e and p),
        "empty_correct": sum(1 for e, p in zip(empty, predicted) if e and not p),
    }
    num_empty = confusion["empty_false_alarm"] + confusion["empty_correct"]
    num_target = len(empty) - num_empty
    return {
        "target": subset(False),
        "empty": subset(True),
        "false_alarm_rate": _rate(confusion["empty_false_alarm"], num_empty),
        "miss_rate": _rate(confusion["target_missed"], num_target),
        "confusion": confusion,
    }


def per_image_metrics(iou, intersection, union, image_names: Sequence[str]) -> dict:
    """Reference formulas over images after averaging each image's samples (first-seen image order)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(image_names):
        groups.setdefault(str(name), []).append(i)
    mean = lambda values, idx: sum(float(values[i]) for i in idx) / len(idx)  # noqa: E731
    img_iou = [mean(iou, idx) for idx in groups.values()]
    img_inter = [mean(intersection, idx) for idx in groups.values()]
    img_union = [mean(union, idx) for idx in groups.values()]
    out = reference_metrics(img_iou, img_inter, img_union)
    out["num_images"] = out.pop("num_samples")
    return out


def metric_block(iou, intersection, union, gt_pixels, pred_pixels, image_names, *,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """One resolution's metrics: reference formulas, ci95, empty_target, per_image."""
    block = reference_metrics(iou, intersection, union)
    if resamples > 0 and len(iou) > 0:
        block["ci95" if confidence == 0.95 else f"ci{round(confidence * 100)}"] = metric_intervals(
            np.asarray(iou), np.asarray(intersection), np.asarray(union), resamples=resamples, seed=seed,
            confidence=confidence)
    block["empty_target"] = empty_target_breakdown(iou, intersection, union, gt_pixels, pred_pixels)
    block["per_image"] = per_image_metrics(iou, intersection, union, image_names)
    return block


def blocks_from_rows(rows: Sequence[dict], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """{"letterboxed": block, "original_resolution": block (if the rows carry orig_* columns)}."""
    def column(key):
        return [r[key] for r in rows]

    names = column("image_name")
    kw = dict(resamples=resamples, seed=seed, confidence=confidence)
    out = {"letterboxed": metric_block(column("iou"), column("intersection"), column("union"),
                                       column("gt_pixels"), column("pred_pixels"), names, **kw)}
    if rows and all(r.get("orig_iou") not in (None, "") for r in rows):
        out["original_resolution"] = metric_block(
            column("orig_iou"), column("orig_intersection"), column("orig_union"), column("orig_gt_pixels"),
            column("orig_pred_pixels"), names, **kw)
    return out
