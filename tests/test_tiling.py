"""Tiled inference over large scenes: tile plan, feathered blending, windowed COG output, merged polygons."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from shapely.ops import unary_union

from model_utils import tiny_model, trained_tokenizer
from segearthr1.data.transforms import PIXEL_MEAN, PIXEL_STD
from segearthr1.inference import predict_cli
from segearthr1.inference.geo import GeoInfo, area_fields, mask_to_polygons
from segearthr1.inference.predictor import Predictor, load_image
from segearthr1.inference.tiling import TileSpec, axis_weights, predict_tiled, tile_starts

UTM = CRS.from_epsg(32633)
TRANSFORM = Affine(2.0, 0.0, 400000.0, 0.0, -2.0, 5600000.0)
QUERY = "which area could people gather in after a flood near the river"


class PixelModel(torch.nn.Module):
    """Logit = sign x the normalised red channel: a per-pixel function, so any correct tiling must give
    exactly the mask of the whole image, seams and all."""

    def __init__(self, size: int, sign: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(image_size=size)
        self.calls, self.sign = 0, sign

    def predict(self, images, **unused):
        self.calls += 1
        return SimpleNamespace(mask_logits=self.sign * images[:, 0])


@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()


def blob_scene(path, h, w, crs=UTM, transform=TRANSFORM, nodata=0, count=4, dtype="uint16"):
    """Bright discs and a ring (holes) on a noisy background in band 1, a nodata stripe on the left."""
    rng = np.random.default_rng(3)
    hi = 4000 if dtype == "uint16" else 250
    data = rng.integers(1, hi // 4, size=(count, h, w)).astype(dtype)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in ((h * 0.3, w * 0.4, min(h, w) * 0.25), (h * 0.75, w * 0.7, min(h, w) * 0.15)):
        data[0][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = hi
    ring = np.hypot(yy - h * 0.3, xx - w * 0.4)
    data[0][(ring > min(h, w) * 0.08) & (ring < min(h, w) * 0.12)] = 1  # a hole in the big disc
    if nodata is not None:
        data[:, :, : w // 10] = nodata
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=count, dtype=dtype, crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def expected_pixel_mask(path, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixel model's mask on the whole image (the pipeline's RGB), nodata excluded."""
    item = load_image(path)
    mask = sign * (item.rgb[..., 0].astype(np.float32) - PIXEL_MEAN[0]) / PIXEL_STD[0] > 0
    nodata = item.geo.nodata_mask
    return (mask if nodata is None else mask & ~nodata), nodata


# ------------------------------------------------------------------------------------------------

def test_tile_plan_and_weights():
    assert tile_starts(100, 128, 112) == [0]
    assert tile_starts(300, 128, 112) == [0, 112, 172]  # the last tile is flush with the edge
    assert tile_starts(128, 128, 112) == [0]
    for length, size, overlap in ((300, 128, 16), (1000, 256, 64), (257, 128, 0), (90, 128, 16)):
        spec = TileSpec.build(size, overlap)
        total = np.zeros(length)
        for start, extent, w in axis_weights(length, spec):
            assert extent == min(size, length) and (w > 0).all()
            total[start:start + extent] += w
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    _, _, first = axis_weights(300, TileSpec.build(128, 16))[0]
    assert first[0] == pytest.approx(1.0) and first[-1] < first[100]  # ramps down towards its neighbour only
    assert TileSpec.build(64).overlap == 8
    with pytest.raises(ValueError, match="overlap"):
        TileSpec.build(64, 40)
    with pytest.raises(ValueError, match="tile_size"):
        TileSpec.build(8)


def test_tiled_equals_whole_image_function_and_writes_a_cog(tmp_path, tokenizer):
    tif = blob_scene(tmp_path / "scene.tif", 700, 900)
    model = PixelModel(128, sign=-1.0)  # dark pixels, nodata (stretched to 0) included: the rule is exercised
    predictor = Predictor.from_model(model, tokenizer, tile=True, overlap=32)
    result = predict_tiled(predictor, tif, QUERY, tmp_path / "mask.tif", batch_size=4, progress=False)
    expected, nodata = expected_pixel_mask(tif, sign=-1.0)
    assert 0 < expected.sum() < expected.size
    assert len(tile_starts(700, 128, 96)) == 7 and len(tile_starts(900, 128, 96)) == 10
    assert result.record["tiling"]["num_tiles"] == 70 and model.calls == 7 * 3  # batches of 4 per row of 10

    with rasterio.open(result.mask_path) as ds:
        written = ds.read(1)
        assert ds.crs == UTM and ds.transform == TRANSFORM and ds.nodata == 255
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512) and ds.compression.name.lower() == "deflate"
        assert ds.overviews(1) == [2]
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    np.testing.assert_array_equal(written == 1, expected)
    np.testing.assert_array_equal(written == 255, nodata)

    # polygons: rasterised in map coordinates they are the mask; merged across row seams like a whole-image run
    burnt = rasterize([(p, 1) for p in result.polygons], out_shape=expected.shape, transform=TRANSFORM)
    np.testing.assert_array_equal(burnt == 1, expected)
    whole = mask_to_polygons(expected, TRANSFORM)
    assert len(result.polygons) == len(whole) and sum(len(p.interiors) for p in result.polygons) >= 1
    assert unary_union(result.polygons).symmetric_difference(unary_union(whole)).area == pytest.approx(0, abs=1e-6)

    rec = result.record
    ys, xs = np.nonzero(expected)
    assert rec["mask_area_px"] == int(expected.sum()) == int((written == 1).sum())
    assert rec["bbox_px"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert rec["mask_area_m2"] == pytest.approx(expected.sum() * 4.0) and rec["area_method"] == "planar"
    assert rec["nodata_px"] == int(nodata.sum()) and rec["mask_px_dropped_on_nodata"] > 0
    assert rec["tiling"]["stretch"]["limits"] and rec["crs"] == "EPSG:32633"
    assert result.preview.shape[1] == 900 and result.preview.dtype == np.uint8


def test_tiled_geographic_area_and_prediction_api(tmp_path, tokenizer):
    wgs84 = Affine(1e-4, 0.0, 10.0, 0.0, -1e-4, 50.0)
    tif = blob_scene(tmp_path / "wgs.tif", 200, 260, crs=CRS.from_epsg(4326), transform=wgs84, nodata=None,
                     count=3, dtype="uint8")
    predictor = Predictor.from_model(PixelModel(64), tokenizer, tile=True, overlap=16)
    pred = predictor.predict(tif, QUERY)  # Predictor(tile=True): the mask read back into a Prediction
    expected, _ = expected_pixel_mask(tif)
    np.testing.assert_array_equal(pred.mask, expected)
    assert pred.probability is None and pred.record["tiling"]["stretch"] == "uint8, used as is"
    info = GeoInfo(crs=CRS.from_epsg(4326), transform=wgs84, width=260, height=200)
    reference = area_fields(int(expected.sum()), mask_to_polygons(expected, wgs84), info)
    assert pred.record["area_method"] == "geodesic"
    assert pred.record["mask_area_m2"] == pytest.approx(reference["mask_area_m2"], rel=1e-9)
    with pytest.raises(ValueError, match="pass a path"):
        predictor.predict(np.zeros((8, 8, 3), dtype=np.uint8), QUERY)
    with pytest.raises(ValueError, match="explain=True is not supported with tile=True"):
        predictor.predict(tif, QUERY, explain=True)


def test_single_tile_is_the_whole_image_prediction(tmp_path, tokenizer):
    """A scene no larger than one tile: the tiled run is exactly today's letterboxed prediction."""
    model = tiny_model(seed=0).eval()
    tif = blob_scene(tmp_path / "small.tif", 40, 57, count=3, dtype="uint8")
    whole = Predictor.from_model(model, tokenizer).predict(tif, QUERY)
    tiled = Predictor.from_model(model, tokenizer, tile=True, overlap=0).predict(tif, QUERY)
    assert 0 < whole.mask.sum() < whole.mask.size
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    assert tiled.record["mask_area_px"] == whole.record["mask_area_px"]
    assert tiled.record["mask_area_m2"] == pytest.approx(whole.record["mask_area_m2"])


def test_cli_tile_with_tiny_checkpoint(tmp_path, tokenizer, monkeypatch):
    from segearthr1.weights.pretrained import save_pretrained

    monkeypatch.setattr("segearthr1.runtime.setup_logging", lambda *a, **k: None)
    tuned = []  # --tile streams in bounded memory: glibc's allocator is left alone
    monkeypatch.setattr(predict_cli, "tune_cpu_allocator_for", lambda *a: tuned.append(a))
    ckpt = save_pretrained(tiny_model(seed=0).eval(), tokenizer, tmp_path / "ckpt")
    tif = blob_scene(tmp_path / "scene.tif", 150, 200)
    out = tmp_path / "out"
    rc = predict_cli.main(["--model_path", str(ckpt), "--image", str(tif), "--query", QUERY, "--output_dir",
                           str(out), "--device", "cpu", "--tile", "--overlap", "16"])
    assert rc == 0 and tuned == []
    rec = json.loads((out / "scene__0.json").read_text())
    assert rec["tiling"] == {**rec["tiling"], "tile_size": 64, "overlap": 16, "num_tiles": 12}
    with rasterio.open(out / "scene__0_mask.tif") as ds:
        written = ds.read(1)
        assert ds.crs == UTM and ds.transform == TRANSFORM
    assert rec["mask_area_px"] == int((written == 1).sum()) and rec["mask_area_m2"] == pytest.approx(
        rec["mask_area_px"] * 4.0)
    fc = json.loads((out / "scene__0_mask.geojson").read_text())
    assert len(fc["features"]) == rec["num_polygons"]
    assert (out / "scene__0_overlay.png").is_file() and not (out / "scene__0_mask.png").exists()
    assert set(rec["outputs"]) == {"mask_tif", "overlay_png", "record_json", "mask_geojson"}


def test_tiled_png_is_read_through_gdal_windows(tmp_path, tokenizer):
    import cv2

    rgb = np.random.default_rng(5).integers(0, 256, size=(150, 190, 3), dtype=np.uint8)
    png = tmp_path / "photo.png"
    cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    predictor = Predictor.from_model(PixelModel(64), tokenizer, tile=True, overlap=8)
    result = predict_tiled(predictor, png, QUERY, tmp_path / "photo_mask.tif", progress=False)
    expected = (rgb[..., 0].astype(np.float32) - PIXEL_MEAN[0]) / PIXEL_STD[0] > 0
    with rasterio.open(result.mask_path) as ds:
        np.testing.assert_array_equal(ds.read(1) == 1, expected)
        assert ds.crs is None and ds.nodata is None
    assert not result.georeferenced and result.record["crs"] is None and result.record["area_method"] is None
    burnt = rasterize([(p, 1) for p in result.polygons], out_shape=expected.shape, transform=Affine.identity())
    np.testing.assert_array_equal(burnt == 1, expected)  # pixel-edge coordinates
