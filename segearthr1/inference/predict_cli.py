"""`segearthr1 predict`: masks for (image, query) pairs at the images' own resolution and CRS.

Examples:
    segearthr1 predict --model_path ckpt/ --image scene.tif --query "Where could boats dock?" --output_dir out/
    segearthr1 predict --model_path release/ --mask_config mask.yaml --task referring \\
        --image_dir tiles/ --query "the large white building" --output_dir out/ --batch_size 4
    segearthr1 predict --model_path ckpt/ --queries pairs.csv --output_dir out/ --explain

Per (image, query k) it writes `<stem>__<k>_mask.png` (0/255), `<stem>__<k>_overlay.png` and
`<stem>__<k>.json`; for georeferenced rasters also `<stem>__<k>_mask.tif` (uint8 1/0, the input's
CRS/transform; 255 = nodata where the input is nodata) and `<stem>__<k>_mask.geojson` (polygons in the
image CRS). All records are also collected in `predictions.jsonl`.

With --tile (scenes larger than the model's input) the raster is read and predicted tile by tile:
`<stem>__<k>_mask.tif` (cloud-optimised, for every input), `_mask.geojson` (georeferenced inputs),
`_overlay.png` (a preview at most 2048 px on its longer side) and the `.json` record; no full-size
mask PNG, which would need the whole mask in memory.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import (CheckpointCorruptedError, CheckpointKeyError, CheckpointNotFoundError, DatasetCorruptedError,
                      DependencyNotFoundError)
from ..runtime import tune_cpu_allocator_for
from ..visualization import save_rgb_png
from .geo import write_geojson, write_mask_geotiff
from .tiling import TILE_BATCH
from .predictor import (DEFAULT_MAX_NEW_TOKENS, TASKS, LoadedImage, check_device, check_query, default_task,
                        load_image)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
USER_ERRORS = (ValueError, FileNotFoundError, DatasetCorruptedError, CheckpointNotFoundError, CheckpointKeyError,
               CheckpointCorruptedError, DependencyNotFoundError)


@dataclass
class Job:
    image: Path
    query: str
    index: int  # k: the query's number for this image (0-based)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and device flags `predict` and `demo` share."""
    p.add_argument("--model_path", required=True, type=Path,
                   help="our checkpoint directory or a reference release directory")
    p.add_argument("--mask_config", type=Path, default=None, help="mask-config YAML of a reference release")
    p.add_argument("--image_size", type=int, default=None, help="letterbox size override for reference releases")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")


def build_parser(prog: str = "segearthr1 predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    add_model_arguments(p)
    images = p.add_mutually_exclusive_group()
    images.add_argument("--image", type=Path, nargs="+", help="one or more image files")
    images.add_argument("--image_dir", type=Path, help=f"a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    queries = p.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", help="the question or referring expression, applied to every image")
    queries.add_argument("--queries", type=Path,
                         help="JSONL or CSV with `image` and `query` columns (relative image paths resolve "
                              "against --image_dir, else the file's folder); without an `image` column every "
                              "query is applied to every --image/--image_dir image")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="prompt template; default: from the checkpoint's resolved_config.yaml, else reasoning")
    p.add_argument("--output_dir", required=True, type=Path,
                   help="where the masks, overlays, records and predictions.jsonl go (created if missing)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="(image, query) pairs per forward pass (not with --tile: see --tile_batch)")
    p.add_argument("--bands", type=int, nargs="+", default=None,
                   help="1-based bands of multi-band rasters as R G B (or one band), e.g. --bands 4 3 2")
    p.add_argument("--simplify", type=float, default=None,
                   help="GeoJSON polygon simplification tolerance in CRS units (default: exact pixel edges)")
    p.add_argument("--threshold", type=float, default=0.0, help="logit threshold of the mask (0 = probability 0.5)")
    p.add_argument("--explain", action="store_true", help="also generate the textual answer (reasoning task)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="answer length limit for --explain")
    p.add_argument("--max_query_tokens", type=int, default=None,
                   help="reject queries longer than this many tokens (default and upper bound: what fits in the "
                        "model's context next to the prompt and the visual tokens)")
    tiles = p.add_argument_group("tiled inference (large scenes)")
    tiles.add_argument("--tile", action="store_true",
                       help="predict large scenes tile by tile at full resolution with bounded memory, instead of "
                            "letterboxing the whole scene to the model's input size")
    tiles.add_argument("--tile_size", type=int, default=None,
                       help="tile size in source pixels (default: the model's input size, 1024 for released models)")
    tiles.add_argument("--overlap", type=int, default=None,
                       help="overlap between neighbouring tiles in source pixels, blended with feathered weights "
                            "(default: tile_size / 8)")
    tiles.add_argument("--tile_batch", type=int, default=TILE_BATCH, help="tiles per model batch with --tile")
    return p


# ------------------------------------------------------------------------------------------------
# inputs

def _list_dir(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--image_dir {folder} is not a directory; pass a folder of images")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--image_dir {folder} holds no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    return files


def _check_image_file(path: Path, where: str) -> Path:
    if not path.is_file():
        what = "is a directory (use --image_dir)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image {path} ({where}) {what}; pass an existing image file")
    return path


def read_query_table(path: Path) -> list[tuple[str | None, str, str]]:
    """Rows (image or None, query, where) of a .jsonl/.json-lines or .csv file."""
    if not path.is_file():
        raise FileNotFoundError(f"--queries file {path} does not exist")
    rows: list[dict] = []
    wheres: list[str] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "query" not in reader.fieldnames:
                raise ValueError(f"{path}: the CSV header {reader.fieldnames} has no `query` column; expected "
                                 f"columns image,query")
            for line, row in enumerate(reader, start=2):
                rows.append(row)
                wheres.append(f"{path}:{line}")
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line} is not valid JSON ({err}); expected one object per line, "
                                 f'e.g. {{"image": "a.tif", "query": "..."}}') from err
            if not isinstance(row, dict) or "query" not in row:
                raise ValueError(f"{path}:{line} must be an object with a `query` key (and `image`), got {text!r}")
            rows.append(row)
            wheres.append(f"{path}:{line}")
    else:
        raise ValueError(f"--queries {path}: unsupported suffix {path.suffix!r}; use .jsonl or .csv")
    if not rows:
        raise ValueError(f"--queries file {path} holds no rows")
    out = []
    for row, where in zip(rows, wheres):
        image = row.get("image")
        out.append((str(image) if image not in (None, "") else None, check_query(row.get("query"), f"query at {where}"),
                    where))
    return out


def build_jobs(args: argparse.Namespace) -> list[Job]:
    """Validate every input before the model is loaded, so mistakes fail in seconds."""
    given = [_check_image_file(p, "--image") for p in args.image] if args.image else \
        _list_dir(args.image_dir) if args.image_dir else []
    pairs: list[tuple[Path, str]] = []
    if args.query is not None:
        if not given:
            raise ValueError("--query needs images: pass --image PATH... or --image_dir DIR")
        text = check_query(args.query, "--query")
        pairs = [(p, text) for p in given]
    else:
        rows = read_query_table(args.queries)
        with_image = [r for r in rows if r[0] is not None]
        if with_image and len(with_image) != len(rows):
            missing = next(r[2] for r in rows if r[0] is None)
            raise ValueError(f"{missing} has no image while other rows do; give every row an image")
        if with_image:
            base = args.image_dir or args.queries.parent
            for image, query, where in rows:
                path = Path(image)
                pairs.append((_check_image_file(path if path.is_absolute() else base / path, where), query))
        else:
            if not given:
                raise ValueError(f"{args.queries} has no `image` column; pass the images with --image or --image_dir")
            pairs = [(p, q) for p in given for _, q, _ in rows]
    counts: dict[Path, int] = {}
    jobs = []
    for path, query in pairs:
        key = path.resolve()
        jobs.append(Job(path, query, counts.get(key, 0)))
        counts[key] = counts.get(key, 0) + 1
    return jobs


def output_stems(jobs: list[Job]) -> dict[Path, str]:
    """A unique file stem per input image (`name`, then `name-1`, ... for same-named files)."""
    stems: dict[Path, str] = {}
    used: set[str] = set()
    for job in jobs:
        key = job.image.resolve()
        if key in stems:
            continue
        stem, n = job.image.stem, 1
        while stem in used:
            stem, n = f"{job.image.stem}-{n}", n + 1
        if stem != job.image.stem:
            logger.warning("%s shares its name with another input; its outputs are named %s__*", job.image, stem)
        used.add(stem)
        stems[key] = stem
    return stems


# ------------------------------------------------------------------------------------------------
# outputs

def write_outputs(prediction, out_dir: Path, base: str) -> dict[str, str]:
    """Write the files of one prediction; returns {kind: path}."""
    start = time.perf_counter()
    paths = {"mask_png": out_dir / f"{base}_mask.png", "overlay_png": out_dir / f"{base}_overlay.png",
             "record_json": out_dir / f"{base}.json"}
    if not cv2.imwrite(str(paths["mask_png"]), prediction.mask.astype(np.uint8) * 255):
        raise OSError(f"could not write {paths['mask_png']}; check that --output_dir is writable")
    save_rgb_png(paths["overlay_png"], prediction.overlay())
    if prediction.geo is not None:
        paths["mask_tif"] = write_mask_geotiff(out_dir / f"{base}_mask.tif", prediction.mask, prediction.geo)
        paths["mask_geojson"] = write_geojson(out_dir / f"{base}_mask.geojson", prediction.polygons, prediction.geo,
                                              {"query": prediction.record["query"]})
    return _write_record(prediction.record, paths, start)


def write_tiled_outputs(result, out_dir: Path, base: str) -> dict[str, str]:
    """Files of one tiled prediction (its mask GeoTIFF is already written); returns {kind: path}."""
    start = time.perf_counter()
    paths = {"mask_tif": result.mask_path, "overlay_png": out_dir / f"{base}_overlay.png",
             "record_json": out_dir / f"{base}.json"}
    if result.preview is not None:
        save_rgb_png(paths["overlay_png"], result.preview)
    if result.georeferenced:
        paths["mask_geojson"] = write_geojson(out_dir / f"{base}_mask.geojson", result.polygons, result.info,
                                              {"query": result.record["query"]})
    return _write_record(result.record, paths, start)


def _write_record(record: dict, paths: dict, start: float) -> dict[str, str]:
    """Add the output paths and the write time to `record` and write it as JSON."""
    record["outputs"] = {k: str(v) for k, v in paths.items()}
    record["timings_s"]["write_s"] = round(time.perf_counter() - start, 6)
    paths["record_json"].write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record["outputs"]


def run_tiled(args: argparse.Namespace, predictor, jobs: list[Job], stems: dict[Path, str], summary) -> None:
    """--tile: one (image, query) pair at a time, each over its tiles."""
    from tqdm import tqdm

    from .tiling import predict_tiled

    for job in tqdm(jobs, desc="predict", unit="pair"):
        base = f"{stems[job.image.resolve()]}__{job.index}"
        result = predict_tiled(predictor, job.image, job.query, args.output_dir / f"{base}_mask.tif",
                               batch_size=args.tile_batch)
        write_tiled_outputs(result, args.output_dir, base)
        summary.write(json.dumps(result.record) + "\n")


def check_args(args: argparse.Namespace) -> None:
    """Option errors that need no file or model, so they fail at once."""
    for name in ("batch_size", "max_new_tokens", "tile_batch", "max_query_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    if args.explain and args.tile:
        raise ValueError("--explain with --tile is not supported: the answer is about the whole scene, which "
                         "tiled inference never sees at once; run --explain without --tile")
    if not args.tile and (args.tile_size is not None or args.overlap is not None):
        raise ValueError("--tile_size/--overlap only apply with --tile; add --tile")
    check_device(args.device)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .predictor import Predictor

    check_args(args)
    jobs = build_jobs(args)
    task = args.task or default_task(args.model_path)
    if args.explain and task != "reasoning":
        raise ValueError(f"--explain needs the reasoning prompt, but the task is {task!r}; use --task reasoning "
                         f"with a reasoning checkpoint or drop --explain")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stems = output_stems(jobs)
    logger.info("%d (image, query) pairs over %d images -> %s", len(jobs), len(stems), args.output_dir)

    predictor = Predictor(args.model_path, mask_config=args.mask_config, device=args.device, dtype=args.dtype,
                          task=task, image_size=args.image_size, bands=args.bands, threshold=args.threshold,
                          simplify=args.simplify, max_query_tokens=args.max_query_tokens, tile=args.tile,
                          tile_size=args.tile_size, overlap=args.overlap)
    if not args.tile:
        # the CLI's own process: keep freed memory in the heap (full size at 1024²: ~10 % faster per image).
        # Not for --tile, whose point is bounded memory: there it raised the peak RSS above the fixed cost from
        # +74 to +157 MiB at 4,000² and from +182 to +323 MiB at 12,000² (tools/measure_tiled_memory.py)
        tune_cpu_allocator_for(predictor.device, "predict")
    for job in jobs:  # every query's length, before any image is run
        predictor.check_query_length(job.query, f"query for {job.image}")
    if args.tile:
        with open(args.output_dir / "predictions.jsonl", "w", encoding="utf-8") as summary:
            run_tiled(args, predictor, jobs, stems, summary)
        logger.info("wrote %d tiled predictions to %s", len(jobs), args.output_dir)
        return 0
    cache: dict[Path, LoadedImage] = {}
    with open(args.output_dir / "predictions.jsonl", "w", encoding="utf-8") as summary, \
            tqdm(total=len(jobs), desc="predict", unit="pair") as progress:
        for first in range(0, len(jobs), args.batch_size):
            chunk = jobs[first:first + args.batch_size]
            keys = [job.image.resolve() for job in chunk]
            cache = {k: v for k, v in cache.items() if k in keys}  # keep only images still in use
            for key, job in zip(keys, chunk):
                if key not in cache:
                    cache[key] = load_image(job.image, args.bands)
            predictions = predictor.predict_batch([cache[k] for k in keys], [job.query for job in chunk],
                                                  explain=args.explain, max_new_tokens=args.max_new_tokens)
            for key, job, prediction in zip(keys, chunk, predictions):
                write_outputs(prediction, args.output_dir, f"{stems[key]}__{job.index}")
                summary.write(json.dumps(prediction.record) + "\n")
            progress.update(len(chunk))
    logger.info("wrote %d predictions to %s", len(jobs), args.output_dir)
    return 0


def main(argv: list[str] | None = None, prog: str = "segearthr1 predict") -> int:
    from ..runtime import setup_logging

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except USER_ERRORS as err:
        logger.error("%s: %s", type(err).__name__, err)
        logger.debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
