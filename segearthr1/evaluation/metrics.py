"""Referring-segmentation metrics: gIoU, cIoU and precision at IoU thresholds (DESIGN.md §2.8).

Reproduces the reference evaluation exactly (tests/fixtures/reference/metrics.pt): per sample, both
masks are cast to integers, ground-truth pixels equal to 255 are ignored (the prediction is set to
255 there, so neither side counts them); intersection and union are counted per class
(background 0, foreground 1); IoU = I / (U + 1e-5), and 1.0 where U == 0. Only the foreground
enters the reported metrics:

* gIoU = mean per-sample foreground IoU,
* cIoU = ΣI_fg / (ΣU_fg + 1e-10),
* P@t  = fraction of samples with foreground IoU strictly greater than t.

Counts are int64 (exact), IoU values float64, summed sample by sample in arrival order, so the
batch size never changes a bit. `all_reduce` sums the counts across processes and re-adds the
gathered per-sample IoUs in sample order, so a sharded run equals a single-process run bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

IGNORE_MASK_VALUE = 255  # ground-truth mask pixels scored on neither side (token labels use -100)
IOU_EPS = 1e-5        # per-sample IoU denominator epsilon (reference value)
CIOU_EPS = 1e-10      # cumulative IoU denominator epsilon (reference value)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
NUM_CLASSES = 2       # background, foreground


@dataclass(frozen=True)
class BatchStats:
    """Per-sample statistics of one `update` call; index 0 = background, 1 = foreground."""

    intersection: Tensor  # [B,2] int64
    union: Tensor         # [B,2] int64
    iou: Tensor           # [B,2] float64


def sample_statistics(pred_masks: Tensor, gt_masks: Tensor) -> BatchStats:
    """Per-class intersection/union/IoU for a batch; pred [B,H,W] {0,1}, gt [B,1,H,W] or [B,H,W].

    Equality-based counting of classes 0 and 1 equals the reference's 2-bin histogram over [0,1] on
    integer masks (255 and any other value fall outside both bins).
    """
    if gt_masks.dim() == 4:
        if gt_masks.shape[1] != 1:
            raise ValueError(f"SegmentationMeter: gt_masks shape {tuple(gt_masks.shape)} is not [B,1,H,W]; "
                             "pass one mask per sample")
        gt_masks = gt_masks[:, 0]
    if pred_masks.dim() != 3 or pred_masks.shape != gt_masks.shape:
        raise ValueError(f"SegmentationMeter: pred_masks shape {tuple(pred_masks.shape)} does not match gt "
                         f"{tuple(gt_masks.shape)} ([B,H,W]); resize the prediction to the gt size first")
    pred = pred_masks.to(torch.int32)
    gt = gt_masks.to(torch.int32)
    pred = torch.where(gt == IGNORE_MASK_VALUE, torch.full_like(pred, IGNORE_MASK_VALUE), pred)
    classes = torch.arange(NUM_CLASSES, dtype=torch.int32, device=pred.device).view(1, -1, 1, 1)
    pred_c = pred.unsqueeze(1) == classes                              # [B,2,H,W]
    gt_c = gt.unsqueeze(1) == classes
    intersection = (pred_c & gt_c).sum((-2, -1), dtype=torch.int64).cpu()
    union = pred_c.sum((-2, -1), dtype=torch.int64).cpu() + gt_c.sum((-2, -1), dtype=torch.int64).cpu() - intersection
    iou = intersection.to(torch.float64) / (union.to(torch.float64) + IOU_EPS)
    iou = torch.where(union == 0, torch.ones_like(iou), iou)
    return BatchStats(intersection=intersection, union=union, iou=iou)


def foreground_counts(pred_mask: Tensor, gt_mask: Tensor) -> tuple[int, int, int, int]:
    """(intersection, union, gt_pixels, pred_pixels) of the foreground for ONE [H,W] mask pair.

    Equal to `sample_statistics` class 1 (pixels where gt == IGNORE_MASK_VALUE count on neither side) but
    with boolean ops only, so it stays fast and small on 7617² masks at original resolution.
    """
    if pred_mask.shape != gt_mask.shape or pred_mask.dim() != 2:
        raise ValueError(f"foreground_counts: pred {tuple(pred_mask.shape)} and gt {tuple(gt_mask.shape)} must be "
                         "the same [H,W] shape")
    gt_fg = gt_mask == 1
    pred_fg = pred_mask if pred_mask.dtype == torch.bool else pred_mask.to(torch.int32) == 1
    pred_fg = pred_fg & (gt_mask != IGNORE_MASK_VALUE)
    # count_nonzero: a bool .sum() widens to int64 first and is ~5x slower on large masks
    inter = int(torch.count_nonzero(pred_fg & gt_fg))
    gt_n, pred_n = int(torch.count_nonzero(gt_fg)), int(torch.count_nonzero(pred_fg))
    return inter, gt_n + pred_n - inter, gt_n, pred_n


def foreground_iou(intersection: int, union: int) -> float:
    """The reference per-sample IoU: I / (U + 1e-5), 1.0 when U == 0."""
    return 1.0 if union == 0 else intersection / (union + IOU_EPS)


class SegmentationMeter:
    """Accumulates per-sample statistics over an evaluation run; see the module docstring.

    State: ``intersection_sum``/``union_sum`` [2] int64, ``pr_counts`` [5] int64, ``count`` int,
    ``iou_sum`` [2] float64, and one row per sample ({name, intersection, union, iou} of the
    foreground plus the caller's extra columns) for per_sample.csv.
    """

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        self.intersection_sum = torch.zeros(NUM_CLASSES, dtype=torch.int64)
        self.union_sum = torch.zeros(NUM_CLASSES, dtype=torch.int64)
        self.iou_sum = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        self.pr_counts = torch.zeros(len(self.thresholds), dtype=torch.int64)
        self.count = 0
        self._rows: list[dict] = []

    def update(self, pred_masks: Tensor, gt_masks: Tensor, names: Sequence[str] | None = None,
               extras: Sequence[dict] | None = None) -> BatchStats:
        """Add a batch: pred [B,H,W] float/bool {0,1}, gt [B,1,H,W] or [B,H,W] uint8 (255 = ignore).

        `names` label the per-sample rows (default: the running sample index); `extras` adds columns
        to each row (an ``index`` column orders the rows in `all_reduce`). Returns the batch's
        per-sample statistics.
        """
        stats = sample_statistics(pred_masks, gt_masks)
        b = stats.iou.shape[0]
        if names is None:
            names = [str(self.count + i) for i in range(b)]
        for what, given in (("names", names), ("extras", extras)):
            if given is not None and len(given) != b:
                raise ValueError(f"SegmentationMeter.update: got {len(given)} {what} for a batch of {b}; "
                                 "pass one per sample or None")
        fg_iou = stats.iou[:, 1]
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64)
        self.intersection_sum += stats.intersection.sum(0)
        self.union_sum += stats.union.sum(0)
        # sequential per-sample float64 sum (the reference's order): results do not depend on the batch size
        acc = self.iou_sum.tolist()
        for row in stats.iou.tolist():
            acc = [a + v for a, v in zip(acc, row)]
        self.iou_sum = torch.tensor(acc, dtype=torch.float64)
        self.pr_counts += (fg_iou.unsqueeze(1) > thresholds).sum(0)
        self.count += b
        for k, (name, i, u, v) in enumerate(zip(names, stats.intersection[:, 1].tolist(),
                                                stats.union[:, 1].tolist(), fg_iou.tolist())):
            self._rows.append({"name": str(name), "intersection": i, "union": u, "iou": v,
                               **(extras[k] if extras is not None else {})})
        return stats

    # -- results -------------------------------------------------------------------------
    def compute(self) -> dict[str, float | int]:
        """Final metrics: ``giou``, ``ciou``, ``precision@0.5`` … ``precision@0.9`` (float64), ``num_samples``."""
        if self.count == 0:
            raise ValueError("SegmentationMeter.compute: no samples were added; call update() first "
                             "(and all_reduce() before compute() when running distributed)")
        out: dict[str, float | int] = {
            "giou": self.iou_sum[1].item() / self.count,
            "ciou": self.intersection_sum[1].item() / (self.union_sum[1].item() + CIOU_EPS),
        }
        for t, n in zip(self.thresholds, self.pr_counts.tolist()):
            out[f"precision@{t}"] = n / self.count
        out["num_samples"] = self.count
        return out

    def summary_lines(self) -> list[str]:
        """The two summary lines exactly as the reference evaluation prints them (4 decimals)."""
        m = self.compute()
        prs = ", ".join(f"@{t}: {m[f'precision@{t}']:.4f}" for t in self.thresholds)
        return [f"ciou: {m['ciou']:.4f}, giou: {m['giou']:.4f}", f"IoU Thresholds: {prs}"]

    def per_sample_rows(self) -> list[dict]:
        """The per-sample rows in sample order (after `all_reduce`: of every rank)."""
        return [dict(r) for r in self._rows]

    # -- distributed -----------------------------------------------------------------------
    def all_reduce(self, group=None) -> None:
        """Sum the accumulators over all ranks in place; every rank then holds the single-process result.

        Counts are summed as int64 (exact). The rows of every rank are gathered (ordered by their
        ``index`` column when every row has one, else rank by rank) and the foreground IoU sum is
        re-added sample by sample in that order: per-rank float sums added across ranks would differ
        from one process in the last bits. No-op when torch.distributed is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        ints = torch.cat([self.intersection_sum, self.union_sum, self.pr_counts,
                          torch.tensor([self.count], dtype=torch.int64)]).to(device)
        floats = self.iou_sum.to(device)
        dist.all_reduce(ints, group=group)
        dist.all_reduce(floats, group=group)
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self._rows, group=group)
        rows = [r for part in gathered for r in part]
        if rows and all("index" in r for r in rows):
            rows.sort(key=lambda r: r["index"])
        ints, n, k = ints.cpu(), NUM_CLASSES, len(self.thresholds)
        self.intersection_sum, self.union_sum = ints[:n].clone(), ints[n:2 * n].clone()
        self.pr_counts, self.count = ints[2 * n:2 * n + k].clone(), int(ints[-1])
        self._rows = rows
        self._check_rows()
        fg_sum = 0.0
        for r in rows:
            fg_sum += r["iou"]
        self.iou_sum = torch.tensor([float(floats[0].cpu()), fg_sum], dtype=torch.float64)

    def _check_rows(self) -> None:
        """The gathered rows must be exactly the samples the counts were summed over."""
        indices = [r["index"] for r in self._rows if "index" in r]
        if len(self._rows) != self.count or len(set(indices)) != len(indices):
            raise RuntimeError(f"distributed evaluation gathered {len(self._rows)} rows ({len(set(indices))} "
                               f"distinct indices) but the reduced meter counted {self.count}; every rank must "
                               "run the same shard logic")
        if (sum(r["intersection"] for r in self._rows) != int(self.intersection_sum[1])
                or sum(r["union"] for r in self._rows) != int(self.union_sum[1])):
            raise RuntimeError("reduced intersection/union sums disagree with the gathered per-sample rows")
