"""The evaluation loop: `model.predict` over this rank's shard, per-sample rows, cross-rank reduce.

Metrics are computed on the S×S letterboxed masks including the padding band (ground-truth 255 is
ignored) by `SegmentationMeter`; with `original_resolution` each mask is also scored at its image's
own size. After the reduce, metrics and rows (sorted by sample index) equal a single-process run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import runtime
from ..data.collate import DataCollator, batch_to_device
from ..data.transforms import denormalize_images, unletterbox_logits
from ..visualization import draw_overlay, save_rgb_png
from .files import MaskWriter
from .metrics import IGNORE_MASK_VALUE, SegmentationMeter, foreground_counts, foreground_iou
from .samples import IndexedSubset, sample_ids, shard_indices

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Reduced metrics (identical on every rank), per-sample rows sorted by index, summary lines."""

    metrics: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    summary_lines: list[str] = field(default_factory=list)


def _model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_model(model, dataset, pad_token_id: int, *, batch_size: int = 1, num_workers: int = 0, seed: int = 0,
                   limit: int | None = None, device: torch.device | None = None, desc: str = "eval",
                   prediction_dir: str | Path | None = None, vis_dir: str | Path | None = None, num_vis: int = 0,
                   ids: Sequence[str] | None = None, original_resolution: bool = True,
                   original_prediction_dir: str | Path | None = None, pin_memory: bool = True) -> EvalResult:
    """Run `model.predict` over `dataset` (this rank's shard when torch.distributed is initialised),
    reduce across ranks and return the metrics.

    Args:
        model: anything with ``predict(**batch) -> .masks [B,S,S]`` (a SegEarthR1ForReasoningSegmentation);
            ``.mask_logits`` too for original-resolution metrics and the non-finite check.
        dataset: a map-style dataset of sample dicts (`images`, `masks` [1,S,S], text keys, `question`;
            `orig_masks` + `letterbox` for original-resolution metrics).
        pad_token_id: for the collator.
        prediction_dir: if given, each rank writes ``<id>.png`` (0/255, S×S) there.
        vis_dir: if given, overlays of samples with index < `num_vis` are written there.
        ids: per-sample ids for all of `dataset` (default: `sample_ids(dataset)`).
        original_resolution: score masks mapped back to each image's size when the batch allows it.
        original_prediction_dir: if given, the original-resolution masks are written there.
        pin_memory: pinned host memory for the batches (used on CUDA only).
    """
    n_total = len(dataset)
    ids = list(ids) if ids is not None else sample_ids(dataset)
    if len(ids) != n_total:
        raise ValueError(f"got {len(ids)} sample ids for a dataset of {n_total} samples; pass one id per sample")
    selected = range(min(limit, n_total) if limit is not None else n_total)
    rank, world = runtime.get_rank(), runtime.get_world_size()
    shard = IndexedSubset(dataset, shard_indices(selected, rank, world), seed=seed)
    device = device or _model_device(model)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=DataCollator(pad_token_id), drop_last=False,
                        pin_memory=bool(pin_memory) and device.type == "cuda")
    dirs = [Path(d) if d is not None else None for d in (prediction_dir, vis_dir, original_prediction_dir)]
    prediction_dir, vis_dir, original_prediction_dir = dirs
    for d in dirs:
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)

    model.eval()
    meter = SegmentationMeter()
    with MaskWriter() as writer:
        for step, batch in enumerate(tqdm(loader, desc=desc, disable=rank != 0, total=len(loader),
                                          dynamic_ncols=True)):
            indices = [int(i) for i in batch.pop("sample_index")]
            names = [ids[i] for i in indices]
            gt = batch["masks"]
            out = model.predict(**batch_to_device(batch, device))
            logits = getattr(out, "mask_logits", None)
            if logits is not None:
                runtime.check_finite_logits(logits, f"evaluation batch {step} ({', '.join(names)})", logger)
            pred = out.masks.detach().to("cpu", torch.bool)
            orig = [None] * len(indices)
            if original_resolution and logits is not None and "orig_masks" in batch and "letterbox" in batch:
                orig = [_original_resolution_stats(logits[j], batch["orig_masks"][j], batch["letterbox"][j])
                        for j in range(len(indices))]
            questions = batch.get("question", [""] * len(indices))
            meter.update(pred, gt, names=names, extras=_row_extras(batch, indices, names, pred, gt, orig))
            for j in range(len(indices)):
                if prediction_dir is not None:
                    writer.write(prediction_dir / f"{names[j]}.png", pred[j].numpy())
                if original_prediction_dir is not None and orig[j] is not None:
                    writer.write(original_prediction_dir / f"{names[j]}.png", orig[j]["mask"])
            vis_rows = [j for j, idx in enumerate(indices) if idx < num_vis] if vis_dir is not None else []
            if vis_rows:
                images = denormalize_images(batch["images"][vis_rows])
                for k, j in enumerate(vis_rows):
                    overlay = draw_overlay(images[k], pred[j].numpy(), (gt[j, 0] == 1).numpy(),
                                           caption=str(questions[j]) or None)
                    save_rgb_png(vis_dir / f"{names[j]}.png", overlay)
    meter.all_reduce()
    if meter.count == 0:
        raise ValueError("no samples were evaluated; check --limit and the dataset split")
    return EvalResult(metrics=meter.compute(), rows=meter.per_sample_rows(), summary_lines=meter.summary_lines())


def _row_extras(batch: dict, indices: list[int], names: list[str], pred: torch.Tensor, gt: torch.Tensor,
                orig: list) -> list[dict]:
    """per_sample.csv columns beyond the meter's own (name, intersection, union, iou)."""
    gt_hw = gt[:, 0] if gt.dim() == 4 else gt
    gt_pixels = (gt_hw == 1).sum((-2, -1)).tolist()
    pred_pixels = (pred & (gt_hw != IGNORE_MASK_VALUE)).sum((-2, -1)).tolist()
    questions = batch.get("question", [""] * len(indices))
    image_names = batch.get("image_name", names)
    answers = batch.get("answer", [None] * len(indices))
    extras = []
    for j, idx in enumerate(indices):
        row = {"index": idx, "image_name": str(image_names[j]), "question": str(questions[j]),
               "gt_pixels": int(gt_pixels[j]), "pred_pixels": int(pred_pixels[j]),
               "answer": "" if answers[j] is None else str(answers[j])}
        row.update({k: v for k, v in (orig[j] or {}).items() if k != "mask"})
        extras.append(row)
    return extras


def _original_resolution_stats(logits: torch.Tensor, gt: torch.Tensor, geometry) -> dict:
    """Counts at the image's own resolution: logits cropped to the image band, resized bilinearly and
    thresholded at 0 (exactly as inference maps masks back), against the original mask."""
    pred = unletterbox_logits(logits.float(), geometry) > 0
    inter, union, gt_pixels, pred_pixels = foreground_counts(pred, gt.to(pred.device))
    return {"orig_intersection": inter, "orig_union": union, "orig_iou": foreground_iou(inter, union),
            "orig_gt_pixels": gt_pixels, "orig_pred_pixels": pred_pixels, "mask": pred.cpu().numpy()}
