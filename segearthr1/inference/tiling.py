"""Tiled inference: scenes of any size, read window by window, with memory bounded by one row of tiles.

Why: letterboxing a 30,000² scene to the model's 1024² input shows it at 1/30 of its resolution and
needs the whole decoded raster in RAM. Here the scene is cut into `size`² tiles (source pixels) that
overlap by `overlap`; each tile is letterboxed at the model's size like a whole image would be, its
logits are mapped back to the tile and blended with its neighbours' by feathered weights (linear
ramps over the overlap, normalised so they sum to 1 everywhere; scene borders keep weight 1). Rows of
the scene are final once the next row of tiles starts below them: they are thresholded, written into
the mask GeoTIFF (`MaskWriter`, cloud-optimised) and polygonised, and the accumulator moves down. So
only one row of tiles (`size` x width float32) and one tile's bands are in memory at a time.

* Reading goes through rasterio windows, so GeoTIFFs (and JPEG/PNG through GDAL, which decodes them
  line by line into its block cache) are never read whole.
* 16-bit and float rasters are stretched like `bands_to_rgb_uint8` does, but with the 2nd/98th
  percentiles of a decimated read of the whole scene (at most `SAMPLE_PIXELS`), so every tile gets the
  same colours; uint8 rasters are used as they are.
* Nodata pixels are written as 255 and are never part of the mask, the areas or the polygons.
* Polygons are built per row of tiles; those touching a seam between rows are merged at the end.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.image_io import bands_to_rgb_uint8, select_rgb_bands, stretch_limits
from ..data.transforms import unletterbox_logits
from ..errors import DatasetCorruptedError
from ..visualization import draw_overlay
from .geo import (MASK_NODATA, GeoInfo, MaskWriter, _rasterio, area_fields, bbox_to_map, mask_to_polygons,
                  simplify_polygons)

logger = logging.getLogger(__name__)

SAMPLE_PIXELS = 1024 * 1024  # decimated read for the stretch limits and the overlay preview
PREVIEW_MAX_SIDE = 2048
PROB_ROWS = 64
TILE_BATCH = 8  # tiles per model batch: the per-call overhead dominates small models on CPU
GDAL_CACHE_BYTES = 64 * 2 ** 20  # GDAL's block cache during tiled runs (default: 5% of the RAM); in bytes


@dataclass(frozen=True)
class TileSpec:
    """Tile size and overlap in source pixels."""

    size: int
    overlap: int

    @classmethod
    def build(cls, size: int, overlap: int | None = None) -> "TileSpec":
        """Validated spec; the default overlap is 1/8 of the tile."""
        size = int(size)
        if size < 16:
            raise ValueError(f"tile_size={size} is too small; use at least 16 source pixels (default: the "
                             f"model's input size)")
        overlap = size // 8 if overlap is None else int(overlap)
        if not 0 <= overlap <= size // 2:
            raise ValueError(f"overlap={overlap} must be between 0 and half the tile size ({size // 2})")
        return cls(size, overlap)

    @property
    def stride(self) -> int:
        return self.size - self.overlap


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every `stride`, the last one flush with the far edge."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def axis_weights(length: int, spec: TileSpec) -> list[tuple[int, int, np.ndarray]]:
    """(start, extent, weight) per tile along one axis; the weights of all tiles sum to 1 at every pixel.

    A tile's raw weight ramps linearly over `overlap` pixels on each side that has a neighbour
    ((i + 0.5) / overlap, capped at 1), so a seam fades in over the overlap instead of jumping.
    """
    starts = tile_starts(length, spec.size, spec.stride)
    raw = []
    for k, start in enumerate(starts):
        extent = min(spec.size, length - start)
        w = np.ones(extent, dtype=np.float64)
        if spec.overlap:
            pos = np.arange(extent) + 0.5
            if k > 0:
                w = np.minimum(w, pos / spec.overlap)
            if k < len(starts) - 1:
                w = np.minimum(w, (extent - pos) / spec.overlap)
        raw.append((start, extent, w))
    total = np.zeros(length, dtype=np.float64)
    for start, extent, w in raw:
        total[start:start + extent] += w
    return [(start, extent, (w / total[start:start + extent]).astype(np.float32)) for start, extent, w in raw]


# ------------------------------------------------------------------------------------------------
# reading

class RasterTiles:
    """Window reads of a raster as RGB uint8 tiles + nodata masks, with scene-wide stretch limits."""

    def __init__(self, path: str | Path, bands: list[int] | None = None):
        rasterio = _rasterio()
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path, self.bands = Path(path), bands
        if not self.path.is_file():
            raise FileNotFoundError(f"image {self.path} does not exist; pass an existing image file")
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            self.src = rasterio.open(self.path)
        except RasterioError as err:
            self._warnings.__exit__(None, None, None)
            raise DatasetCorruptedError(f"cannot read raster {self.path} with rasterio: {err}; the file is damaged "
                                        f"or not a raster image") from err
        src = self.src
        self.info = GeoInfo(crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                            nodata=src.nodata)
        self.dtype = np.dtype(src.dtypes[0])
        sample = self.decimated()
        select_rgb_bands(sample, bands, str(self.path))  # validates `bands` before any tile is run
        self.limits = None
        if self.dtype != np.uint8:
            selected = select_rgb_bands(sample, bands, str(self.path))
            self.limits = [stretch_limits(b, self.info.nodata) or (0.0, 0.0) for b in selected]

    def decimated(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        """[C, h, w] nearest-neighbour read of the whole scene with h*w <= max_pixels (overviews if any)."""
        scale = max(1.0, math.sqrt(self.info.height * self.info.width / max_pixels))
        shape = (self.src.count, max(1, int(self.info.height / scale)), max(1, int(self.info.width / scale)))
        return self._read(out_shape=shape)

    def _read(self, **kwargs) -> np.ndarray:
        from rasterio.errors import RasterioError

        try:
            return self.src.read(**kwargs)
        except RasterioError as err:
            raise DatasetCorruptedError(f"cannot read {self.path} ({kwargs.get('window', 'overview')}): {err}; "
                                        f"the file is damaged") from err

    def nodata_of(self, chw: np.ndarray) -> np.ndarray | None:
        """True where every considered band is nodata (the rule of `read_raster`)."""
        nodata = self.info.nodata
        if nodata is None:
            return None
        selected = chw if self.bands is None else chw[[b - 1 for b in self.bands]]
        return (np.isnan(selected) if np.isnan(nodata) else selected == nodata).all(axis=0)

    def rgb(self, chw: np.ndarray) -> np.ndarray:
        return bands_to_rgb_uint8(chw, bands=self.bands, nodata=self.info.nodata, name=str(self.path),
                                  limits=self.limits)

    def tile(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        from rasterio.windows import Window

        chw = self._read(window=Window(col, row, width, height))
        return self.rgb(chw), self.nodata_of(chw)

    def close(self) -> None:
        self.src.close()
        self._warnings.__exit__(None, None, None)

    def __enter__(self) -> "RasterTiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# the run

@dataclass
class TiledResult:
    """What a tiled run produced: the mask GeoTIFF, the polygons (exact and as output) and the record."""

    mask_path: Path
    polygons: list
    exact_polygons: list
    record: dict
    info: GeoInfo
    georeferenced: bool
    preview: np.ndarray | None = field(default=None, repr=False)  # overlay at <= PREVIEW_MAX_SIDE


class _Accumulator:
    """Sums of weighted logits (+ the nodata mask) for the rows of the current row of tiles."""

    def __init__(self, top: int, rows: int, width: int):
        self.top = top
        self.logits = np.zeros((rows, width), dtype=np.float32)
        self.nodata = np.zeros((rows, width), dtype=bool)

    def shift(self, top: int) -> None:
        """Drop the rows above `top` (finalised) and zero the rows below the ones kept, in place."""
        keep = max(0, self.top + self.logits.shape[0] - top)
        for buffer in (self.logits, self.nodata):
            if keep:
                buffer[:keep] = buffer[buffer.shape[0] - keep:].copy()
            buffer[keep:] = 0
        self.top = top


class _Outputs:
    """Finalised rows -> mask GeoTIFF windows, polygons, area/bbox/probability sums."""

    def __init__(self, writer: MaskWriter, threshold: float, height: int, has_nodata: bool):
        self.writer, self.threshold, self.height, self.has_nodata = writer, threshold, height, has_nodata
        self.area_px = self.nodata_px = self.dropped = 0
        self.prob_sum = 0.0
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.closed: list = []  # polygons (pixel coordinates) away from any seam: final
        self.open: list = []  # touching a seam between two finalised chunks: merged at the end

    def finalise(self, logits: np.ndarray, nodata: np.ndarray, top: int) -> None:
        mask = logits > self.threshold
        if self.has_nodata:
            self.nodata_px += int(nodata.sum())
            self.dropped += int((mask & nodata).sum())
            mask &= ~nodata
        self.writer.write(mask, top, 0, nodata if self.has_nodata else None)
        count = int(mask.sum())
        if not count:
            return
        self.area_px += count
        for r in range(0, mask.shape[0], PROB_ROWS):  # in row blocks: no full-width float copies
            values = torch.from_numpy(logits[r:r + PROB_ROWS][mask[r:r + PROB_ROWS]])
            self.prob_sum += float(torch.sigmoid(values.double()).sum())
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        self.rows += [top + int(rows[0]), top + int(rows[-1]) + 1]
        self.cols += [int(cols[0]), int(cols[-1]) + 1]
        from affine import Affine

        bottom = top + mask.shape[0]
        for geom in mask_to_polygons(mask, Affine.translation(0, top)):
            _, ymin, _, ymax = geom.bounds
            seam = (ymin == top and top > 0) or (ymax == bottom and bottom < self.height)
            (self.open if seam else self.closed).append(geom)

    def polygons(self) -> list:
        """All polygons in pixel-edge coordinates, merged across the seams."""
        if not self.open:
            return self.closed
        from shapely.ops import unary_union

        merged = unary_union(self.open)
        parts = list(getattr(merged, "geoms", [merged]))
        return self.closed + [p for p in parts if not p.is_empty]

    def bbox(self) -> list[int] | None:
        return None if not self.rows else [min(self.cols), min(self.rows), max(self.cols), max(self.rows)]


def predict_tiled(predictor, image: str | Path, query: str, mask_path: str | Path, batch_size: int = TILE_BATCH,
                  preview: bool = True, progress: bool = True) -> TiledResult:
    """Run `predictor` tile by tile over the raster `image` (see the module docstring).

    Writes the cloud-optimised mask GeoTIFF to `mask_path`; returns polygons (in the CRS when the
    raster is georeferenced, else pixel-edge coordinates), the JSON record and an overlay preview.
    """
    rasterio = _rasterio()
    from tqdm import tqdm

    spec = predictor.tile
    if spec is None:
        raise ValueError("predict_tiled needs a predictor built with tile=True")
    text = predictor.checked_query(query)
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), RasterTiles(image, predictor.bands) as source:
        info = source.info
        rows_plan, cols_plan = axis_weights(info.height, spec), axis_weights(info.width, spec)
        num_tiles = len(rows_plan) * len(cols_plan)
        logger.info("%s: %dx%d px in %d tiles of %d² (overlap %d, %d rows x %d columns)", image, info.width,
                    info.height, num_tiles, spec.size, spec.overlap, len(rows_plan), len(cols_plan))
        writer = MaskWriter(mask_path, info)
        outputs = _Outputs(writer, predictor.threshold, info.height, info.nodata is not None)
        model_s = 0.0
        try:
            acc = _Accumulator(0, rows_plan[0][1], info.width)
            bar = tqdm(total=num_tiles, desc="tiles", unit="tile", disable=not progress, leave=False)
            for i, (top, rows, wy) in enumerate(rows_plan):
                if i:
                    acc.shift(top)  # every row of tiles has the same height
                model_s += _predict_row(predictor, source, text, acc, top, rows, wy, cols_plan, batch_size, bar)
                done = rows_plan[i + 1][0] if i + 1 < len(rows_plan) else top + rows
                outputs.finalise(acc.logits[:done - top], acc.nodata[:done - top], top)
            bar.close()
        except BaseException:
            writer.abort()
            raise
        writer.close()
        preview_rgb = _preview(source, Path(mask_path), text) if preview else None
    return _result(predictor, image, text, spec, num_tiles, info, source.limits, outputs, Path(mask_path),
                   preview_rgb, {"model_s": model_s, "total_s": time.perf_counter() - start})


def _predict_row(predictor, source: RasterTiles, text: str, acc: _Accumulator, top: int, rows: int,
                 wy: np.ndarray, cols_plan: list, batch_size: int, bar) -> float:
    """Add the weighted logits of one row of tiles to `acc`; returns the seconds spent in the model."""
    model_s = 0.0
    for first in range(0, len(cols_plan), batch_size):
        chunk = cols_plan[first:first + batch_size]
        read = [source.tile(top, left, rows, cols) for left, cols, _ in chunk]
        start = time.perf_counter()
        batch, _, geometries = predictor.encode([rgb for rgb, _ in read], [text] * len(read))
        logits = predictor.letterboxed_logits(batch, f"{source.path} tiles at row {top}")
        model_s += time.perf_counter() - start
        for (left, cols, wx), (_, nodata), geometry, tile_logits in zip(chunk, read, geometries, logits):
            back = unletterbox_logits(tile_logits, geometry).numpy()
            acc.logits[:, left:left + cols] += back * wy[:, None] * wx[None, :]
            if nodata is not None:
                acc.nodata[:, left:left + cols] = nodata
        bar.update(len(chunk))
    return model_s


def _result(predictor, image, text, spec, num_tiles, info: GeoInfo, limits, outputs: _Outputs, mask_path: Path,
            preview_rgb, timings: dict) -> TiledResult:
    from shapely.affinity import affine_transform

    georeferenced = info.is_georeferenced
    exact = outputs.polygons()
    if georeferenced:
        t = info.transform
        exact = [affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]) for g in exact]
    polygons = simplify_polygons(exact, predictor.simplify)
    bbox = outputs.bbox()
    record: dict = {
        "image": str(image), "query": text, "task": predictor.task, "model": predictor.model_name,
        "image_size": {"height": info.height, "width": info.width}, "letterbox": None,
        "tiling": {"tile_size": spec.size, "overlap": spec.overlap, "num_tiles": num_tiles,
                   "stretch": "uint8, used as is" if limits is None else
                   {"limits": [list(lim) for lim in limits], "from": "2nd/98th percentiles of a decimated read"}},
        "bands": predictor.bands, "threshold": predictor.threshold, "mask_area_px": outputs.area_px,
        "mean_probability": outputs.prob_sum / outputs.area_px if outputs.area_px else None,
        "bbox_px": bbox, "num_polygons": len(polygons), "simplify": predictor.simplify,
        "device": str(predictor.device), "dtype": str(predictor.dtype).replace("torch.", ""),
    }
    if georeferenced:
        record.update(info.to_record())
        record["bbox_map"] = None if bbox is None else bbox_to_map(bbox, info.transform)
        record.update(area_fields(outputs.area_px, exact, info))
    else:
        record.update({"crs": None, "transform": None, "mask_area_m2": None, "area_method": None, "bbox_map": None,
                       "crs_note": "image has no CRS or geotransform; areas are in pixels, bbox and polygons in "
                                   "pixel coordinates (x = column, y = row)"})
    if info.nodata is not None:
        record["nodata_px"] = outputs.nodata_px
        record["mask_px_dropped_on_nodata"] = outputs.dropped
    record["timings_s"] = {k: round(v, 6) for k, v in timings.items()}
    return TiledResult(mask_path, polygons, exact, record, info, georeferenced, preview_rgb)


def _preview(source: RasterTiles, mask_path: Path, caption: str) -> np.ndarray:
    """Overlay of the mask on a decimated read of the scene (longest side <= PREVIEW_MAX_SIDE)."""
    rasterio = _rasterio()
    scale = max(1.0, max(source.info.height, source.info.width) / PREVIEW_MAX_SIDE)
    shape = (max(1, int(source.info.height / scale)), max(1, int(source.info.width / scale)))
    rgb = source.rgb(source._read(out_shape=(source.src.count, *shape)))
    with rasterio.open(mask_path) as ds:
        mask = ds.read(1, out_shape=shape) == 1
    return draw_overlay(rgb, mask, caption=caption)


def predict_tiled_prediction(predictor, image, query: str):
    """`Predictor(tile=True).predict`: a tiled run whose mask is read back into a `Prediction`.

    The [H,W] mask is held in memory (the caller asked for it); `probability` is None (a float map of
    the whole scene is what tiling avoids) and `image` is the overlay preview's scene, not full size.
    """
    from .predictor import Prediction

    if not isinstance(image, (str, Path)):
        raise ValueError("tile=True reads the image window by window from a file; pass a path, not an array")
    rasterio = _rasterio()
    with tempfile.TemporaryDirectory(prefix="segearthr1-tiles-") as tmp:
        result = predict_tiled(predictor, image, query, Path(tmp) / "mask.tif", preview=False)
        with rasterio.open(result.mask_path) as ds:
            values = ds.read(1)
    info = result.info
    if info.nodata is not None:
        info.nodata_mask = values == MASK_NODATA
    return Prediction(mask=values == 1, probability=None, polygons=result.polygons, answer=None,
                      geo=info if result.georeferenced else None, record=result.record, letterbox=None)
