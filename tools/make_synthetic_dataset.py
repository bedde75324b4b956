"""Write look-alike data of the registered datasets (EarthReason, RRSIS-D, RefSegRS) in their real layouts.

Example:
    python tools/make_synthetic_dataset.py --out datasets/synthetic \
        --datasets EarthReason RRSIS-D RefSegRS --n-train 200 --n-val 50 --seed 0
Then point the scripts at it: --data_path datasets/synthetic (or SEGEARTH_DATA=datasets/synthetic).
The generator itself lives in segearthr1/data/synthetic.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segearthr1.data.registry import canonical_dataset, synthetic_names  # noqa: E402
from segearthr1.data.synthetic import generate  # noqa: E402
from segearthr1.runtime import setup_logging  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="DATA_ROOT to write into")
    p.add_argument("--datasets", nargs="+", type=canonical_dataset, default=synthetic_names(),
                   choices=synthetic_names(), help="datasets to write, names or aliases (default: all)")
    p.add_argument("--n-train", type=int, default=200, help="images in the train split")
    p.add_argument("--n-val", type=int, default=50, help="images in the val split")
    p.add_argument("--n-test", type=int, default=None, help="images in the test split (default: --n-val)")
    p.add_argument("--seed", type=int, default=0,
                   help="every sample is drawn from (seed, split, index): same seed, same files")
    p.add_argument("--min-size", type=int, default=64, help="smallest image side in pixels")
    p.add_argument("--max-size", type=int, default=128, help="largest image side (e.g. 1500 for > 1024 px)")
    p.add_argument("--absent-fraction", type=float, default=0.15,
                   help="share of EarthReason samples whose target is absent")
    p.add_argument("--num-colors", type=int, default=7,
                   help="palette size, 4..7 (the first N of red, green, blue, yellow, purple, orange, white)")
    p.add_argument("--object-scale", type=float, default=1.0,
                   help="multiply the shapes' radii (8-17%% of the short side) by this, 0.5..2")
    p.add_argument("--color-distractor-prob", type=float, default=1.0,
                   help="share of scenes with a second object of the target's colour (a same-shape distractor "
                        "is always drawn), 0..1")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing EarthReason samples (the files do not depend on it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    summary = generate(args.out, datasets=args.datasets, n_train=args.n_train, n_val=args.n_val,
                       n_test=args.n_val if args.n_test is None else args.n_test, seed=args.seed,
                       min_size=args.min_size, max_size=args.max_size, absent_fraction=args.absent_fraction,
                       num_colors=args.num_colors, object_scale=args.object_scale,
                       color_distractor_prob=args.color_distractor_prob, workers=args.workers)
    logging.getLogger("make_synthetic_dataset").info("samples per split: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
