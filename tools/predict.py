"""Run `segearthr1 predict` from a checkout without installing (same flags).

Example:
    python tools/predict.py --model_path ckpt/ --image scene.tif --query "Where could boats dock?" --output_dir out/
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segearthr1.inference.predict_cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="tools/predict.py"))
