"""Image/mask reading: reference-identical JPEG/PNG, TIFF band and bit-depth conversion, errors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import rasterio

from segearthr1.data import image_io
from segearthr1.data.image_io import read_image_rgb, read_mask
from segearthr1.errors import DatasetCorruptedError, DatasetNotFoundError

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _write_tiff(path, chw: np.ndarray, nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=chw.shape[2], height=chw.shape[1], count=chw.shape[0],
                       dtype=chw.dtype, nodata=nodata) as dst:
        dst.write(chw)
    return path


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_jpeg_png_read_like_reference(tmp_path, rgb, ext):
    path = tmp_path / f"a{ext}"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    out = read_image_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (9, 13, 3)
    assert np.array_equal(out, expected)
    if ext != ".jpg":
        assert np.array_equal(out, rgb)


def test_grey_png_becomes_three_channels(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_image_rgb(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))


def test_rgb_tiff_keeps_channel_order(tmp_path, rgb):
    path = _write_tiff(tmp_path / "a.tif", rgb.transpose(2, 0, 1).copy())
    assert np.array_equal(read_image_rgb(path), rgb)
    cv2.imwrite(str(tmp_path / "b.tif"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # as OpenCV writes them
    assert np.array_equal(read_image_rgb(tmp_path / "b.tif"), rgb)


def test_single_band_tiff_is_replicated(tmp_path):
    band = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)
    out = read_image_rgb(_write_tiff(tmp_path / "s.tif", band))
    assert out.shape == (4, 5, 3) and all(np.array_equal(out[..., c], band[0]) for c in range(3))


def test_16bit_percentile_stretch(tmp_path):
    """Values 0..99: p2 = 1.98, p98 = 97.02 -> 0 at the bottom, 255 at the top, 50 -> round(128.84)."""
    band = (np.arange(100, dtype=np.uint16) * 300).reshape(1, 10, 10)  # scale must not matter
    out = read_image_rgb(_write_tiff(tmp_path / "u16.tif", band))[..., 0]
    assert out.dtype == np.uint8
    assert out.flat[0] == 0 and out.flat[1] == 0 and out.flat[99] == 255 and out.flat[98] == 255
    assert out.flat[50] == 129
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_float_and_nodata_and_constant_bands(tmp_path):
    data = np.stack([
        np.linspace(-1.0, 1.0, 100, dtype=np.float32).reshape(10, 10),
        np.full((10, 10), 7.0, np.float32),                 # constant band -> 0
        np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10),
    ])
    data[:, 0, 0] = -9999.0                                  # nodata pixel: excluded, written as 0
    out = read_image_rgb(_write_tiff(tmp_path / "f.tif", data, nodata=-9999.0))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[..., 1].max() == 0
    assert out[9, 9, 0] == 255 and out[0, 1, 0] == 0


def test_four_band_tiff_and_band_selection(tmp_path):
    chw = np.stack([np.full((3, 4), v, np.uint8) for v in (10, 20, 30, 40)])
    path = _write_tiff(tmp_path / "four.tif", chw)
    assert read_image_rgb(path)[0, 0].tolist() == [10, 20, 30]
    assert read_image_rgb(path, bands=[4, 3, 2])[0, 0].tolist() == [40, 30, 20]
    assert read_image_rgb(path, bands=[4])[0, 0].tolist() == [40, 40, 40]
    with pytest.raises(ValueError, match="bands"):
        read_image_rgb(path, bands=[5, 1, 1])
    with pytest.raises(ValueError, match="bands"):
        read_image_rgb(path, bands=[1, 2])


def test_two_band_uses_first_as_grey(tmp_path):
    chw = np.stack([np.full((2, 2), 5, np.uint8), np.full((2, 2), 9, np.uint8)])
    assert read_image_rgb(_write_tiff(tmp_path / "two.tif", chw))[0, 0].tolist() == [5, 5, 5]


def test_tiff_without_rasterio(tmp_path, rgb, monkeypatch):
    monkeypatch.setattr(image_io, "rasterio", None)
    cv2.imwrite(str(tmp_path / "c.tif"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image_rgb(tmp_path / "c.tif"), rgb)
    cv2.imwrite(str(tmp_path / "g16.tif"), (np.arange(100, dtype=np.uint16) * 500).reshape(10, 10))
    out = read_image_rgb(tmp_path / "g16.tif")
    assert out.shape == (10, 10, 3) and out[0, 0, 0] == 0 and out[9, 9, 2] == 255


@pytest.mark.parametrize("name", ["bad.jpg", "bad.png", "bad.tif"])
def test_unreadable_image_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image")
    with pytest.raises(DatasetCorruptedError, match="bad"):
        read_image_rgb(path)


def test_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nope.jpg"):
        read_image_rgb(tmp_path / "nope.jpg")
    with pytest.raises(DatasetNotFoundError, match="nope.png"):
        read_mask(tmp_path / "nope.png")


def test_read_mask_variants(tmp_path):
    m = np.zeros((6, 7), np.uint8)
    m[1:4, 2:5] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    assert np.array_equal(read_mask(tmp_path / "m.png"), m)
    colour = np.zeros((6, 7, 3), np.uint8)
    colour[2, 3] = (0, 0, 200)
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    assert np.array_equal(read_mask(tmp_path / "c.png"), cv2.imread(str(tmp_path / "c.png"), cv2.IMREAD_GRAYSCALE))
    m16 = (m > 0).astype(np.uint16)  # a 16-bit label of 1 must stay 1
    cv2.imwrite(str(tmp_path / "m16.png"), m16)
    assert np.array_equal(read_mask(tmp_path / "m16.png"), m16.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "m.tif"), m)
    assert np.array_equal(read_mask(tmp_path / "m.tif"), m)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DatasetCorruptedError, match="x.png"):
        read_mask(tmp_path / "x.png")
