"""`segearthr1 check-data`: verify a whole dataset in one pass and list every problem with its file.

    segearthr1 check-data --dataset_type EarthReason --data_path datasets [--split train val]

Why: the loaders stop at the first broken file (rightly: training must not use it), which makes
repairing a dataset one run per file. This walks every sample of every split with the loaders' own
checks (files pair up, JSON parses as UTF-8, every image and mask decodes completely, sizes agree),
collects all problems and exits 1 if there are any (0 when the dataset is clean). Images below
the minimum size are listed as warnings (they do not change the exit status).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import DatasetCorruptedError, DatasetNotFoundError
from ..runtime import setup_logging
from .integrity import small_image_message
from .registry import DATASETS, build_dataset, canonical_dataset, default_data_root, get_spec
from .spec import SPLITS

logger = logging.getLogger(__name__)

CHECK_IMAGE_SIZE = 32  # letterbox target while checking: decoding is what is tested, not resizing
DATA_ERRORS = (DatasetCorruptedError, DatasetNotFoundError, ValueError, OSError)


def check_split(dataset_type: str, data_root: Path, split: str, required: bool = True
                ) -> tuple[list[str], list[str], int]:
    """(problems, warnings, samples checked) of one split. A split that does not exist is a problem
    only when `required` (it was asked for by name)."""
    try:
        dataset = build_dataset(dataset_type, data_root, split, None, image_size=CHECK_IMAGE_SIZE, train=False,
                                collect_problems=True)
    except DatasetNotFoundError as err:
        return ([f"split {split}: {err}"] if required else []), [], 0
    except DATA_ERRORS as err:
        return [f"split {split}: {err}"], [], 0
    problems, warnings = list(dataset.problems), []
    for idx in tqdm(range(len(dataset)), desc=f"check {dataset_type}/{split}", unit="sample", leave=False):
        try:
            sample = dataset[idx]
        except DATA_ERRORS as err:
            problems.append(str(err))
            continue
        if (small := small_image_message(sample["image_path"], *sample["orig_size"])) is not None:
            warnings.append(small)
    return problems, warnings, len(dataset)


def check_dataset(dataset_type: str, data_root: str | Path, splits: list[str] | None = None
                  ) -> tuple[list[str], list[str], int]:
    """Every problem and warning of the given splits (default: the splits that exist)."""
    problems, warnings, checked = [], [], 0
    for split in splits or get_spec(dataset_type).splits:
        p, w, n = check_split(dataset_type, Path(data_root), split, required=bool(splits))
        problems += p
        warnings += list(dict.fromkeys(w))
        checked += n
    if not checked and not problems:
        problems.append(f"no split of {dataset_type} found under {data_root} (looked for {', '.join(get_spec(dataset_type).splits)})")
    return problems, warnings, checked


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_type", required=True, type=canonical_dataset,
                   help=f"{', '.join(DATASETS)} (aliases as in training configs)")
    p.add_argument("--data_path", default=None,
                   help="dataset root (the directory holding rs_reason_seg/ or rs_ref_seg/); default "
                        "$SEGEARTH_DATA or ./datasets")
    p.add_argument("--split", nargs="+", choices=list(SPLITS), default=None,
                   help="splits to check (default: every split that exists)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "segearthr1 check-data") -> int:
    setup_logging(logging.WARNING)
    args = parse_args(argv, prog)
    root = Path(args.data_path) if args.data_path else default_data_root()
    problems, warnings, checked = check_dataset(args.dataset_type, root, args.split)
    for line in warnings:
        sys.stdout.write(f"warning: {line}\n")
    for line in problems:
        sys.stdout.write(f"problem: {line}\n")
    status = f"{checked} samples of {args.dataset_type} under {root} checked: {len(problems)} problem(s), " \
             f"{len(warnings)} warning(s)"
    sys.stdout.write((status if problems else status + "; the dataset is usable") + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
