"""Train SegEarth-R1: `python -m segearthr1.train --config configs/tiny.yaml [--set KEY=VALUE ...]`.

Thin entry point (also `segearthr1 train` and scripts/train.sh); `--help` lists the options and the
workflow lives in `segearthr1/training/run.py`.
"""
from __future__ import annotations

import sys

from .training.run import main

if __name__ == "__main__":
    sys.exit(main())
