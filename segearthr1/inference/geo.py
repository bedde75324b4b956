"""Georeferencing of inference outputs: mask GeoTIFFs, GeoJSON polygons, areas and bounding boxes.

Conventions (shared by `Predictor`, the CLI and the JSON records):
* Pixel coordinates are pixel *edges*: pixel (row r, col c) covers x in [c, c+1], y in [r, r+1]. A
  pixel bounding box is [x_min, y_min, x_max, y_max] with the max edges exclusive of the next pixel.
* Map coordinates are the affine transform applied to those edges (rasterio's convention).
* The mask GeoTIFF is uint8, 1 = mask, 0 = background; when the input raster has a nodata value,
  pixels where every band of the input is nodata are written as `MASK_NODATA` (255) and the file's
  nodata tag is set to it. Without a nodata value in the input, the mask has no nodata tag.
* Nodata pixels are never part of the answer: the predictor drops them from the mask before the
  areas, bounding boxes and polygons are computed, so the mask GeoTIFF's 1-pixels, the record and the
  GeoJSON agree.
* Polygons come from `rasterio.features.shapes` (4-connectivity, holes kept), so unsimplified they
  cover exactly the mask pixels; `simplify` (CRS units) uses shapely's topology-preserving simplify.
* Areas in m²: projected CRSs multiply the pixel count by the pixel area and the linear unit factor²
  ("planar"); geographic CRSs (e.g. EPSG:4326) take the geodesic area of the polygons on the CRS's
  ellipsoid with pyproj, edges densified to one vertex per pixel so each edge follows its pixels
  ("geodesic"). The record's `area_method` says which.
* The mask GeoTIFF is cloud-optimised: 512² deflate-compressed tiles and internal overviews.
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
COG_BLOCK = 512  # tile size of the mask GeoTIFFs (the COG driver's default)
PLANAR, GEODESIC = "planar", "geodesic"
_INSTALL_HINT = "pip install rasterio shapely (both are install requirements of segearthr1)"


def _rasterio():
    try:
        import rasterio
        import rasterio.features  # noqa: F401  (submodule used by mask_to_polygons)
    except ImportError as err:
        raise DependencyNotFoundError(what=f"GeoTIFF input/output needs rasterio ({err})", hint=_INSTALL_HINT) from err
    return rasterio


def _shapely():
    try:
        import shapely
        import shapely.geometry  # noqa: F401
    except ImportError as err:
        raise DependencyNotFoundError(what=f"polygon output needs shapely ({err})", hint=_INSTALL_HINT) from err
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
        """Factor from CRS linear units to metres; None when not a projected CRS (see `area_m2`)."""
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
    geoms = [shapely.geometry.shape(geojson)
             for geojson, _ in shapes(binary.astype(np.uint8), mask=binary, connectivity=4, transform=transform)]
    return simplify_polygons(geoms, simplify)


def simplify_polygons(polygons: list, tolerance: float | None) -> list:
    """Topology-preserving simplification (None/0: unchanged); polygons that vanish are dropped."""
    if not tolerance:
        return list(polygons)
    simplified = (geom.simplify(tolerance, preserve_topology=True) for geom in polygons)
    return [geom for geom in simplified if not geom.is_empty]


def geodesic_area_m2(polygons: list, info: GeoInfo) -> float:
    """Area in m² of polygons in a geographic CRS, on that CRS's ellipsoid (pyproj.Geod).

    Edges are densified to one vertex per pixel first: a long straight pixel edge is a parallel of
    latitude, which a single geodesic segment between its end points would not follow.
    """
    shapely = _shapely()
    try:
        from pyproj import CRS as ProjCRS
    except ImportError as err:
        raise DependencyNotFoundError(what=f"geodesic areas need pyproj ({err})", hint="pip install pyproj") from err
    geod = ProjCRS.from_wkt(info.crs.to_wkt()).get_geod()
    t = info.transform
    step = min(v for v in (abs(t.a), abs(t.b), abs(t.d), abs(t.e)) if v > 0)
    total = 0.0
    for geom in polygons:
        area, _ = geod.geometry_area_perimeter(shapely.segmentize(geom, step))
        total += abs(area)
    return total


def area_fields(area_px: int, polygons: list, info: GeoInfo) -> dict:
    """The record's area keys for a georeferenced mask: squared CRS units, m² and how m² was computed."""
    fields: dict = {"pixel_area_crs_units": info.pixel_area, "mask_area_crs_units": area_px * info.pixel_area}
    factor = info.metres_per_unit()
    if factor is not None:
        fields.update(mask_area_m2=area_px * info.pixel_area * factor ** 2, area_method=PLANAR)
    elif info.crs is not None and info.crs.is_geographic:
        fields.update(mask_area_m2=geodesic_area_m2(polygons, info), area_method=GEODESIC)
    else:
        fields.update(mask_area_m2=None, area_method=None)
        fields["crs_note"] = ("image has a geotransform but no CRS; map coordinates are in an unnamed CRS and "
                              "the area in m² is not computed") if info.crs is None else (
            f"CRS {info.crs_string} is neither projected nor geographic; the area in m² is not computed "
            f"(reproject to a projected CRS, e.g. UTM, for metric areas)")
    return fields


class MaskWriter:
    """Writes a uint8 mask (1/0, 255 on nodata) window by window, finishing as a cloud-optimised GeoTIFF.

    Windows go into a tiled, deflate-compressed GTiff beside the target; `close()` copies it with
    GDAL's COG driver (internal overviews, nearest resampling so overviews stay 0/1/255) and removes
    it. Neither step holds the whole mask in memory, so scenes of any size can be written.
    """

    def __init__(self, path: str | Path, info: GeoInfo):
        rasterio = _rasterio()
        self.path = Path(path)
        self.info = info
        self.nodata = MASK_NODATA if info.nodata is not None else None
        self._partial = self.path.with_name(self.path.name + ".partial.tif")
        profile = dict(driver="GTiff", height=info.height, width=info.width, count=1, dtype="uint8",
                       crs=info.crs, transform=info.transform, nodata=self.nodata, compress="deflate",
                       tiled=True, blockxsize=COG_BLOCK, blockysize=COG_BLOCK, BIGTIFF="IF_SAFER")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._dst = rasterio.open(self._partial, "w", **profile)

    def write(self, mask: np.ndarray, row_off: int, col_off: int, nodata_mask: np.ndarray | None = None) -> None:
        """Write the [h,w] bool `mask` at (row_off, col_off); `nodata_mask` pixels become 255."""
        from rasterio.windows import Window

        data = mask.astype(np.uint8)
        if nodata_mask is not None and self.nodata is not None:
            data[nodata_mask] = MASK_NODATA
        self._dst.write(data, 1, window=Window(col_off, row_off, data.shape[1], data.shape[0]))

    def close(self) -> Path:
        import rasterio.shutil

        self._dst.close()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", _rasterio().errors.NotGeoreferencedWarning)
                rasterio.shutil.copy(self._partial, self.path, driver="COG", compress="DEFLATE",
                                     blocksize=COG_BLOCK, overview_resampling="NEAREST", BIGTIFF="IF_SAFER")
        finally:
            self._partial.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._dst.close()
        self._partial.unlink(missing_ok=True)


def write_mask_geotiff(path: str | Path, mask: np.ndarray, info: GeoInfo) -> Path:
    """Cloud-optimised uint8 GeoTIFF of `mask` (1/0) with the input's CRS, transform and (as 255) nodata."""
    if mask.shape != (info.height, info.width):
        raise ValueError(f"mask shape {mask.shape} does not match the raster's {(info.height, info.width)}")
    writer = MaskWriter(path, info)
    try:
        writer.write(mask, 0, 0, info.nodata_mask)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def crs_member(info: GeoInfo) -> dict | None:
    """The (GeoJSON 2008) "crs" member naming the image CRS, e.g. urn:ogc:def:crs:EPSG::32633."""
    if info.crs is None:
        return None
    epsg = info.crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg is not None else info.crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def _features(polygons: list, properties: dict | None, info: GeoInfo | None):
    shapely = _shapely()
    factor = None if info is None else info.metres_per_unit()
    geographic = info is not None and info.crs is not None and info.crs.is_geographic
    for i, geom in enumerate(polygons):
        props = {**(properties or {}), "area": float(geom.area)}
        if factor is not None:
            props["area_m2"] = float(geom.area) * factor ** 2
        elif geographic:
            props["area_m2"] = geodesic_area_m2([geom], info)
        yield {"type": "Feature", "id": i, "properties": props, "geometry": shapely.geometry.mapping(geom)}


def polygons_to_feature_collection(polygons: list, info: GeoInfo | None, properties: dict | None = None) -> dict:
    """FeatureCollection with one Feature per polygon and a "crs" member. Properties: `area` in squared
    CRS units and, for projected and geographic CRSs, `area_m2` (planar / geodesic as in `area_fields`)."""
    collection: dict = {"type": "FeatureCollection", "features": list(_features(polygons, properties, info))}
    member = crs_member(info) if info is not None else None
    if member is not None:
        collection["crs"] = member
    return collection


def write_geojson(path: str | Path, polygons: list, info: GeoInfo | None, properties: dict | None = None) -> Path:
    """The FeatureCollection of `polygons_to_feature_collection`, written one feature at a time (a
    whole-scene mask can have millions of vertices; their Python dicts are never all built at once)."""
    path = Path(path)
    member = crs_member(info) if info is not None else None
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", ')
        if member is not None:
            f.write(f'"crs": {json.dumps(member)}, ')
        f.write('"features": [')
        for i, feature in enumerate(_features(polygons, properties, info)):
            f.write((", " if i else "") + json.dumps(feature))
        f.write("]}")
    return path
