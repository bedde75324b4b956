"""Georeferenced outputs: polygons (holes, areas, bounds), bounding boxes, mask GeoTIFF and GeoJSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from shapely.geometry import box, shape
from shapely.ops import unary_union

from segearthr1.inference.geo import (MASK_NODATA, GeoInfo, area_fields, bbox_to_map, mask_bbox_pixels, mask_to_polygons,
                                      polygons_to_feature_collection, read_raster, write_geojson, write_mask_geotiff)

UTM = CRS.from_epsg(32633)
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)  # 10 m pixels, north-up


def ring_mask(h=20, w=30):
    mask = np.zeros((h, w), dtype=bool)
    mask[3:15, 4:20] = True
    mask[6:10, 8:12] = False  # a hole
    mask[17:19, 25:29] = True  # a second component
    return mask


def test_polygons_keep_holes_and_cover_the_mask_exactly():
    mask = ring_mask()
    polys = mask_to_polygons(mask)
    assert len(polys) == 2
    assert sum(len(p.interiors) for p in polys) == 1
    assert unary_union(polys).area == pytest.approx(mask.sum())
    # pixel-edge coordinates: pixel (r, c) is the square [c, c+1] x [r, r+1]
    assert unary_union(polys).bounds == (4.0, 3.0, 29.0, 19.0)
    assert mask_bbox_pixels(mask) == [4, 3, 29, 19]


def test_polygons_in_map_coordinates_and_simplify():
    mask = ring_mask()
    polys = mask_to_polygons(mask, TRANSFORM)
    union = unary_union(polys)
    assert union.area == pytest.approx(mask.sum() * 100.0)
    image_bounds = box(500000.0, 4600000.0 - 20 * 10, 500000.0 + 30 * 10, 4600000.0)
    assert image_bounds.contains(union)
    assert list(union.bounds) == bbox_to_map(mask_bbox_pixels(mask), TRANSFORM)
    # a staircase diagonal simplifies to fewer vertices, its area stays within one pixel row/column
    diag = np.tri(40, 40, dtype=bool)
    exact = mask_to_polygons(diag, TRANSFORM)[0]
    simple = mask_to_polygons(diag, TRANSFORM, simplify=15.0)[0]
    assert len(simple.exterior.coords) < len(exact.exterior.coords)
    assert abs(simple.area - exact.area) <= 40 * 100.0
    with pytest.raises(ValueError, match="simplify"):
        mask_to_polygons(diag, TRANSFORM, simplify=-1.0)
    assert mask_to_polygons(np.zeros((4, 4), dtype=bool)) == []
    assert mask_bbox_pixels(np.zeros((4, 4), dtype=bool)) is None


def test_bbox_to_map_handles_rotation():
    rotated = Affine(0.0, -2.0, 0.0, 2.0, 0.0, 0.0)  # 90° rotation of 2-unit pixels
    assert bbox_to_map([0, 0, 1, 1], rotated) == pytest.approx([-2.0, 0.0, 0.0, 2.0])


def test_geotiff_round_trip_with_nodata(tmp_path):
    h, w = 12, 17
    data = np.arange(2 * h * w, dtype=np.uint16).reshape(2, h, w)
    data[:, :3, :5] = 0  # nodata corner (both bands)
    data[0, 5, 5] = 0  # nodata in one band only: not a nodata pixel
    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", height=h, width=w, count=2, dtype="uint16", crs=UTM,
                       transform=TRANSFORM, nodata=0) as dst:
        dst.write(data)
    arr, info = read_raster(src)
    assert arr.shape == (2, h, w) and info.crs == UTM and info.transform == TRANSFORM and info.nodata == 0
    assert info.nodata_mask.sum() == 15 and not info.nodata_mask[5, 5]
    assert info.pixel_area == 100.0 and info.metres_per_unit() == 1.0 and info.crs_string == "EPSG:32633"

    mask = np.zeros((h, w), dtype=bool)
    mask[1:8, 2:9] = True
    out = write_mask_geotiff(tmp_path / "mask.tif", mask, info)
    with rasterio.open(out) as ds:
        assert ds.crs == UTM and ds.transform == TRANSFORM and (ds.height, ds.width) == (h, w)
        assert ds.nodata == MASK_NODATA and ds.dtypes == ("uint8",)
        written = ds.read(1)
    expected = mask.astype(np.uint8)
    expected[info.nodata_mask] = MASK_NODATA
    np.testing.assert_array_equal(written, expected)

    # no nodata in the input -> none in the mask
    plain = GeoInfo(crs=UTM, transform=TRANSFORM, width=w, height=h)
    with rasterio.open(write_mask_geotiff(tmp_path / "plain.tif", mask, plain)) as ds:
        assert ds.nodata is None
        np.testing.assert_array_equal(ds.read(1), mask.astype(np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        write_mask_geotiff(tmp_path / "bad.tif", mask[:-1], plain)


def test_geojson_names_the_crs(tmp_path):
    info = GeoInfo(crs=UTM, transform=TRANSFORM, width=30, height=20)
    polys = mask_to_polygons(ring_mask(), TRANSFORM)
    path = write_geojson(tmp_path / "m.geojson", polys, info, {"query": "q"})
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection"
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert [f["properties"]["query"] for f in fc["features"]] == ["q", "q"]
    back = unary_union([shape(f["geometry"]) for f in fc["features"]])
    assert back.area == pytest.approx(ring_mask().sum() * 100.0)
    assert "crs" not in polygons_to_feature_collection(polys, None)


def test_geographic_crs_has_no_metric_factor():
    info = GeoInfo(crs=CRS.from_epsg(4326), transform=Affine(0.001, 0, 10, 0, -0.001, 50), width=4, height=4)
    assert info.is_georeferenced and info.metres_per_unit() is None
    # ... its areas are geodesic, in the record and per GeoJSON feature, and they add up
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :3] = True
    mask[3, 3] = True
    polys = mask_to_polygons(mask, info.transform)
    fields = area_fields(int(mask.sum()), polys, info)
    assert fields["area_method"] == "geodesic" and 7.9e3 < fields["mask_area_m2"] / 7 < 8.1e3  # ~111 m x 71.7 m px
    features = polygons_to_feature_collection(polys, info)["features"]
    assert sum(f["properties"]["area_m2"] for f in features) == pytest.approx(fields["mask_area_m2"], rel=1e-9)
    projected = GeoInfo(crs=UTM, transform=TRANSFORM, width=4, height=4)
    assert area_fields(7, mask_to_polygons(mask, TRANSFORM), projected)["mask_area_m2"] == 700.0
    assert polygons_to_feature_collection(mask_to_polygons(mask, TRANSFORM), projected)["features"][0][
        "properties"]["area_m2"] == 600.0
    assert not GeoInfo(crs=None, transform=Affine.identity(), width=4, height=4).is_georeferenced
