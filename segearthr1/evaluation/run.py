"""`python -m segearthr1.evaluate`: load a checkpoint, evaluate a split (sharded), write the files.

Why one place: benchmark numbers come from one deterministic workflow that writes them to files
(never copied from the console) and gives identical results single-process or under `torchrun`.

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
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import runtime
from ..data.registry import build_dataset, default_data_root, get_spec
from ..errors import (CheckpointCorruptedError, CheckpointKeyError, CheckpointNotFoundError, DatasetCorruptedError,
                      DatasetNotFoundError, DependencyNotFoundError)
from .arguments import REFERENCE_IGNORED_FLAGS, parse_args
from .breakdown import blocks_from_rows
from .files import clear_stale_predictions, write_per_sample_csv
from .loop import EvalResult, evaluate_model

logger = logging.getLogger(__name__)


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


def _letterbox_size(model_dir: Path, args: argparse.Namespace) -> int:
    """The model's input size S, read from config.json before the (slow) weight load."""
    from ..weights.files import read_json
    from ..weights.reference_config import REFERENCE_IMAGE_SIZE, is_reference_config

    raw = read_json(model_dir / "config.json")
    if is_reference_config(raw):
        return args.image_size or REFERENCE_IMAGE_SIZE
    size = int(raw.get("image_size", REFERENCE_IMAGE_SIZE))
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
    from .. import __version__
    from ..data.base import text_token_budget
    from ..weights.files import MODEL_DIR_LAYOUT, load_tokenizer
    from ..weights.pretrained import load_pretrained

    ctx = runtime.init_distributed(args.device)
    try:
        _seed_everything(args.seed)
        _log_ignored_flags(args)
        model_dir = Path(args.model_path).expanduser()
        if not model_dir.is_dir():
            raise CheckpointNotFoundError(what="--model_path does not exist or is not a directory", where=model_dir,
                                          hint=MODEL_DIR_LAYOUT)
        data_path = Path(args.data_path).expanduser() if args.data_path else default_data_root()
        image_size = _letterbox_size(model_dir, args)
        # the dataset is checked before the weights are read, so a wrong data path fails in seconds
        options = get_spec(args.dataset_type).dataset_options(args.question_sampling, args.foreground)
        dataset = build_dataset(args.dataset_type, data_path, args.data_split, load_tokenizer(model_dir),
                                image_size=image_size, train=False, **options)
        dataset.include_eval_extras = bool(args.original_resolution or args.report)
        dataset.fast_decode = bool(args.fast_decode)
        model, tokenizer = load_pretrained(model_dir, mask_config=args.mask_config, device=ctx.device,
                                           dtype=args.dtype, image_size=args.image_size)
        if model.config.image_size != image_size:
            raise ValueError(f"model input size {model.config.image_size} != dataset letterbox size {image_size}")
        runtime.tune_cpu_allocator_for(ctx.device, "evaluation")
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
                    clear_stale_predictions(d)
                    d.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
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
                "config": json.loads(json.dumps(model.config.to_dict(), default=str)),
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
                **({"run_config": str(Path(args.config).resolve())} if args.config else {}),
            }
            (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            write_per_sample_csv(out_dir / "per_sample.csv", result.rows)
            if args.report:
                from .report import write_report

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
        runtime.barrier()
        return result
    finally:
        runtime.cleanup(ctx)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from ..runtime import setup_logging

    args = parse_args(argv, prog)
    setup_logging(getattr(logging, args.log_level))
    try:
        run(args)
    except (CheckpointNotFoundError, CheckpointKeyError, CheckpointCorruptedError, DatasetNotFoundError,
            DatasetCorruptedError, DependencyNotFoundError) as err:
        # a user-facing problem (paths, files, installs): the message says how to fix it; no traceback
        logger.error("%s: %s", type(err).__name__, err)
        return 1
    return 0
