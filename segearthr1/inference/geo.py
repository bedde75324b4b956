"""Georeferencing of inference outputs: mask GeoTIFFs, GeoJSON polygons, areas and bounding boxes.

Conventions (shared by `Predictor`, the CLI and the JSON records):
* Pixel coordinates are pixel *edges*: pixel (row r, col c) covers x in [c, c+1], y in [r, r+1]. A
  pixel bounding box is [x_min, y_min, x_max, y_max] with the max edges exclusive of the next pixel.
* Map coordinates are the affine transform applied to those edges (rasterio's convention).
* The mask GeoTIFF is uint8, 1 = mask, 0 = background; when the input raster has a nodata value,
  pixels where every band of the input is nodata are written as `MASK_NODATA` (255) and the file's
  nodata tag is set to it. Without a nodata value in the input, the mask has no nodata tag.
* Polygons come from `rasterio.features.shapes` (4-connectivity, holes kept), so unsimplified they
  cover exactly the mask pixels; `simplify` (CRS units) uses shapely's topology-preserving simplify.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetCorruptedError, DependencyNotFoundError

logger = logging.getLogger(__name__)

MASK_NODATA = 255
_INSTALL_HINT = "pip install rasterio shapely (both are install requirements of segearthr1)"


def _rasterio():
    try:
        import rasterio
        import rasterio.features  # noqa: F401  (submodule used by mask_to_polygons)
    except ImportError as err:
        raise DependencyNotFoundError(f"GeoTIFF input/output needs rasterio ({err}); {_INSTALL_HINT}") from err
    return rasterio


def _shapely():
    try:
        import shapely
        import shapely.geometry  # noqa: F401
    except ImportError as err:
        raise DependencyNotFoundError(f"polygon output needs shapely ({err}); {_INSTALL_HINT}") from err
    return shapely


@dataclass
class GeoInfo:
    """Georeferencing of an input raster, as read by rasterio.

    crs: a `rasterio.crs.CRS` or None; transform: `affine.Affine` pixel -> map; nodata: the input's
    nodata value or None; nodata_mask: [H,W] bool, True where every considered input band is nodata
    (None when the input has no nodata value).
    """

    crs: Any
    transform: Any
    width: int
    height: int
    nodata: float | None = None
    nodata_mask: np.ndarray | None = None

    @property
    def is_georeferenced(self) -> bool:
        """A CRS, or at least a non-identity geotransform (then coordinates are in an unnamed CRS)."""
        return self.crs is not None or not self.transform.is_identity

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in squared CRS units: |a*e - b*d| of the affine transform."""
        t = self.transform
        return abs(t.a * t.e - t.b * t.d)

    @property
    def crs_string(self) -> str | None:
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()

    def metres_per_unit(self) -> float | None:
        """Factor from CRS linear units to metres; None when not a projected CRS (areas in m² would need
        a geodesic computation, which we do not attempt)."""
        if self.crs is None or not self.crs.is_projected:
            return None
        from rasterio.errors import CRSError

        try:
            return float(self.crs.linear_units_factor[1])
        except CRSError as err:  # a projected CRS without a usable linear unit
            logger.warning("cannot get the linear unit of %s (%s); area in m² left out", self.crs_string, err)
            return None

    def to_record(self) -> dict:
        t = self.transform
        return {"crs": self.crs_string, "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
                "nodata": None if self.nodata is None else _json_number(self.nodata)}


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if np.isfinite(value) else str(value)


def read_raster(path: str | Path, bands: list[int] | None = None) -> tuple[np.ndarray, GeoInfo]:
    """[C,H,W] array of a raster and its GeoInfo. `bands` (1-based) restricts which bands decide the
    nodata mask (all bands of the file otherwise): a pixel is nodata where all of them equal nodata."""
    rasterio = _rasterio()
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read()
                info = GeoInfo(crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                               nodata=src.nodata)
    except RasterioError as err:
        raise DatasetCorruptedError(f"cannot read raster {path} with rasterio: {err}; the file is damaged or "
                                    f"not a raster image") from err
    if info.nodata is not None:
        selected = data if bands is None else data[[b - 1 for b in bands if 1 <= b <= data.shape[0]]]
        is_nodata = np.isnan(selected) if np.isnan(info.nodata) else selected == info.nodata
        info.nodata_mask = is_nodata.all(axis=0)
    return data, info


def mask_bbox_pixels(mask: np.ndarray) -> list[int] | None:
    """[x_min, y_min, x_max, y_max] pixel-edge box of the True pixels, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def bbox_to_map(bbox: list[int], transform) -> list[float]:
    """Map-coordinate [min_x, min_y, max_x, max_y] of a pixel-edge box (all four corners transformed,
    so rotated/flipped transforms give the enclosing box)."""
    x0, y0, x1, y1 = bbox
    t = transform
    corners = ((x0, y0), (x1, y0), (x0, y1), (x1, y1))
    xs = [t.a * x + t.b * y + t.c for x, y in corners]
    ys = [t.d * x + t.e * y + t.f for x, y in corners]
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def mask_to_polygons(mask: np.ndarray, transform=None, simplify: float | None = None) -> list:
    """Shapely polygons (holes kept) of the True pixels, in map coordinates when `transform` is given,
    pixel-edge coordinates otherwise. `simplify`: tolerance in those coordinates' units (None/0: exact)."""
    _rasterio()
    shapely = _shapely()
    from affine import Affine
    from rasterio.features import shapes

    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons expects an [H,W] mask, got shape {mask.shape}")
    if simplify is not None and simplify < 0:
        raise ValueError(f"simplify={simplify} must be >= 0 (a tolerance in CRS units; 0 keeps pixel edges)")
    binary = np.ascontiguousarray(mask, dtype=bool)
    if not binary.any():
        return []
    transform = Affine.identity() if transform is None else transform
    geoms = []
    for geojson, _ in shapes(binary.astype(np.uint8), mask=binary, connectivity=4, transform=transform):
        geom = shapely.geometry.shape(geojson)
        if simplify:
            geom = geom.simplify(simplify, preserve_topology=True)
        if not geom.is_empty:
            geoms.append(geom)
    return geoms


def write_mask_geotiff(path: str | Path, mask: np.ndarray, info: GeoInfo) -> Path:
    """uint8 GeoTIFF of `mask` (1/0) with the input's CRS, transform and (as 255) nodata."""
    rasterio = _rasterio()
    if mask.shape != (info.height, info.width):
        raise ValueError(f"mask shape {mask.shape} does not match the raster's {(info.height, info.width)}")
    data = mask.astype(np.uint8)
    nodata = None
    if info.nodata is not None:
        nodata = MASK_NODATA
        if info.nodata_mask is not None:
            data[info.nodata_mask] = MASK_NODATA
    profile = dict(driver="GTiff", height=info.height, width=info.width, count=1, dtype="uint8",
                   crs=info.crs, transform=info.transform, nodata=nodata, compress="deflate")
    path = Path(path)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def crs_member(info: GeoInfo) -> dict | None:
    """The (GeoJSON 2008) "crs" member naming the image CRS, e.g. urn:ogc:def:crs:EPSG::32633."""
    if info.crs is None:
        return None
    epsg = info.crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg is not None else info.crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def polygons_to_feature_collection(polygons: list, info: GeoInfo | None, properties: dict | None = None) -> dict:
    """FeatureCollection with one Feature per polygon (area in squared CRS units) and a "crs" member."""
    shapely = _shapely()
    features = [{"type": "Feature", "id": i,
                 "properties": {**(properties or {}), "area": float(geom.area)},
                 "geometry": shapely.geometry.mapping(geom)} for i, geom in enumerate(polygons)]
    collection: dict = {"type": "FeatureCollection", "features": features}
    member = crs_member(info) if info is not None else None
    if member is not None:
        collection["crs"] = member
    return collection


def write_geojson(path: str | Path, polygons: list, info: GeoInfo | None, properties: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(polygons_to_feature_collection(polygons, info, properties)), encoding="utf-8")
    return path
