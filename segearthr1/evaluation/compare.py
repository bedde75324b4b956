"""`segearthr1 compare RUN_A RUN_B ...`: paired comparison of evaluation runs.

Why: "B is 0.4 points better than A" is only worth reporting if the difference survives the
sampling noise of the benchmark. Both runs scored the *same* samples, so the right test is paired:
every bootstrap resample draws the same samples for both runs, and the interval of the difference
is far tighter than two independent intervals would suggest.

Each RUN is an evaluation output directory (per_sample.csv, metrics.json). The first run is the
baseline; every other run is compared with it. Runs must cover the same samples (same sample ids
and, per id, the same question); otherwise the command stops and names the difference.

Per metric (gIoU, cIoU, P@0.5, and the original-resolution gIoU/cIoU when both runs have them):
baseline value, other value, difference (other - baseline), paired-bootstrap 95 % interval of the
difference (`bootstrap.py` recipe, seeded), and win/tie/loss counts of the per-sample values (IoU,
or "IoU > 0.5" for P@0.5; ties are exact). Printed as a table (Markdown with ``--markdown``) and
written as JSON (``--output``).

Usage::

    segearthr1 compare outputs/eval/base outputs/eval/ablation [--markdown] [--output compare.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DatasetCorruptedError
from .bootstrap import (DEFAULT_RESAMPLES, bootstrap_values, ciou_statistic, giou_statistic,
                        paired_difference_statistic, percentile_interval)
from .breakdown import reference_metrics
from .files import read_per_sample_csv

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One evaluation output directory, rows in a common sample order after `align`."""

    name: str
    path: Path
    rows: list[dict]
    metrics: dict


def load_run(path: str | Path) -> Run:
    """Read per_sample.csv (+ metrics.json if present) of an evaluation output directory."""
    path = Path(path).expanduser()
    csv_path = path / "per_sample.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{path} is not an evaluation output directory: {csv_path} does not exist "
                                "(run `segearthr1 evaluate --output_dir DIR` first and pass DIR)")
    rows = read_per_sample_csv(csv_path)
    if not rows:
        raise DatasetCorruptedError(f"{csv_path} has no samples")
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    return Run(name=path.name or str(path), path=path, rows=rows, metrics=metrics)


def _preview(items: Sequence[str], limit: int = 10) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def align(base: Run, other: Run) -> Run:
    """`other` with its rows in `base`'s sample order; ValueError naming any difference in the samples."""
    by_name = {r["name"]: r for r in other.rows}
    base_names = [r["name"] for r in base.rows]
    missing = set(base_names) - set(by_name)
    extra = set(by_name) - set(base_names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} sample(s) of {base.name} are not in {other.name}: {_preview(missing)}")
        if extra:
            parts.append(f"{len(extra)} sample(s) of {other.name} are not in {base.name}: {_preview(extra)}")
        raise ValueError(f"runs {base.name} ({base.path}) and {other.name} ({other.path}) do not cover the same "
                         "samples; " + "; ".join(parts) + ". Evaluate both on the same split, --question_sampling "
                         "and --limit")
    differ = [r["name"] for r in base.rows if (r.get("question"), r.get("image_name"))
              != (by_name[r["name"]].get("question"), by_name[r["name"]].get("image_name"))]
    if differ:
        raise ValueError(f"runs {base.name} and {other.name} use different questions/images for {len(differ)} "
                         f"sample(s): {_preview(differ)}; evaluate both with the same --question_sampling and --seed")
    return Run(name=other.name, path=other.path, rows=[by_name[n] for n in base_names], metrics=other.metrics)


@dataclass(frozen=True)
class Metric:
    """How to compute a metric from aligned rows: per-sample values, the run value, a bootstrap statistic."""

    name: str
    per_sample: Callable[[list[dict]], np.ndarray]
    value: Callable[[list[dict]], float]
    statistic: Callable[[list[dict]], Callable]


def _col(rows, key, dtype=np.float64):
    return np.array([r[key] for r in rows], dtype=dtype)


def _metrics(prefix: str, label: str) -> list[Metric]:
    iou, inter, union = f"{prefix}iou", f"{prefix}intersection", f"{prefix}union"
    ref = lambda rows: reference_metrics(list(_col(rows, iou)), [int(v) for v in _col(rows, inter, np.int64)],  # noqa: E731
                                         [int(v) for v in _col(rows, union, np.int64)])
    return [
        Metric(f"{label}giou", lambda rows: _col(rows, iou), lambda rows: ref(rows)["giou"],
               lambda rows: giou_statistic(_col(rows, iou))),
        Metric(f"{label}ciou", lambda rows: _col(rows, iou), lambda rows: ref(rows)["ciou"],
               lambda rows: ciou_statistic(_col(rows, inter), _col(rows, union))),
        Metric(f"{label}precision@0.5", lambda rows: (_col(rows, iou) > 0.5).astype(np.float64),
               lambda rows: ref(rows)["precision@0.5"],
               lambda rows: giou_statistic((_col(rows, iou) > 0.5).astype(np.float64))),
    ]


def available_metrics(runs: Sequence[Run]) -> list[Metric]:
    """Letterboxed metrics always; original-resolution ones when every run has them."""
    metrics = _metrics("", "")
    if all(all(r.get("orig_iou") is not None for r in run.rows) for run in runs):
        metrics += _metrics("orig_", "original_resolution/")[:2]
    return metrics


def compare_pair(base: Run, other: Run, metrics: Sequence[Metric], resamples: int, seed: int,
                 confidence: float = 0.95) -> list[dict]:
    """One result dict per metric for `other` versus `base` (rows aligned)."""
    stats = {m.name: paired_difference_statistic(m.statistic(base.rows), m.statistic(other.rows)) for m in metrics}
    diffs = bootstrap_values(stats, len(base.rows), resamples, seed) if resamples > 0 else {}
    out = []
    for m in metrics:
        a, b = m.per_sample(base.rows), m.per_sample(other.rows)
        va, vb = m.value(base.rows), m.value(other.rows)
        ci = percentile_interval(diffs[m.name], confidence) if resamples > 0 else None
        out.append({"baseline": base.name, "run": other.name, "metric": m.name, "baseline_value": va,
                    "run_value": vb, "difference": vb - va, "ci95": ci,
                    "excludes_zero": None if ci is None else bool(ci[0] > 0 or ci[1] < 0),
                    "wins": int((b > a).sum()), "ties": int((b == a).sum()), "losses": int((b < a).sum())})
    return out


def format_table(results: Sequence[dict], markdown: bool = False) -> str:
    """Results as an aligned text table, or a Markdown table."""
    header = ["baseline", "run", "metric", "baseline value", "run value", "difference", "95% CI", "W/T/L"]
    lines = []
    for r in results:
        ci = "—" if r["ci95"] is None else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" + (
            " *" if r["excludes_zero"] else "")
        lines.append([r["baseline"], r["run"], r["metric"], f"{r['baseline_value']:.4f}", f"{r['run_value']:.4f}",
                      f"{r['difference']:+.4f}", ci, f"{r['wins']}/{r['ties']}/{r['losses']}"])
    if markdown:
        rows = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|"]
        rows += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(rows)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def compare_runs(paths: Sequence[str | Path], resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Load, align and compare runs (the first is the baseline); the JSON-ready result."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two evaluation directories, got {len(paths)}")
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same directory name in different places: use the full paths
        for r in runs:
            r.name = str(r.path)
    base = runs[0]
    others = [align(base, r) for r in runs[1:]]
    metrics = available_metrics(runs)
    results = [res for other in others for res in compare_pair(base, other, metrics, resamples, seed)]
    return {
        "runs": [{"name": r.name, "path": str(r.path.resolve()), "checkpoint": r.metrics.get("checkpoint")}
                 for r in runs],
        "baseline": base.name,
        "num_samples": len(base.rows),
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": 0.95, "method": "paired percentile",
                      "rng": "numpy.random.default_rng(seed).integers(0, n, size=(resamples, n)), same rows for "
                             "both runs"},
        "comparisons": results,
    }


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "segearthr1 compare",
                                description="Paired comparison of evaluation runs on the same samples: difference, "
                                            "paired-bootstrap 95% CI and win/tie/loss counts per metric. The first "
                                            "RUN is the baseline.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluation output directories (with per_sample.csv)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--output", default="compare.json", help="where the JSON result goes (default: ./compare.json)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"paired bootstrap resamples (default {DEFAULT_RESAMPLES}; 0 = no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from ..runtime import setup_logging

    setup_logging(logging.INFO)
    args = build_parser(prog).parse_args(argv)
    if args.resamples < 0:
        build_parser(prog).error(f"--resamples {args.resamples} is negative; use 0 or more")
    try:
        result = compare_runs(args.runs, resamples=args.resamples, seed=args.seed)
    except (FileNotFoundError, ValueError, DatasetCorruptedError) as err:
        logger.error("%s", err)
        return 1
    sys.stdout.write(format_table(result["comparisons"], markdown=args.markdown) + "\n")
    sys.stdout.write(f"\n{result['num_samples']} paired samples; * = the 95% CI of the difference excludes 0\n")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("comparison written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
