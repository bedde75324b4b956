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
batch size never changes a bit. Accumulators are plain sums, so they can be summed across processes
(`all_reduce`): counts give exactly the single-process result, float64 IoU sums agree to ~1e-15.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IOU_EPS = 1e-5        # per-sample IoU denominator epsilon (reference value)
CIOU_EPS = 1e-10      # cumulative IoU denominator epsilon (reference value)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
NUM_CLASSES = 2       # background, foreground
CSV_FIELDS = ("name", "intersection", "union", "iou")


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
    pred = torch.where(gt == IGNORE_INDEX, torch.full_like(pred, IGNORE_INDEX), pred)
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

    Equal to `sample_statistics` class 1 (pixels where gt == IGNORE_INDEX count on neither side) but
    with boolean ops only, so it stays fast and small on 7617² masks at original resolution.
    """
    if pred_mask.shape != gt_mask.shape or pred_mask.dim() != 2:
        raise ValueError(f"foreground_counts: pred {tuple(pred_mask.shape)} and gt {tuple(gt_mask.shape)} must be "
                         "the same [H,W] shape")
    gt_fg = gt_mask == 1
    pred_fg = pred_mask if pred_mask.dtype == torch.bool else pred_mask.to(torch.int32) == 1
    pred_fg = pred_fg & (gt_mask != IGNORE_INDEX)
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
    ``iou_sum`` [2] float64, and the per-sample rows for per_sample.csv.
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

    def update(self, pred_masks: Tensor, gt_masks: Tensor, names: Sequence[str] | None = None) -> BatchStats:
        """Add a batch: pred [B,H,W] float/bool {0,1}, gt [B,1,H,W] or [B,H,W] uint8 (255 = ignore).

        `names` label the per-sample rows (default: the running sample index). Returns the batch's
        per-sample statistics.
        """
        stats = sample_statistics(pred_masks, gt_masks)
        b = stats.iou.shape[0]
        if names is None:
            names = [str(self.count + i) for i in range(b)]
        elif len(names) != b:
            raise ValueError(f"SegmentationMeter.update: got {len(names)} names for a batch of {b}; "
                             "pass one name per sample or None")
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
        for name, i, u, v in zip(names, stats.intersection[:, 1].tolist(), stats.union[:, 1].tolist(),
                                 fg_iou.tolist()):
            self._rows.append({"name": str(name), "intersection": i, "union": u, "iou": v})
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
        """Rows {name, intersection, union, iou} (foreground) in the order the samples were added."""
        return [dict(r) for r in self._rows]

    def write_per_sample_csv(self, path: str | Path) -> None:
        """Write per_sample.csv (columns name, intersection, union, iou; IoU with full precision)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in self._rows:
                writer.writerow({**r, "iou": repr(r["iou"])})

    # -- distributed -----------------------------------------------------------------------
    def state_tensor(self) -> Tensor:
        """All accumulators as one float64 vector (I[2], U[2], IoU-sum[2], Pr counts, count).

        Counts are exact in float64 below 2**53 pixels. `load_state_tensor` is the inverse.
        """
        ints = torch.cat([self.intersection_sum, self.union_sum, self.pr_counts,
                          torch.tensor([self.count], dtype=torch.int64)])
        if int(ints.max()) >= 2 ** 53:
            raise ValueError(f"SegmentationMeter.state_tensor: count {int(ints.max())} is not exact in float64; "
                             "use all_reduce(), which sums the counts as int64")
        n = NUM_CLASSES
        return torch.cat([ints[:2 * n].double(), self.iou_sum, ints[2 * n:].double()])

    def load_state_tensor(self, state: Tensor) -> None:
        """Restore the accumulators from `state_tensor()` output (per-sample rows are not included)."""
        n, k = NUM_CLASSES, len(self.thresholds)
        expected = 3 * n + k + 1
        if state.numel() != expected:
            raise ValueError(f"SegmentationMeter.load_state_tensor: got {state.numel()} values, expected "
                             f"{expected} for {k} thresholds")
        state = state.detach().cpu().double()
        self.intersection_sum = state[:n].round().long()
        self.union_sum = state[n:2 * n].round().long()
        self.iou_sum = state[2 * n:3 * n].clone()
        self.pr_counts = state[3 * n:3 * n + k].round().long()
        self.count = int(state[-1].round().item())

    def all_reduce(self, group=None, gather_rows: bool = True) -> None:
        """Sum the accumulators over all ranks (int64 counts, float64 IoU sums) in place.

        With `gather_rows` the per-sample rows of every rank are gathered too (rank order), so any
        rank can write the complete per_sample.csv. No-op when torch.distributed is not initialised.
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
        ints, n, k = ints.cpu(), NUM_CLASSES, len(self.thresholds)
        self.intersection_sum, self.union_sum = ints[:n].clone(), ints[n:2 * n].clone()
        self.pr_counts, self.count = ints[2 * n:2 * n + k].clone(), int(ints[-1])
        self.iou_sum = floats.cpu()
        if gather_rows:
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self._rows, group=group)
            self._rows = [r for rows in gathered for r in rows]
