"""Reading images and masks as the model expects them (RGB uint8 HxWx3, mask uint8 HxW).

JPEG/PNG/BMP go through `cv2.imread(IMREAD_COLOR)` + BGR->RGB exactly like the reference, so
benchmark images give identical pixels. TIFF/GeoTIFF is read with rasterio when installed (any band
count and data type; fallback: OpenCV, then Pillow) and converted to 3-channel uint8:

* band choice: `bands` (1-based, GDAL style, 1 or 3 entries) if given; otherwise 1 band -> replicated
  to 3 channels, 2 bands -> band 1 replicated (with a warning), 3+ bands -> bands 1, 2, 3 as R, G, B;
* uint8 data is used as is; any other type (uint16, int16, float, ...) is stretched per band:
  lo/hi = 2nd/98th percentile of the band's finite, non-nodata pixels (min/max when those coincide),
  out = round(clip((x - lo) / (hi - lo), 0, 1) * 255); a constant band becomes 0, as do nodata and
  non-finite pixels.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np

from ..errors import DatasetCorruptedError
from ..runtime import warning_once
from .integrity import check_file_path, check_image_bytes, small_image_message

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
STRETCH_PERCENTILES = (2.0, 98.0)

try:  # optional: GeoTIFFs with many bands / odd data types
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
except ImportError:  # pragma: no cover - exercised only where rasterio is absent
    rasterio = None


def read_image_rgb(path, bands: list[int] | None = None) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (see the module docstring for the rules)."""
    path = check_file_path(path, "image")
    check_image_bytes(path, "image")
    if path.suffix.lower() in TIFF_EXTENSIONS:
        chw, nodata = _read_tiff_bands(path)
    else:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetCorruptedError(what="cannot decode the image with OpenCV", where=path,
                                        hint=f"the file is damaged or not an image (supported: "
                                             f"{', '.join(IMAGE_EXTENSIONS)})")
        chw, nodata = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1), None
    if (small := small_image_message(path, chw.shape[1], chw.shape[2])) is not None:
        warning_once(small)
    return bands_to_rgb_uint8(chw, bands=bands, nodata=nodata, name=str(path))


def bands_to_rgb_uint8(chw: np.ndarray, bands: list[int] | None = None, nodata: float | None = None,
                       name: str = "array", limits: list[tuple[float, float]] | None = None) -> np.ndarray:
    """[C, H, W] array of any numeric type -> HxWx3 uint8 by the band and stretch rules above.

    `limits`: per output channel (lo, hi) to stretch with instead of this array's own percentiles
    (tiled inference stretches every tile of a scene with the scene's limits, see `stretch_limits`).
    """
    selected = select_rgb_bands(chw, bands, name)
    if selected.dtype != np.uint8:
        limits = limits or [None] * 3
        selected = np.stack([_stretch_band(b, nodata, lim) for b, lim in zip(selected, limits)])
    return np.ascontiguousarray(selected.transpose(1, 2, 0))


def select_rgb_bands(chw: np.ndarray, bands: list[int] | None = None, name: str = "array") -> np.ndarray:
    """The [3, H, W] bands shown as R, G, B (band rule of the module docstring), dtype unchanged."""
    if chw.ndim != 3 or chw.shape[0] < 1:
        raise DatasetCorruptedError(what="the raster has the wrong shape", where=name, found=f"shape {chw.shape}",
                                    expected="a [bands, H, W] raster")
    count = chw.shape[0]
    if bands is not None:
        bands = [int(b) for b in bands]
        if len(bands) not in (1, 3) or any(b < 1 or b > count for b in bands):
            raise ValueError(f"bands={bands} is invalid for {name} with {count} band(s); give 1 or 3 "
                             f"1-based band numbers between 1 and {count}")
        selected = chw[[b - 1 for b in bands]]
    elif count >= 3:
        selected = chw[:3]
    else:
        if count == 2:
            warning_once(f"{name} has 2 bands; using band 1 as grey (pass bands=[...] to choose)")
        selected = chw[:1]
    if selected.shape[0] == 1:
        selected = np.repeat(selected, 3, axis=0)
    return selected


def stretch_limits(band: np.ndarray, nodata: float | None) -> tuple[float, float] | None:
    """(lo, hi) of the stretch rule for one band; None when it has no valid pixels or is constant."""
    x = band.astype(np.float64)
    valid = np.isfinite(x)
    if nodata is not None:
        valid &= x != nodata
    if not valid.any():
        return None
    values = x[valid]
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if hi <= lo:
        lo, hi = values.min(), values.max()
    return None if hi <= lo else (float(lo), float(hi))


def _stretch_band(band: np.ndarray, nodata: float | None, limits: tuple[float, float] | None = None) -> np.ndarray:
    x = band.astype(np.float64)
    valid = np.isfinite(x)
    if nodata is not None:
        valid &= x != nodata
    out = np.zeros(x.shape, dtype=np.uint8)
    if limits is None:
        limits = stretch_limits(band, nodata)
    if limits is None or limits[1] <= limits[0] or not valid.any():  # (lo, hi) with hi <= lo: all zero
        return out
    lo, hi = limits
    scaled = np.clip((x[valid] - lo) / (hi - lo), 0.0, 1.0) * 255.0
    out[valid] = np.floor(scaled + 0.5).astype(np.uint8)
    return out


def _read_tiff_bands(path: Path) -> tuple[np.ndarray, float | None]:
    """[C, H, W] array (file's band order, RGB for RGB TIFFs) and the nodata value, if any."""
    if rasterio is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    return src.read(), src.nodata
        except RasterioError as err:
            raise DatasetCorruptedError(what=f"cannot read the TIFF with rasterio: {err}", where=path) from err
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is not None:
        if arr.ndim == 2:
            return arr[None], None
        if arr.shape[2] in (3, 4):  # OpenCV returns BGR(A)
            arr = arr[:, :, [2, 1, 0] + list(range(3, arr.shape[2]))]
        return arr.transpose(2, 0, 1), None
    try:
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, ValueError) as err:
        raise DatasetCorruptedError(what=f"cannot read the TIFF (OpenCV and Pillow failed: {err})", where=path,
                                    hint="`pip install rasterio` reads most GeoTIFFs") from err
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), None


def read_mask(path) -> np.ndarray:
    """Read a label file as HxW uint8 with its stored values (no binarisation here).

    8-bit files are read like the reference (`cv2.IMREAD_GRAYSCALE`); 16-bit/float single-channel
    files keep their values clipped to 0..255 (the reference's 8-bit conversion would turn a
    16-bit label of 1 into 0); multi-channel non-8-bit labels use the per-pixel channel maximum.
    """
    path = check_file_path(path, "mask")
    check_image_bytes(path, "mask")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None and path.suffix.lower() in TIFF_EXTENSIONS:
        arr = _read_tiff_bands(path)[0].transpose(1, 2, 0)
    if arr is None:
        raise DatasetCorruptedError(what="cannot decode the mask", where=path,
                                    hint="the file is damaged or not an image")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint8:
        if arr.ndim == 2:
            return arr
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise DatasetCorruptedError(what="cannot decode the mask as greyscale", where=path)
        return grey
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    return np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).astype(np.uint8)
