"""Evaluate a SegEarth-R1 checkpoint on a dataset split: gIoU, cIoU and P@0.5…0.9 (DESIGN.md §2.8).

    python -m segearthr1.evaluate --model_path CKPT --data_path DATA_ROOT --dataset_type EarthReason
    python -m segearthr1.evaluate --model_path RUN/final --config RUN/resolved_config.yaml  # eval: section
    torchrun --nproc_per_node N -m segearthr1.evaluate --model_path CKPT ...   # or scripts/eval.sh

`--help` documents every flag. The workflow lives in `segearthr1/evaluation/`: `arguments`
(flags + run config), `samples` (ids, sharding), `loop` (predict, reduce), `files`, `run`.
"""
from __future__ import annotations

import sys

from .evaluation.arguments import build_parser, parse_args
from .evaluation.run import main, run

__all__ = ["build_parser", "main", "parse_args", "run"]

if __name__ == "__main__":
    sys.exit(main())
