"""Compare a quickstart evaluation with two trivial baselines on the same generated split.

    python tools/quickstart_report.py --data_path outputs/quickstart/data --data_split val \
        --metrics outputs/quickstart/eval/metrics.json [--report outputs/quickstart/report.json]

Baselines (computed here, on the letterboxed masks exactly like the model's metrics):
    empty  predict nothing for every sample
    union  predict the union of all shapes drawn in the image (from the generator's `objects` records)
The model's gIoU/cIoU are also re-computed here from its saved prediction PNGs (predictions/ next to
metrics.json) against the letterboxed labels; a disagreement with metrics.json is an error (exit 2).
The model "learned" if its gIoU is >= --min_giou (0.60) and >= the better baseline + --min_margin (0.25).
Exit status 0 when it learned, 1 when it did not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segearthr1.data.earthreason import EarthReasonDataset  # noqa: E402
from segearthr1.data.synthetic import object_from_dict, shape_mask  # noqa: E402
from segearthr1.data.transforms import letterbox_mask  # noqa: E402
from segearthr1.evaluation.files import read_mask_png  # noqa: E402
from segearthr1.evaluation.metrics import SegmentationMeter  # noqa: E402
from segearthr1.runtime import setup_logging  # noqa: E402

logger = logging.getLogger("quickstart_report")


def baseline_metrics(data_path: str, split: str, image_size: int,
                     predictions: Path | None = None) -> dict[str, dict]:
    """gIoU/cIoU of the empty and union-of-shapes baselines on an EarthReason-layout split, and, with
    `predictions` (a directory of <image_name>.png), of those saved predictions ("saved")."""
    dataset = EarthReasonDataset(data_path, split, tokenizer=None, image_size=image_size, train=False)
    meters = {"empty": SegmentationMeter(), "union": SegmentationMeter()}
    if predictions is not None:
        meters["saved"] = SegmentationMeter()
    qa_dir = Path(dataset.root) / "QAs"
    for idx in range(len(dataset)):
        sample = dataset[idx]
        gt = sample["masks"][None]
        h, w = sample["orig_size"]
        qa = json.loads((qa_dir / f"{sample['image_name']}.json").read_text(encoding="utf-8"))
        if "objects" not in qa:
            raise ValueError(f"{qa_dir / sample['image_name']}.json has no 'objects' record: the union baseline needs "
                             "data written by tools/make_synthetic_dataset.py")
        union = np.zeros((h, w), np.uint8)
        for obj in qa["objects"]:
            union |= shape_mask(h, w, object_from_dict(obj))
        union_lb, _ = letterbox_mask(union, image_size)
        meters["union"].update(union_lb.float(), gt)
        meters["empty"].update(torch.zeros_like(gt[:, 0]).float(), gt)
        if predictions is not None:
            path = predictions / f"{sample['image_name']}.png"
            if not path.is_file():
                raise FileNotFoundError(f"no saved prediction {path} for sample {sample['image_name']}: evaluate with "
                                        "--question_sampling first and --save_predictions")
            pred = torch.from_numpy(read_mask_png(path))
            if tuple(pred.shape) != tuple(gt.shape[-2:]):
                raise ValueError(f"{path} is {tuple(pred.shape)}, expected the {tuple(gt.shape[-2:])} letterboxed mask")
            meters["saved"].update(pred[None].float(), gt)
    return {name: meter.compute() for name, meter in meters.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="DATA_ROOT of the generated data")
    parser.add_argument("--data_split", default="val", help="split the model was evaluated on")
    parser.add_argument("--metrics", required=True, help="metrics.json written by segearthr1.evaluate")
    parser.add_argument("--predictions", help="saved prediction PNGs to re-check metrics.json against "
                        "(default: predictions/ next to --metrics; 'none' skips the check)")
    parser.add_argument("--min_giou", type=float, default=0.60, help="required model gIoU")
    parser.add_argument("--min_margin", type=float, default=0.25, help="required gIoU margin over the better baseline")
    parser.add_argument("--report", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    metrics_path = Path(args.metrics)
    if not metrics_path.is_file():
        logger.error("metrics file %s not found: run segearthr1.evaluate first", metrics_path)
        return 2
    model = json.loads(metrics_path.read_text(encoding="utf-8"))
    image_size = int(model.get("image_size") or model["config"]["image_size"])
    predictions = None if args.predictions == "none" else Path(args.predictions or metrics_path.parent / "predictions")
    try:
        baselines = baseline_metrics(args.data_path, args.data_split, image_size, predictions)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    saved = baselines.pop("saved", None)
    if saved is not None:
        if saved["num_samples"] != model["num_samples"] or any(
                abs(saved[k] - model[k]) > 1e-9 for k in ("giou", "ciou")):
            logger.error("metrics.json (gIoU %.6f, cIoU %.6f, %d samples) disagrees with the saved predictions in %s "
                         "(gIoU %.6f, cIoU %.6f, %d samples)", model["giou"], model["ciou"], model["num_samples"],
                         predictions, saved["giou"], saved["ciou"], saved["num_samples"])
            return 2
        logger.info("re-computed from %s: gIoU %.4f cIoU %.4f (matches metrics.json)", predictions, saved["giou"],
                    saved["ciou"])
    best = max(baselines.values(), key=lambda m: m["giou"])
    learned = model["giou"] >= args.min_giou and model["giou"] >= best["giou"] + args.min_margin
    rows = [("model", model), *baselines.items()]
    table = "\n".join(f"  {name:<7} gIoU {m['giou']:.4f}   cIoU {m['ciou']:.4f}" for name, m in rows)
    verdict = (f"LEARNED: gIoU {model['giou']:.4f} >= {args.min_giou} and >= best baseline "
               f"{best['giou']:.4f} + {args.min_margin}" if learned else
               f"DID NOT LEARN ENOUGH: gIoU {model['giou']:.4f} (need >= {args.min_giou} and >= "
               f"{best['giou'] + args.min_margin:.4f})")
    logger.info("%s/%s, %d samples:\n%s\n  %s", Path(args.data_path).name, args.data_split, model["num_samples"],
                table, verdict)
    if args.report:
        report = {"model": {k: model[k] for k in ("giou", "ciou", "num_samples")},
                  "baselines": {k: {"giou": v["giou"], "ciou": v["ciou"]} for k, v in baselines.items()},
                  "learned": learned, "min_giou": args.min_giou, "min_margin": args.min_margin}
        Path(args.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
