"""Peak memory of `segearthr1 predict --tile` against scene size (the README's table).

Builds the tests' tiny random checkpoint (tests/model_utils.py), writes generated 3-band uint8
GeoTIFFs of the given sizes window by window (tiled, deflate), and runs `segearthr1 predict --tile`
on each in a fresh child process whose peak RSS is read with resource.getrusage(RUSAGE_CHILDREN).

    python tools/measure_tiled_memory.py --sizes 4000 12000 24000 --work /tmp/tiled-mem
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHILD = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def write_scene(path: Path, size: int, block: int = 1024) -> Path:
    """A size² 3-band uint8 UTM GeoTIFF (smooth fields + texture), written one block row at a time."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if path.is_file():
        return path
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.5, 0, 400000, 0, -0.5, 5600000), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", BIGTIFF="IF_SAFER")
    rng = np.random.default_rng(0)
    xs = np.arange(size, dtype=np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, block):
            rows = min(block, size - top)
            yy = (top + np.arange(rows, dtype=np.float32))[:, None]
            base = 128 + 90 * np.sin(xs[None] / 700.0) * np.cos(yy / 900.0)
            data = np.stack([base + 30 * np.sin((xs[None] + k * 300) / 97.0) + rng.normal(0, 8, (rows, size))
                             for k in range(3)])
            dst.write(np.clip(data, 0, 255).astype(np.uint8), window=Window(0, top, size, rows))
    return path


def build_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from model_utils import tiny_model, trained_tokenizer

    from segearthr1.weights.pretrained import save_pretrained

    if not (folder / "config.json").is_file():
        save_pretrained(tiny_model(seed=0).eval(), trained_tokenizer(), folder)
    return folder


def measure(ckpt: Path, scene: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "segearthr1.cli", "predict", "--model_path", str(ckpt), "--image", str(scene),
           "--query", "which area could people gather in after a flood near the river", "--output_dir", str(out),
           "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *cmd], env=env, capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB")), None)
    if line is None or line.split()[2] != "0":
        raise SystemExit(f"predict failed on {scene}:\n{proc.stderr[-3000:]}")
    return {"peak_rss_mib": int(line.split()[1]) / 1024, "wall_s": time.perf_counter() - start}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 12000, 24000],
                   help="square scene sides in pixels, each run with --tile")
    p.add_argument("--work", type=Path, default=Path("/tmp/segearthr1-tiled-memory"),
                   help="scratch folder for the generated GeoTIFFs, the tiny checkpoint and the outputs")
    p.add_argument("--tile_size", type=int, default=1024, help="predict's --tile_size")
    p.add_argument("--overlap", type=int, default=128, help="predict's --overlap")
    p.add_argument("--whole", type=int, nargs="*", default=[4000],
                   help="sizes also run without --tile (whole scene letterboxed), for comparison")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(args.work / "tiny-ckpt")
    rows = []
    for size in args.sizes:
        scene = write_scene(args.work / f"scene_{size}.tif", size)
        tiled = measure(ckpt, scene, args.work / f"out_{size}",
                        ["--tile", "--tile_size", str(args.tile_size), "--overlap", str(args.overlap)])
        row = {"size": size, "decoded_mib": size * size * 3 / 2 ** 20, "mask_mib": size * size / 2 ** 20,
               "tiled": tiled}
        if size in args.whole:
            row["whole"] = measure(ckpt, scene, args.work / f"out_whole_{size}", [])
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
