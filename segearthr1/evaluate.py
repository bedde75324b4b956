"""Evaluate a SegEarth-R1 checkpoint on a dataset split: gIoU, cIoU and P@0.5…0.9 (DESIGN.md §2.8).

Why a module of its own: benchmark numbers must come from one deterministic place that writes them
to files (never copied from the console), runs single-process or under ``torchrun`` with identical
results, and accepts the reference's command line so a reference user's ``eval.sh`` works unchanged.

Usage::

    python -m segearthr1.evaluate --model_path CKPT --data_path DATA_ROOT --dataset_type EarthReason
    torchrun --nproc_per_node N -m segearthr1.evaluate --model_path CKPT ...   # or scripts/eval.sh

Flags:

=============================  ===========  ==========================================================
flag                           default      meaning
=============================  ===========  ==========================================================
``--model_path``               (required)   our checkpoint directory or a reference release directory
``--data_path``                $SEGEARTH_DATA or ./datasets   DATA_ROOT holding rs_reason_seg/ and rs_ref_seg/
``--data_split``               val          train | val | test
``--dataset_type``             RRSIS-D      EarthReason | RRSIS-D | RefSegRS (the reference's default)
``--mask_config``              none         reference mask-config YAML (reference releases only)
``--image_size``               none         letterbox size of a reference release (default 1024); our
                                            checkpoints carry theirs
``--output_dir``               outputs/eval/<dataset>_<split>   metrics.json, per_sample.csv, predictions/
``--vis_path``                 none         directory for overlay PNGs of the first ``--num_vis`` samples
``--num_vis``                  20           how many overlays ``--vis_path`` receives
``--save_predictions``         on           one 0/255 PNG per sample (S×S letterboxed predicted mask)
                                            under output_dir/predictions/; ``--no-save_predictions``
``--batch_size``               1            samples per forward pass and process (alias
                                            ``--eval_batch_size``)
``--num_workers``              auto         DataLoader workers per process (alias
                                            ``--dataloader_num_workers``); auto = CPU cores per
                                            process, at most 8: decoding overlaps the model
``--pin_memory``               on           pinned host memory for batches on CUDA (no effect on CPU);
                                            ``--no-pin_memory`` turns it off
``--fast_decode``              off          decode JPEGs much larger than the input at 1/2, 1/4 or 1/8
                                            scale (OpenCV reduced decode, the smallest still >= S), then
                                            the usual letterbox resize; faster, NOT byte-identical to
                                            the reference (README: speed and gIoU change)
``--original_resolution``      on           also score masks at the image's original resolution
                                            (logits mapped back as inference does, padding excluded);
                                            ``--no-original_resolution`` skips it
``--bootstrap_resamples``      1000         resamples for the 95 % bootstrap intervals (seeded by
                                            ``--seed``); 0 turns them off
``--report``                   on           write report.html (metrics, plots, galleries);
                                            ``--no-report`` skips it
``--num_gallery``              4            samples in each of the best / median / worst galleries
``--device``                   auto         auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
``--dtype``                    fp32         auto | fp32 | bf16; fp32 like the reference's evaluation,
                                            auto = bf16 on CUDA, fp32 on CPU
``--question_sampling``        first        first (reference) | all | random: which question of an
                                            EarthReason sample / sentence of an RRSIS-D ref is used
                                            (alias ``--sentence_sampling``); RefSegRS has one phrase
                                            per sample
``--limit``                    none         evaluate only the first N samples (smoke tests)
``--seed``                     0            seed (random question sampling is seeded per sample)
``--log_level``                INFO         DEBUG | INFO | WARNING | ERROR
``--base_data_path``           —            reference alias of ``--data_path``
``--version`` ``--use_seg_query`` ``--seg_task`` ``--model_map_name`` ``--image_aspect_ratio``
``--segmentation`` ``--lazy_preprocess`` ``--is_multimodal`` ``--image_grid_pinpoints``
``--local_rank``                            reference / launcher flags: accepted and ignored (logged)
=============================  ===========  ==========================================================

Outputs (rank 0 writes them):

* ``metrics.json``: giou, ciou, precision@0.5 … precision@0.9, num_samples (the **reference
  protocol**: letterboxed masks incl. padding, first question unless ``--question_sampling`` says
  otherwise), checkpoint, mask_config, config (the model config dict), dataset, data_path,
  data_split, question_sampling, world_size, timestamp, segearthr1_version (+ image_size, dtype,
  limit, seed, fast_decode, num_workers, eval_seconds, samples_per_second: the evaluation loop's wall
  time, model loading excluded). Beyond the reference, clearly separated: ``letterboxed`` and
  ``original_resolution`` blocks (each: the reference metrics, ``ci95``, ``empty_target``,
  ``per_image``; see :mod:`segearthr1.evaluation.breakdown`), ``bootstrap`` (resamples, seed,
  confidence, method) and ``protocols`` (what each block means).
* ``per_sample.csv``: name, intersection, union, iou (foreground, full precision), index,
  image_name, question, then gt_pixels, pred_pixels (letterboxed foreground pixels), orig_intersection,
  orig_union, orig_iou, orig_gt_pixels, orig_pred_pixels (original resolution; empty when not
  computed), answer (the dataset's answer, reasoning only) — sorted by sample index.
* ``predictions/<sample_id>.png``: the S×S letterboxed predicted mask, 0/255, exactly the pixels the
  metrics were computed on; ``predictions_original/<sample_id>.png`` the mask at the image's
  original resolution (with ``--original_resolution``).
* ``report.html``: self-contained report (images inlined): metrics table, IoU histogram, P@t curve,
  empty-target confusion, best / median / worst galleries.

Sample ids are the image name (EarthReason stem, RefSegRS ID, RRSIS-D image stem); when a name occurs
more than once in the split (``--question_sampling all``, several RRSIS-D refs per image) the k-th
occurrence in index order is ``<image_name>__q<k>`` (k from 0).

Metrics are computed on the S×S letterboxed masks including the padding band (ground-truth 255 is
ignored) by :class:`segearthr1.evaluation.metrics.SegmentationMeter`. Distributed runs shard the
samples by index (rank r takes r, r+N, ...: no padding duplicates); counts are summed exactly
(int64) and gIoU is re-summed in sample order from the gathered per-sample rows, so metrics.json
and per_sample.csv are identical to a single-process run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import runtime as distributed
from .data.base import SAMPLING_MODES, SPLITS
from .data.collate import DataCollator
from .data.registry import DATASETS, build_dataset, default_data_root
from .data.transforms import PIXEL_MEAN, PIXEL_STD
from .errors import (CheckpointCorruptedError, CheckpointKeyError, CheckpointNotFoundError, DatasetCorruptedError,
                     DatasetNotFoundError, DependencyNotFoundError)
from .data.transforms import unletterbox_logits
from .evaluation.bootstrap import DEFAULT_RESAMPLES
from .evaluation.breakdown import blocks_from_rows
from .evaluation.metrics import IGNORE_INDEX, SegmentationMeter, foreground_counts, foreground_iou
from .runtime import check_finite_logits
from .visualization import draw_overlay, save_rgb_png

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("name", "intersection", "union", "iou", "index", "image_name", "question", "gt_pixels",
               "pred_pixels", "orig_intersection", "orig_union", "orig_iou", "orig_gt_pixels", "orig_pred_pixels",
               "answer")
_INT_COLUMNS = ("intersection", "union", "index", "gt_pixels", "pred_pixels", "orig_intersection", "orig_union",
                "orig_gt_pixels", "orig_pred_pixels")
_FLOAT_COLUMNS = ("iou", "orig_iou")
REFERENCE_IGNORED_FLAGS = ("version", "use_seg_query", "seg_task", "model_map_name", "image_aspect_ratio",
                           "segmentation", "lazy_preprocess", "is_multimodal", "image_grid_pinpoints")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


# ------------------------------------------------------------------------------------------------
# command line

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segearthr1.evaluate",
        description="Evaluate a SegEarth-R1 checkpoint on a dataset split (gIoU, cIoU, P@0.5-0.9 on the "
                    "letterboxed masks). Writes metrics.json, per_sample.csv and predictions/ to --output_dir. "
                    "Run under `torchrun --nproc_per_node N` to shard the split over N processes.")
    add = parser.add_argument
    add("--model_path", required=True,
        help="checkpoint directory: ours (config.json + model.safetensors + tokenizer) or a reference release")
    add("--data_path", "--base_data_path", dest="data_path", default=None,
        help="DATA_ROOT with rs_reason_seg/ and rs_ref_seg/ (default: $SEGEARTH_DATA, else ./datasets); "
             "--base_data_path is the reference's name")
    add("--data_split", default="val", choices=SPLITS, help="split to evaluate (default: val)")
    add("--dataset_type", default="RRSIS-D", choices=list(DATASETS),
        help="dataset format (default: RRSIS-D, as in the reference)")
    add("--mask_config", default=None,
        help="reference mask-config YAML (reference releases only; its _BASE_ chain is followed)")
    add("--image_size", type=_positive_int, default=None,
        help="letterbox size S of a reference release (default 1024); our checkpoints carry their own")
    add("--output_dir", default=None,
        help="where metrics.json, per_sample.csv and predictions/ go (default: outputs/eval/<dataset>_<split>)")
    add("--vis_path", default=None,
        help="directory for overlay PNGs (image + predicted tint/contour in red + ground-truth contour in "
             "green + the question) of the first --num_vis samples")
    add("--num_vis", type=_non_negative_int, default=20, help="number of overlays written to --vis_path (default 20)")
    add("--save_predictions", action=argparse.BooleanOptionalAction, default=True,
        help="write one 0/255 PNG per sample (the SxS letterboxed predicted mask) to output_dir/predictions/ "
             "(default: on)")
    add("--batch_size", "--eval_batch_size", dest="batch_size", type=_positive_int, default=1,
        help="samples per forward pass and process (default 1; --eval_batch_size is the reference's name)")
    add("--num_workers", "--dataloader_num_workers", dest="num_workers", type=_non_negative_int, default=None,
        help="DataLoader worker processes per rank (default: CPU cores per process, at most 8, so decoding "
             "overlaps the model; --dataloader_num_workers is the reference's name)")
    add("--pin_memory", action=argparse.BooleanOptionalAction, default=True,
        help="pinned host memory for batches when evaluating on CUDA (default: on; no effect on CPU)")
    add("--fast_decode", action="store_true",
        help="decode JPEGs much larger than the model input at reduced scale (OpenCV 1/2, 1/4, 1/8: the smallest "
             "still >= the letterbox size), then letterbox as usual. Faster; NOT byte-identical to the reference")
    add("--original_resolution", action=argparse.BooleanOptionalAction, default=True,
        help="also compute metrics at each image's original resolution (logits mapped back as inference does, "
             "padding excluded) into metrics.json 'original_resolution' (default: on)")
    add("--bootstrap_resamples", type=_non_negative_int, default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples for the 95%% confidence intervals of gIoU/cIoU (default {DEFAULT_RESAMPLES}, "
             "seeded by --seed; 0 = no intervals)")
    add("--report", action=argparse.BooleanOptionalAction, default=True,
        help="write output_dir/report.html: metrics, IoU histogram, P@t curve, empty-target confusion and "
             "best/median/worst galleries, images inlined (default: on)")
    add("--num_gallery", type=_non_negative_int, default=4,
        help="samples per gallery (best, median, worst) in report.html (default 4)")
    add("--device", default="auto", choices=DEVICES,
        help="auto (CUDA if available), cpu or cuda; under torchrun each rank uses cuda:LOCAL_RANK")
    add("--dtype", default="fp32", choices=DTYPES,
        help="model dtype: fp32 (default, as the reference evaluates), bf16, or auto (bf16 on CUDA, fp32 on CPU)")
    add("--question_sampling", "--sentence_sampling", dest="question_sampling", default="first",
        choices=SAMPLING_MODES,
        help="which question (EarthReason) / sentence (RRSIS-D) to use: first (reference), all (one sample "
             "per question), random (seeded per sample); --sentence_sampling is an alias")
    add("--limit", type=_positive_int, default=None, help="evaluate only the first N samples of the split")
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    ref = parser.add_argument_group("reference compatibility",
                                    "accepted so reference commands run unchanged; they have no effect here")
    for name in REFERENCE_IGNORED_FLAGS:
        ref.add_argument(f"--{name}", nargs="?", const="True", default=None,
                         help=f"reference flag --{name}: ignored")
    ref.add_argument("--local_rank", "--local-rank", type=int, default=None,
                     help="set by old launchers; ignored (LOCAL_RANK from the environment is used)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------
# samples

def _image_names(dataset) -> list[str] | None:
    """Every sample's image name without decoding images; None if the dataset cannot tell cheaply."""
    n = len(dataset)
    if hasattr(dataset, "sample_name"):
        return [str(dataset.sample_name(i)) for i in range(n)]
    source = getattr(dataset, "_source", None)
    if source is None:
        return None
    with torch.random.fork_rng(devices=[]):  # random question sampling draws from torch's RNG
        return [str(source(i).image_name) for i in range(n)]


def sample_ids(dataset) -> list[str]:
    """Unique, deterministic ids for all samples of `dataset` (see the module docstring).

    Datasets that cannot list image names cheaply get zero-padded indices.
    """
    names = _image_names(dataset)
    if names is None:
        width = max(6, len(str(len(dataset))))
        return [f"{i:0{width}d}" for i in range(len(dataset))]
    names = [n.replace("/", "_").replace("\\", "_") for n in names]
    totals: dict[str, int] = {}
    for n in names:
        totals[n] = totals.get(n, 0) + 1
    seen: dict[str, int] = {}
    ids = []
    for n in names:
        if totals[n] == 1:
            ids.append(n)
        else:
            k = seen.get(n, 0)
            seen[n] = k + 1
            ids.append(f"{n}__q{k}")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise ValueError(f"sample ids are not unique ({dupes}); image names clash with the '__q<k>' suffix. "
                         "Rename those images")
    return ids


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's samples: every world_size-th index starting at rank (no padding, no duplicates)."""
    return list(indices)[rank::world_size]


class IndexedSubset(Dataset):
    """The samples `indices` of `dataset`, each tagged with its global `sample_index`.

    Each sample is produced under a fixed RNG seed derived from (seed, index), so random question
    sampling gives the same sample for any world size, batch size or worker count.
    """

    def __init__(self, dataset, indices: Sequence[int], seed: int = 0):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        idx = self.indices[j]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + idx) % (2 ** 63))
            sample = dict(self.dataset[idx])
        sample["sample_index"] = idx
        return sample


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


def denormalize_images(images: torch.Tensor) -> np.ndarray:
    """[B,3,S,S] normalised float -> [B,S,S,3] RGB uint8 (the letterboxed input as the model saw it)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = (images.detach().float().cpu() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """Write a binary mask as an 8-bit PNG with values 0/255."""
    if not cv2.imwrite(str(path), (np.asarray(mask) > 0).astype(np.uint8) * 255):
        raise OSError(f"could not write prediction {path}; check that the directory is writable")


def read_mask_png(path: str | Path) -> np.ndarray:
    """Inverse of `write_mask_png`: HxW bool (for re-computing metrics from saved predictions)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"could not read prediction PNG {path}")
    return mask > 127


# ------------------------------------------------------------------------------------------------
# the evaluation loop

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
    rank, world = distributed.get_rank(), distributed.get_world_size()
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
    rows: list[dict] = []
    with _MaskWriter() as writer:
        for step, batch in enumerate(tqdm(loader, desc=desc, disable=rank != 0, total=len(loader),
                                          dynamic_ncols=True)):
            indices = [int(i) for i in batch.pop("sample_index")]
            names = [ids[i] for i in indices]
            gt = batch["masks"]
            out = model.predict(**_to_device(batch, device))
            logits = getattr(out, "mask_logits", None)
            if logits is not None:
                check_finite_logits(logits, f"evaluation batch {step} ({', '.join(names)})", logger)
            pred = out.masks.detach().to("cpu", torch.bool)
            stats = meter.update(pred, gt, names=names)
            gt_hw = gt[:, 0] if gt.dim() == 4 else gt
            gt_pixels = (gt_hw == 1).sum((-2, -1)).tolist()
            pred_pixels = (pred & (gt_hw != IGNORE_INDEX)).sum((-2, -1)).tolist()
            orig = [None] * len(indices)
            if original_resolution and logits is not None and "orig_masks" in batch and "letterbox" in batch:
                orig = [_original_resolution_stats(logits[j], batch["orig_masks"][j], batch["letterbox"][j])
                        for j in range(len(indices))]
            questions = batch.get("question", [""] * len(indices))
            image_names = batch.get("image_name", names)
            answers = batch.get("answer", [None] * len(indices))
            for j, idx in enumerate(indices):
                row = {"name": names[j], "intersection": int(stats.intersection[j, 1]),
                       "union": int(stats.union[j, 1]), "iou": float(stats.iou[j, 1]), "index": idx,
                       "image_name": str(image_names[j]), "question": str(questions[j]),
                       "gt_pixels": int(gt_pixels[j]), "pred_pixels": int(pred_pixels[j]),
                       "answer": "" if answers[j] is None else str(answers[j])}
                row.update({k: v for k, v in (orig[j] or {}).items() if k != "mask"})
                rows.append(row)
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
    return _reduce(meter, rows)


def _original_resolution_stats(logits: torch.Tensor, gt: torch.Tensor, geometry) -> dict:
    """Counts at the image's own resolution: logits cropped to the image band, resized bilinearly and
    thresholded at 0 (exactly as inference maps masks back), against the original mask."""
    pred = unletterbox_logits(logits.float(), geometry) > 0
    inter, union, gt_pixels, pred_pixels = foreground_counts(pred, gt.to(pred.device))
    return {"orig_intersection": inter, "orig_union": union, "orig_iou": foreground_iou(inter, union),
            "orig_gt_pixels": gt_pixels, "orig_pred_pixels": pred_pixels, "mask": pred.cpu().numpy()}


class _MaskWriter:
    """Writes prediction PNGs on background threads (OpenCV releases the GIL), so PNG encoding of
    large original-resolution masks overlaps the next forward pass; errors surface on exit."""

    def __init__(self, threads: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._futures: list = []

    def write(self, path: Path, mask: np.ndarray, max_pending: int = 8) -> None:
        pending = []
        for f in self._futures:
            if f.done():
                f.result()  # re-raises a failed write now rather than at the end
            else:
                pending.append(f)
        if len(pending) >= max_pending:  # bound the memory held by queued large masks
            pending.pop(0).result()
        pending.append(self._pool.submit(write_mask_png, path, mask))
        self._futures = pending

    def __enter__(self) -> "_MaskWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
        for f in self._futures:
            f.result()


def _reduce(meter: SegmentationMeter, rows: list[dict]) -> EvalResult:
    """Sum the meter over ranks, gather rows, and put everything in canonical (sample index) order."""
    meter.all_reduce(gather_rows=False)
    rows = sorted((r for part in distributed.all_gather_objects(rows) for r in part), key=lambda r: r["index"])
    indices = [r["index"] for r in rows]
    if len(set(indices)) != len(indices) or len(rows) != meter.count:
        raise RuntimeError(f"distributed evaluation gathered {len(rows)} rows ({len(set(indices))} distinct "
                           f"samples) but the reduced meter counted {meter.count}; every rank must run the same "
                           "shard logic")
    if (sum(r["intersection"] for r in rows) != int(meter.intersection_sum[1])
            or sum(r["union"] for r in rows) != int(meter.union_sum[1])):
        raise RuntimeError("reduced intersection/union sums disagree with the gathered per-sample rows")
    # gIoU summed sample by sample in index order, exactly as one process does; per-rank float sums
    # added across ranks would differ in the last bits.
    fg_sum = 0.0
    for r in rows:
        fg_sum += r["iou"]
    meter.iou_sum = torch.tensor([float(meter.iou_sum[0]), fg_sum], dtype=torch.float64)
    if meter.count == 0:
        raise ValueError("no samples were evaluated; check --limit and the dataset split")
    return EvalResult(metrics=meter.compute(), rows=rows, summary_lines=meter.summary_lines())


# ------------------------------------------------------------------------------------------------
# files

def write_per_sample_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """per_sample.csv in the given row order; IoU written with full precision (repr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            values = {k: r.get(k) for k in CSV_COLUMNS}
            values.update({k: repr(float(r[k])) for k in _FLOAT_COLUMNS if r.get(k) is not None})
            writer.writerow({k: "" if v is None else v for k, v in values.items()})


def read_per_sample_csv(path: str | Path) -> list[dict]:
    """Rows of per_sample.csv with numeric columns parsed (empty cells -> None)."""
    def parse(key, value):
        if key in _INT_COLUMNS:
            return int(value) if value not in (None, "") else None
        if key in _FLOAT_COLUMNS:
            return float(value) if value not in (None, "") else None
        return value

    with Path(path).open(newline="", encoding="utf-8") as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def _clear_stale_predictions(directory: Path) -> None:
    """Remove PNGs of an earlier run so predictions/ holds exactly this run's samples."""
    if not directory.is_dir():
        return
    stale = list(directory.glob("*.png"))
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d prediction PNGs of an earlier run from %s", len(stale), directory)


# ------------------------------------------------------------------------------------------------
# CLI workflow

def default_num_workers() -> int:
    """DataLoader workers per process: this process's share of the CPU cores, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cores // local_world))


PROTOCOLS = {
    "reference": "top-level giou/ciou/precision@*: the reference protocol - letterboxed SxS masks including the "
                 "padding band, the question(s) chosen by question_sampling (first = reference)",
    "letterboxed": "the same masks as the reference protocol, with intervals and breakdowns",
    "original_resolution": "each mask at its image's original HxW: logits cropped to the image band, resized "
                           "bilinearly and thresholded at 0 (as inference does), against the original mask; "
                           "padding excluded",
}


def extended_metrics(rows: Sequence[dict], resamples: int, seed: int) -> dict:
    """The metrics.json keys beyond the reference protocol (see the module docstring)."""
    blocks = blocks_from_rows(rows, resamples=resamples, seed=seed)
    protocols = {k: v for k, v in PROTOCOLS.items() if k == "reference" or k in blocks}
    bootstrap = {"resamples": resamples, "seed": seed, "confidence": 0.95, "method": "percentile",
                 "rng": "numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))"}
    return {"protocols": protocols, **blocks, "bootstrap": bootstrap}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _dataset_kwargs(args: argparse.Namespace) -> dict:
    if args.dataset_type == "EarthReason":
        return {"question_sampling": args.question_sampling}
    if args.dataset_type == "RRSIS-D":
        return {"sentence_sampling": args.question_sampling}
    if args.question_sampling != "first":
        logger.warning("--question_sampling %s has no effect on %s: it has one phrase per sample",
                       args.question_sampling, args.dataset_type)
    return {}


def _letterbox_size(model_dir: Path, args: argparse.Namespace) -> int:
    """The model's input size S, read from config.json before the (slow) weight load."""
    from .weights.files import read_json
    from .weights.reference_config import is_reference_config

    raw = read_json(model_dir / "config.json")
    if is_reference_config(raw):
        return args.image_size or 1024
    size = int(raw.get("image_size", 1024))
    if args.image_size is not None and args.image_size != size:
        raise ValueError(f"--image_size {args.image_size} differs from the checkpoint's image_size {size}; "
                         "--image_size is only for reference releases, drop it for our checkpoints")
    return size


def _log_ignored_flags(args: argparse.Namespace) -> None:
    used = {k: getattr(args, k) for k in REFERENCE_IGNORED_FLAGS if getattr(args, k) is not None}
    if used:
        logger.info("reference flags accepted and ignored: %s", used)
    if str(used.get("use_seg_query", "false")).lower() in ("true", "1", "yes"):
        logger.warning("--use_seg_query is ignored: our checkpoints carry mask_decoder settings in config.json, "
                       "reference releases load with the reference default (description query)")


def run(args: argparse.Namespace) -> EvalResult:
    """The CLI workflow without logging set-up: load, evaluate (sharded), write files on rank 0."""
    from . import __version__
    from .data.base import text_token_budget
    from .weights.files import MODEL_DIR_LAYOUT, load_tokenizer
    from .weights.pretrained import load_pretrained

    ctx = distributed.init_distributed(args.device)
    try:
        _seed_everything(args.seed)
        _log_ignored_flags(args)
        model_dir = Path(args.model_path).expanduser()
        if not model_dir.is_dir():
            raise CheckpointNotFoundError(f"--model_path {model_dir} does not exist or is not a directory; "
                                          f"{MODEL_DIR_LAYOUT}")
        data_path = Path(args.data_path).expanduser() if args.data_path else default_data_root()
        image_size = _letterbox_size(model_dir, args)
        # the dataset is checked before the weights are read, so a wrong data path fails in seconds
        dataset = build_dataset(args.dataset_type, data_path, args.data_split, load_tokenizer(model_dir),
                                image_size=image_size, train=False, **_dataset_kwargs(args))
        dataset.include_eval_extras = bool(args.original_resolution or args.report)
        dataset.fast_decode = bool(args.fast_decode)
        model, tokenizer = load_pretrained(model_dir, mask_config=args.mask_config, device=ctx.device,
                                           dtype=args.dtype, image_size=args.image_size)
        if model.config.image_size != image_size:
            raise ValueError(f"model input size {model.config.image_size} != dataset letterbox size {image_size}")
        # questions longer than the LLM's positions allow are truncated with a warning naming the sample
        dataset.max_text_tokens = text_token_budget(model)
        out_dir = Path(args.output_dir) if args.output_dir else Path("outputs") / "eval" / (
            f"{args.dataset_type}_{args.data_split}")
        pred_dir = out_dir / "predictions" if args.save_predictions else None
        orig_pred_dir = out_dir / "predictions_original" if args.save_predictions and args.original_resolution \
            else None
        vis_dir = Path(args.vis_path) if args.vis_path and args.num_vis > 0 else None
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            for d in (pred_dir, orig_pred_dir):
                if d is not None:
                    _clear_stale_predictions(d)
                    d.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        n_eval = min(args.limit, len(dataset)) if args.limit else len(dataset)
        if ctx.is_main:
            logger.info("evaluating %s on %s/%s: %d of %d samples, %d process(es), %s, batch %d", model_dir,
                        args.dataset_type, args.data_split, n_eval, len(dataset), ctx.world_size, ctx.device,
                        args.batch_size)
        num_workers = args.num_workers if args.num_workers is not None else default_num_workers()
        started = time.perf_counter()
        result = evaluate_model(model, dataset, tokenizer.pad_token_id, batch_size=args.batch_size,
                                num_workers=num_workers, seed=args.seed, limit=args.limit, device=ctx.device,
                                desc=f"{args.dataset_type}/{args.data_split}", prediction_dir=pred_dir,
                                vis_dir=vis_dir, num_vis=args.num_vis, original_resolution=args.original_resolution,
                                original_prediction_dir=orig_pred_dir, pin_memory=args.pin_memory)
        seconds = time.perf_counter() - started
        if ctx.is_main:
            payload = {
                **result.metrics,
                **extended_metrics(result.rows, args.bootstrap_resamples, args.seed),
                "checkpoint": str(model_dir.resolve()),
                "mask_config": str(Path(args.mask_config).resolve()) if args.mask_config else None,
                "config": _json_safe(model.config.to_dict()),
                "dataset": args.dataset_type,
                "data_path": str(data_path.resolve()),
                "data_split": args.data_split,
                "question_sampling": args.question_sampling,
                "world_size": ctx.world_size,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "segearthr1_version": __version__,
                "image_size": image_size,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "limit": args.limit,
                "seed": args.seed,
                "fast_decode": bool(args.fast_decode),
                "num_workers": num_workers,
                "eval_seconds": round(seconds, 3),
                "samples_per_second": round(result.metrics["num_samples"] / max(seconds, 1e-9), 4),
            }
            (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            write_per_sample_csv(out_dir / "per_sample.csv", result.rows)
            if args.report:
                from .evaluation.report import write_report

                report = write_report(out_dir, payload, result.rows, dataset, model=model,
                                      pad_token_id=tokenizer.pad_token_id, seed=args.seed, device=ctx.device,
                                      prediction_dir=pred_dir, num_gallery=args.num_gallery)
                logger.info("report: %s", report)
            for line in result.summary_lines:
                logger.info(line)
            logger.info("evaluated %d samples in %.1f s (%.3f samples/s, loading excluded)",
                        result.metrics["num_samples"], seconds, payload["samples_per_second"])
            logger.info("metrics: %s", out_dir / "metrics.json")
            logger.info("per-sample IoU: %s", out_dir / "per_sample.csv")
            if pred_dir is not None:
                logger.info("predicted masks (%dx%d letterboxed, 0/255): %s", image_size, image_size, pred_dir)
            if vis_dir is not None:
                logger.info("overlays of the first %d samples: %s", min(args.num_vis, n_eval), vis_dir)
        distributed.barrier()
        return result
    finally:
        distributed.cleanup(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import setup_logging

    args = parse_args(argv)
    setup_logging(getattr(logging, args.log_level))
    try:
        run(args)
    except (CheckpointNotFoundError, CheckpointKeyError, CheckpointCorruptedError, DatasetNotFoundError,
            DatasetCorruptedError, DependencyNotFoundError) as err:
        # a user-facing problem (paths, files, installs): the message says how to fix it; no traceback
        logger.error("%s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
