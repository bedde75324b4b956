"""Command line of `python -m segearthr1.evaluate`; `--help` is its documentation.

Why a module of its own: the reference's flags must keep working unchanged (a reference user's
`eval.sh`), and a run config's `eval:`/`data:` values fill the flags the command line leaves out.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..data.registry import DATASETS, canonical_dataset
from ..data.spec import SAMPLING_MODES, SPLITS
from ..training.args import DataArgs, EvalArgs, data_args, eval_args, resolve_run_config
from .bootstrap import DEFAULT_RESAMPLES

logger = logging.getLogger(__name__)

REFERENCE_IGNORED_FLAGS = ("version", "use_seg_query", "seg_task", "model_map_name", "image_aspect_ratio",
                           "segmentation", "lazy_preprocess", "is_multimodal", "image_grid_pinpoints")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DATASET = "RRSIS-D"  # the reference evaluation's default
EVAL, DATA = EvalArgs(), DataArgs()  # the defaults of a run config's eval: and data: sections
DEFAULT_SPLIT = DATA.eval_split


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


def _dataset_name(text: str) -> str:
    """An alias becomes the registered name; anything else is left for argparse's "invalid choice"."""
    try:
        return canonical_dataset(text)
    except ValueError:
        return text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m segearthr1.evaluate",
        description="Evaluate a SegEarth-R1 checkpoint on a dataset split (gIoU, cIoU, P@0.5-0.9 on the "
                    "letterboxed masks). Writes metrics.json, per_sample.csv and predictions/ to --output_dir. "
                    "Run under `torchrun --nproc_per_node N` to shard the split over N processes.")
    add = parser.add_argument
    add("--model_path", required=True,
        help="checkpoint directory: ours (config.json + model.safetensors + tokenizer) or a reference release")
    add("--data_path", "--base_data_path", dest="data_path", default=None,
        help="DATA_ROOT with rs_reason_seg/ and rs_ref_seg/ (default: $SEGEARTH_DATA, else ./datasets); "
             "--base_data_path is the reference's name")
    add("--config", default=None,
        help="a run config (configs/*.yaml or a run's resolved_config.yaml): its eval: section (batch_size, "
             "num_vis, split) and data: section (dataset, data_path, eval_split, question_sampling, foreground) "
             "give the defaults; flags given here win")
    add("--data_split", default=None, choices=SPLITS,
        help=f"split to evaluate (default: the run config's eval.split / data.eval_split, else {DEFAULT_SPLIT})")
    add("--dataset_type", default=None, type=_dataset_name, choices=list(DATASETS),
        help=f"dataset, a name or alias (default: the run config's data.dataset, else {DEFAULT_DATASET} as in "
             "the reference)")
    add("--mask_config", default=None,
        help="reference mask-config YAML (reference releases only; its _BASE_ chain is followed)")
    add("--image_size", type=_positive_int, default=None,
        help="letterbox size S of a reference release (default 1024); our checkpoints carry their own")
    add("--output_dir", default=None,
        help="where metrics.json, per_sample.csv and predictions/ go (default: outputs/eval/<dataset>_<split>)")
    add("--vis_path", default=None,
        help="directory for overlay PNGs (image + predicted tint/contour in red + ground-truth contour in "
             "green + the question) of the first --num_vis samples")
    add("--num_vis", type=_non_negative_int, default=None,
        help=f"number of overlays written to --vis_path (default: the run config's eval.num_vis, else {EVAL.num_vis})")
    add("--save_predictions", action=argparse.BooleanOptionalAction, default=True,
        help="write one 0/255 PNG per sample (the SxS letterboxed predicted mask) to output_dir/predictions/ "
             "(default: on)")
    add("--batch_size", "--eval_batch_size", dest="batch_size", type=_positive_int, default=None,
        help=f"samples per forward pass and process (default: the run config's eval.batch_size, else "
             f"{EVAL.batch_size}; --eval_batch_size is the reference's name)")
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
    add("--question_sampling", "--sentence_sampling", dest="question_sampling", default=None,
        choices=SAMPLING_MODES,
        help="which of a sample's questions (EarthReason) / sentences (RRSIS-D) to use: first (reference), all "
             "(one sample per question), random (seeded per sample); default: the run config's "
             "data.question_sampling, else first; --sentence_sampling is an alias")
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


def run_config_defaults(path) -> dict:
    """The evaluation settings a run config gives (keys are this parser's dests)."""
    config, _ = resolve_run_config(path)
    data, evaluation = data_args(config), eval_args(config)
    return {"dataset_type": data.dataset, "data_path": data.data_path,
            "data_split": evaluation.split or data.eval_split, "question_sampling": data.question_sampling,
            "foreground": data.foreground, "batch_size": evaluation.batch_size, "num_vis": evaluation.num_vis}


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parsed flags; those left out come from `--config` (when given), else the defaults above."""
    args = build_parser(prog).parse_args(argv)
    defaults = {"dataset_type": DEFAULT_DATASET, "data_path": None, "data_split": DEFAULT_SPLIT,
                "question_sampling": DATA.question_sampling, "foreground": None, "batch_size": EVAL.batch_size,
                "num_vis": EVAL.num_vis}
    if args.config:
        defaults.update(run_config_defaults(args.config))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args
