"""Inference for analysts: Predictor, `segearthr1 predict`, original-resolution masks, GeoTIFF/GeoJSON, --explain."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from shapely.geometry import box, shape
from shapely.ops import unary_union

from model_utils import tiny_model, trained_tokenizer
from segearthr1.data.collate import DataCollator
from segearthr1.data.image_io import read_image_rgb
from segearthr1.data.transforms import LetterboxGeometry, letterbox_image, normalize_image, unletterbox_logits
from segearthr1.errors import DatasetCorruptedError
from segearthr1.inference import predict_cli
from segearthr1.inference.explain import answer_prefix, generate_answers
from segearthr1.inference.predictor import Prediction, Predictor, default_task, load_image
from segearthr1.weights.export import export_reference_release
from segearthr1.weights.pretrained import save_pretrained
from segearthr1.weights.reference_config import write_mask_config_yaml
from segearthr1.processing import encode_query

REPO = Path(__file__).resolve().parents[1]
UTM = CRS.from_epsg(32633)
# non-square pixels and odd offsets, so swapped axes or a dropped term would show
GEO_TRANSFORM = Affine(2.5, 0.0, 377000.5, 0.0, -3.0, 5800123.0)
QUERY = "which area could people gather in after a flood near the river"


# ------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tokenizer):
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def predictor(model, tokenizer):
    return Predictor.from_model(model, tokenizer, task="reasoning", model_name="tiny")


@pytest.fixture(scope="module")
def release(tmp_path_factory, tokenizer):
    """A reference-release directory + mask-config YAML (as in tests/test_checkpoint.py)."""
    torch.manual_seed(1)
    ref = tiny_model(seed=1, description_projector={},
                     pixel_decoder=dict(conv_dim=32, mask_dim=32, num_heads=2, num_encoder_layers=1)).eval()
    root = tmp_path_factory.mktemp("release")
    export_reference_release(ref, tokenizer, root / "release")
    return ref, root / "release", write_mask_config_yaml(ref.config, root / "mask.yaml")


def write_geotiff(path: Path, h: int = 45, w: int = 70, crs=UTM, transform=GEO_TRANSFORM, nodata=0) -> Path:
    """4-band uint16 raster with a nodata corner (all bands 0)."""
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, size=(4, h, w), dtype=np.uint16)
    data[:2, 10:30, 20:50] += 3000  # a bright block in bands 1-2
    data[:, :4, :6] = 0
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=4, dtype="uint16", crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def expected_logits(model, tokenizer, rgb: np.ndarray, query: str, task: str = "reasoning") -> torch.Tensor:
    """The checker's criterion: model.predict on the letterboxed image, mapped back to H x W."""
    canvas, geometry = letterbox_image(rgb, model.config.image_size)
    sample = encode_query(tokenizer, query, task=task)
    sample["images"] = normalize_image(canvas)
    logits = model.predict(**DataCollator(tokenizer.pad_token_id)([sample])).mask_logits
    return unletterbox_logits(logits[0], geometry)


@pytest.fixture
def quiet_cli(monkeypatch):
    """Run the CLI in-process without it replacing the root logger's handlers (keeps caplog working)."""
    monkeypatch.setattr("segearthr1.runtime.setup_logging", lambda *a, **k: None)


# ------------------------------------------------------------------------------------------------
# item 2: letterbox undo, hand-computed

class FakeModel(torch.nn.Module):
    """Returns fixed letterboxed logits, so the predictor's mapping back can be checked by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(image_size=logits.shape[-1])
        self.logits = logits

    def predict(self, images, **unused):
        return SimpleNamespace(mask_logits=self.logits[None].expand(images.shape[0], -1, -1))


def _canvas(size: int, band: np.ndarray, top: int, left: int, pad_value: float = 100.0) -> torch.Tensor:
    canvas = torch.full((size, size), pad_value)
    canvas[top:top + band.shape[0], left:left + band.shape[1]] = torch.tensor(band, dtype=torch.float32)
    return canvas


def _bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel bilinear resize written out (PyTorch align_corners=False rules, sources clamped at 0)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    y0, y1, ly = axis(x.shape[0], out_h)
    x0, x1, lx = axis(x.shape[1], out_w)
    top = x[y0][:, x0] * (1 - lx) + x[y0][:, x1] * lx
    bottom = x[y1][:, x0] * (1 - lx) + x[y1][:, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


@pytest.mark.parametrize("orig_hw, size, band, top, left, expected", [
    # landscape 1x2 in a 6-canvas: band 3x6 at rows 1-3 (padding 1 above, 2 below); the 3x downscale
    # samples band row 1 and columns 1 and 4 exactly: src = (dst + 0.5) * 3 - 0.5
    ((1, 2), 6, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]], 1, 0, [[8, 11]]),
    # portrait 2x1: band 6x3 at columns 1-3; samples rows 1 and 4 of band column 1
    ((2, 1), 6, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15], [16, 17, 18]], 0, 1, [[5], [14]]),
    # signs survive and the padding (100) never leaks in
    ((1, 2), 6, [[0, 0, 0, 0, 0, 0], [0, -3, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0]], 1, 0, [[-3, 2]]),
    # odd 3x1 portrait in a 6-canvas: band 6x2 (columns 2-3); 2x2 block means
    ((3, 1), 6, [[1, 3], [5, 7], [-2, -4], [-6, -8], [0, 1], [2, 3]], 0, 2, [[4], [-5], [1.5]]),
])
def test_unletterbox_hand_computed(tokenizer, orig_hw, size, band, top, left, expected):
    band = np.array(band, dtype=np.float32)
    fake = FakeModel(_canvas(size, band, top, left))
    pred = Predictor.from_model(fake, tokenizer).predict(random_rgb(*orig_hw), "q")
    geometry = LetterboxGeometry.compute(*orig_hw, size)
    assert (geometry.top, geometry.left, geometry.new_h, geometry.new_w) == (top, left, *band.shape)
    np.testing.assert_allclose(pred.probability, torch.sigmoid(torch.tensor(expected, dtype=torch.float64)).numpy(),
                               atol=1e-7)
    np.testing.assert_array_equal(pred.mask, np.array(expected) > 0)
    assert pred.mask.shape == orig_hw and pred.probability.dtype == np.float32


@pytest.mark.parametrize("orig_hw", [(5, 3), (3, 5), (5, 5), (3, 4), (7, 2), (13, 9)])
def test_unletterbox_odd_portrait_landscape(tokenizer, orig_hw):
    size = 10
    geometry = LetterboxGeometry.compute(*orig_hw, size)
    band = np.random.default_rng(1).normal(size=(geometry.new_h, geometry.new_w)).astype(np.float32)
    fake = FakeModel(_canvas(size, band, geometry.top, geometry.left))
    pred = Predictor.from_model(fake, tokenizer, threshold=0.0).predict(random_rgb(*orig_hw), "q")
    expected = _bilinear_reference(band.astype(np.float64), *orig_hw)
    if band.shape == (2 * orig_hw[0], 2 * orig_hw[1]):  # exact 2x: plain 2x2 block means
        blocks = band.reshape(orig_hw[0], 2, orig_hw[1], 2).mean(axis=(1, 3))
        np.testing.assert_allclose(expected, blocks, atol=1e-6)
    np.testing.assert_allclose(pred.probability, 1 / (1 + np.exp(-expected)), atol=1e-6)
    np.testing.assert_array_equal(pred.mask, expected > 0)


# ------------------------------------------------------------------------------------------------
# the checker's criterion on the real (tiny) model

def test_predictor_mask_is_model_prediction_mapped_back(model, tokenizer, predictor):
    rgb = random_rgb(37, 53)
    logits = expected_logits(model, tokenizer, rgb, QUERY)
    pred = predictor.predict(rgb, QUERY)
    assert isinstance(pred, Prediction) and pred.mask.shape == (37, 53) and pred.mask.dtype == np.bool_
    np.testing.assert_array_equal(pred.mask, (logits > 0).numpy())
    assert 0 < pred.mask.sum() < pred.mask.size  # a non-trivial mask, so the comparison means something
    np.testing.assert_allclose(pred.probability, torch.sigmoid(logits).numpy(), atol=1e-6)
    rec = pred.record
    assert rec["mask_area_px"] == int(pred.mask.sum()) and rec["image_size"] == {"height": 37, "width": 53}
    assert rec["mean_probability"] == pytest.approx(float(pred.probability[pred.mask].mean()))
    assert rec["mean_probability"] > 0.5 and rec["crs"] is None and "no CRS" in rec["crs_note"]
    assert rec["mask_area_m2"] is None and rec["task"] == "reasoning"
    assert pred.answer is None and "answer" not in rec
    assert unary_union(pred.polygons).area == pytest.approx(pred.mask.sum())
    assert box(0, 0, 53, 37).contains(unary_union(pred.polygons))
    assert pred.overlay().shape[1:] == (53, 3)
    # referring prompt: another template, still the model's letterboxed prediction mapped back
    referring = Predictor.from_model(model, tokenizer, task="referring").predict(rgb, "the blue circle")
    np.testing.assert_array_equal(referring.mask,
                                  (expected_logits(model, tokenizer, rgb, "the blue circle", "referring") > 0).numpy())


def test_batch_equals_single_and_loaded_checkpoint(ckpt, tokenizer, predictor):
    images = [random_rgb(37, 53, 1), random_rgb(64, 31, 2), random_rgb(20, 20, 3)]
    queries = ["where is the red triangle", QUERY, "the large green square left of the road"]
    batched = predictor.predict_batch(images, queries)
    loaded = Predictor(ckpt, device="cpu", dtype="auto")  # through load_pretrained
    assert loaded.task == "reasoning" and loaded.dtype == torch.float32
    for img, q, b in zip(images, queries, batched):
        single = loaded.predict(img, q)
        np.testing.assert_allclose(b.probability, single.probability, atol=1e-5)
        assert (b.mask != single.mask).sum() <= 2  # only pixels with |logit| ~ 0 may flip
    with pytest.raises(ValueError, match="one query per image"):
        predictor.predict_batch(images, queries[:2])


# ------------------------------------------------------------------------------------------------
# item 4: answer text

def test_explain_generates_with_cache_and_keeps_the_mask(model, tokenizer, predictor):
    rgb = random_rgb(40, 24, 5)
    plain = predictor.predict(rgb, QUERY)
    explained = predictor.predict(rgb, QUERY, explain=True, max_new_tokens=6)
    np.testing.assert_array_equal(plain.mask, explained.mask)
    np.testing.assert_array_equal(plain.probability, explained.probability)
    assert isinstance(explained.answer, str)
    assert 1 <= explained.record["answer_tokens"] <= 6 and explained.record["answer_raw"]

    # greedy with the KV cache == greedy by re-running the whole sequence without a cache
    canvas, _ = letterbox_image(rgb, model.config.image_size)
    sample = encode_query(tokenizer, QUERY, "reasoning")
    visual = model.connector(model.encode_images(normalize_image(canvas)[None])["res5"])
    prefix = answer_prefix(sample["input_ids"])
    cached = generate_answers(model, tokenizer, [prefix], visual, [sample["token_refer_id"]], max_new_tokens=6)[0]
    from segearthr1.modeling.input_merge import merge_multimodal_inputs
    embed = model.get_input_embeddings()
    merged = merge_multimodal_inputs(prefix[None], torch.ones(1, len(prefix), dtype=torch.bool), None, embed, visual,
                                     [sample["token_refer_id"]])
    seq, tokens, logprobs = merged.inputs_embeds, [], []
    with torch.no_grad():
        for _ in range(6):
            scores = model.language_model(inputs_embeds=seq, use_cache=False).logits[0, -1].log_softmax(-1)
            nxt = int(scores.argmax())
            tokens.append(nxt)
            logprobs.append(float(scores[nxt]))
            if nxt == tokenizer.eos_token_id:
                break
            seq = torch.cat([seq, embed(torch.tensor([[nxt]]))], dim=1)
        # the prefix is the predict() prompt's beginning: same hidden states as the full mask prompt
        batch = DataCollator(tokenizer.pad_token_id)([{**sample, "images": normalize_image(canvas)}])
        _, hidden, _ = model._run(batch["input_ids"], batch["attention_mask"], batch["images"],
                                  batch["token_refer_id"], token_answer_id=batch["token_answer_id"])
    first = int(model.get_output_embeddings()(hidden[0, merged.inputs_embeds.shape[1] - 1]).argmax())
    assert first == tokens[0]
    expected_raw = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id],
                                    clean_up_tokenization_spaces=False)
    assert cached.raw == expected_raw and cached.num_tokens == len(tokens)
    np.testing.assert_allclose(cached.logprobs, logprobs, atol=1e-5)
    assert cached.raw == explained.record["answer_raw"]

    # batched (left-padded) generation gives each sample its own answer
    images = [rgb, random_rgb(30, 50, 6)]
    queries = [QUERY, "where is the red triangle"]
    assert len(encode_query(tokenizer, queries[0])["token_refer_id"]) != \
        len(encode_query(tokenizer, queries[1])["token_refer_id"])  # different lengths: left padding is used
    visual = model.connector(model.encode_images(torch.stack([
        normalize_image(letterbox_image(i, model.config.image_size)[0]) for i in images]))["res5"])
    samples = [encode_query(tokenizer, q) for q in queries]
    prefixes = [answer_prefix(s["input_ids"]) for s in samples]
    refers = [s["token_refer_id"] for s in samples]
    batched = generate_answers(model, tokenizer, prefixes, visual, refers, max_new_tokens=6)
    for i in range(2):
        single = generate_answers(model, tokenizer, prefixes[i:i + 1], visual[i:i + 1], refers[i:i + 1],
                                  max_new_tokens=6)[0]
        assert batched[i].raw == single.raw
        np.testing.assert_allclose(batched[i].logprobs, single.logprobs, atol=1e-5)
    assert [p.record["answer_raw"] for p in predictor.predict_batch(images, queries, explain=True,
                                                                    max_new_tokens=6)] == [b.raw for b in batched]

    with pytest.raises(ValueError, match="reasoning"):
        Predictor.from_model(model, tokenizer, task="referring").predict(rgb, "x", explain=True)


# ------------------------------------------------------------------------------------------------
# items 1 + 3: the CLI

def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "segearthr1.cli", "predict", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_geotiff_reference_release(tmp_path, release, tokenizer):
    ref, release_dir, mask_yaml = release
    tif = write_geotiff(tmp_path / "scene.tif")
    out = tmp_path / "out"
    proc = _run_cli("--model_path", str(release_dir), "--mask_config", str(mask_yaml), "--image_size", "64",
                    "--image", str(tif), "--query", QUERY, "--output_dir", str(out), "--bands", "3", "2", "1",
                    "--device", "cpu", "--explain", "--max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rgb = read_image_rgb(tif, bands=[3, 2, 1])  # the data pipeline's reading of the same file
    predicted = (expected_logits(ref, tokenizer, rgb, QUERY) > 0).numpy()
    with rasterio.open(tif) as src:
        nodata = (src.read() == 0).all(axis=0)
    assert 0 < predicted.sum() < predicted.size and predicted[nodata].any()  # the nodata rule is exercised
    expected = predicted & ~nodata  # nodata is never part of the answer, in any of the outputs

    png = cv2.imread(str(out / "scene__0_mask.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
    np.testing.assert_array_equal(png > 0, expected)

    with rasterio.open(tif) as src, rasterio.open(out / "scene__0_mask.tif") as ds:
        assert ds.crs == src.crs == UTM and ds.transform == src.transform == GEO_TRANSFORM
        assert (ds.height, ds.width) == (src.height, src.width) and ds.nodata == 255
        written = ds.read(1)
    assert nodata.sum() == 24 and (written[nodata] == 255).all()
    np.testing.assert_array_equal(written[~nodata], expected[~nodata].astype(np.uint8))

    fc = json.loads((out / "scene__0_mask.geojson").read_text())
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    union = unary_union([shape(f["geometry"]) for f in fc["features"]])
    pixel_area = 2.5 * 3.0
    bounds = box(377000.5, 5800123.0 - 45 * 3.0, 377000.5 + 70 * 2.5, 5800123.0)
    assert bounds.buffer(1e-6).contains(union)
    assert abs(union.area - expected.sum() * pixel_area) <= max(45 * 3.0, 70 * 2.5)
    # the polygons lie where the mask is: every mask pixel centre inside, every background centre outside
    rows, cols = np.nonzero(expected)
    centres = [(377000.5 + (c + 0.5) * 2.5, 5800123.0 - (r + 0.5) * 3.0) for r, c in zip(rows, cols)]
    from shapely import points
    assert union.contains(points(centres)).all()
    rows, cols = np.nonzero(~expected)
    outside = points([(377000.5 + (c + 0.5) * 2.5, 5800123.0 - (r + 0.5) * 3.0) for r, c in zip(rows, cols)])
    assert not union.contains(outside).any()

    rec = json.loads((out / "scene__0.json").read_text())
    assert rec["crs"] == "EPSG:32633" and rec["transform"] == [2.5, 0.0, 377000.5, 0.0, -3.0, 5800123.0]
    assert rec["mask_area_px"] == int(expected.sum())
    assert rec["mask_area_m2"] == pytest.approx(expected.sum() * pixel_area)
    ys, xs = np.nonzero(expected)
    assert rec["bbox_px"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert rec["bbox_map"] == pytest.approx(list(union.bounds))
    assert rec["nodata"] == 0 and rec["bands"] == [3, 2, 1] and "crs_note" not in rec
    assert rec["area_method"] == "planar" and rec["nodata_px"] == 24
    assert rec["mask_px_dropped_on_nodata"] == int(predicted[nodata].sum())
    assert isinstance(rec["answer"], str) and rec["answer_tokens"] >= 1
    assert {"read_s", "model_s", "explain_s", "postprocess_s", "write_s"} <= set(rec["timings_s"])
    assert rec["model"] == str(release_dir) and (out / "scene__0_overlay.png").is_file()
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["query"] == QUERY


def test_cli_png_jpeg_folder_and_queries_file(tmp_path, ckpt, model, tokenizer, quiet_cli, monkeypatch):
    tuned = []  # the CLI's own process keeps freed memory in the heap (runtime.tune_cpu_allocator)
    monkeypatch.setattr(predict_cli, "tune_cpu_allocator_for", lambda device, what: tuned.append((str(device), what)))
    images = tmp_path / "imgs"
    images.mkdir()
    portrait, landscape = random_rgb(41, 23, 7), random_rgb(19, 47, 8)
    cv2.imwrite(str(images / "portrait.png"), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(images / "landscape.jpg"), cv2.cvtColor(landscape, cv2.COLOR_RGB2BGR))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = predict_cli.main(["--model_path", str(ckpt), "--image_dir", str(images), "--query", QUERY,
                           "--output_dir", str(out), "--batch_size", "2", "--device", "cpu"])
    assert rc == 0 and tuned == [("cpu", "predict")]
    for stem, (h, w) in (("portrait", (41, 23)), ("landscape", (19, 47))):
        mask = cv2.imread(str(out / f"{stem}__0_mask.png"), cv2.IMREAD_UNCHANGED)
        rgb = read_image_rgb(next(images.glob(stem + ".*")))
        np.testing.assert_array_equal(mask > 0, (expected_logits(model, tokenizer, rgb, QUERY) > 0).numpy())
        assert mask.shape == (h, w)
        rec = json.loads((out / f"{stem}__0.json").read_text())
        assert rec["crs"] is None and "no CRS" in rec["crs_note"] and "mask_tif" not in rec["outputs"]
        assert not (out / f"{stem}__0_mask.tif").exists() and not (out / f"{stem}__0_mask.geojson").exists()
        overlay = cv2.imread(str(out / f"{stem}__0_overlay.png"))
        assert overlay.shape[0] > h and overlay.shape[1] == w  # caption band on top

    # a queries file: several questions per image, numbered per image; relative paths vs --image_dir
    table = tmp_path / "pairs.csv"
    table.write_text(f"image,query\nportrait.png,{QUERY}\nlandscape.jpg,the blue circle\n"
                     "portrait.png,where is the red triangle\n")
    out2 = tmp_path / "out2"
    rc = predict_cli.main(["--model_path", str(ckpt), "--queries", str(table), "--image_dir", str(images),
                           "--output_dir", str(out2), "--batch_size", "3", "--device", "cpu", "--task", "referring"])
    assert rc == 0
    assert json.loads((out2 / "portrait__1.json").read_text())["query"] == "where is the red triangle"
    assert json.loads((out2 / "landscape__0.json").read_text())["task"] == "referring"
    np.testing.assert_array_equal(cv2.imread(str(out2 / "portrait__0_mask.png"), 0) > 0,
                                  (expected_logits(model, tokenizer, portrait, QUERY, "referring") > 0).numpy())

    # JSONL without an image column: every query on every --image
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"query": "a"}) + "\n\n" + json.dumps({"query": "b"}) + "\n")
    args = predict_cli.build_parser().parse_args(["--model_path", str(ckpt), "--queries", str(jsonl), "--image",
                                                  str(images / "portrait.png"), str(images / "landscape.jpg"),
                                                  "--output_dir", str(out2)])
    jobs = predict_cli.build_jobs(args)
    assert [(j.image.name, j.query, j.index) for j in jobs] == [
        ("portrait.png", "a", 0), ("portrait.png", "b", 1), ("landscape.jpg", "a", 0), ("landscape.jpg", "b", 1)]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_crs_variants(tmp_path, predictor):
    geographic = write_geotiff(tmp_path / "wgs84.tif", h=16, w=21, crs=CRS.from_epsg(4326),
                               transform=Affine(0.001, 0, 10.0, 0, -0.001, 50.0), nodata=None)
    pred = predictor.predict(geographic, QUERY)
    assert pred.geo is not None and pred.record["crs"] == "EPSG:4326"
    # geodesic: the sum over mask pixels of each pixel's own area on the WGS84 ellipsoid
    from pyproj import Geod
    geod = Geod(ellps="WGS84")
    expected_m2 = sum(int(n) * abs(geod.polygon_area_perimeter([10.0, 10.001, 10.001, 10.0],
                                                                 [50.0 - r * 1e-3, 50.0 - r * 1e-3,
                                                                  50.0 - (r + 1) * 1e-3, 50.0 - (r + 1) * 1e-3])[0])
                      for r, n in enumerate(pred.mask.sum(axis=1)))
    assert pred.mask.sum() > 0 and pred.record["area_method"] == "geodesic" and "crs_note" not in pred.record
    assert pred.record["mask_area_m2"] == pytest.approx(expected_m2, rel=1e-7)
    assert 0.9 < pred.record["mask_area_m2"] / (pred.mask.sum() * 111.2e3 * 71.5e3 * 1e-6) < 1.1  # ~111 x 71.5 m px
    assert pred.record["mask_area_crs_units"] == pytest.approx(pred.mask.sum() * 1e-6)
    assert box(10.0, 50.0 - 0.016, 10.021, 50.0).buffer(1e-9).contains(unary_union(pred.polygons))

    bare = tmp_path / "bare.tif"  # a TIFF without any georeferencing
    with rasterio.open(bare, "w", driver="GTiff", height=9, width=11, count=1, dtype="uint8") as dst:
        dst.write(np.arange(99, dtype=np.uint8).reshape(1, 9, 11))
    pred = predictor.predict(bare, QUERY)
    assert pred.geo is None and pred.record["crs"] is None and pred.mask.shape == (9, 11)

    out = tmp_path / "out"
    out.mkdir()
    outputs = predict_cli.write_outputs(pred, out, "bare__0")
    assert set(outputs) == {"mask_png", "overlay_png", "record_json"} and not (out / "bare__0_mask.tif").exists()
    assert json.loads((out / "bare__0.json").read_text())["outputs"] == outputs


# ------------------------------------------------------------------------------------------------
# bad inputs

def test_bad_inputs_give_clear_errors(tmp_path, ckpt, predictor, quiet_cli, caplog):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_image(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DatasetCorruptedError, match="cannot decode"):
        load_image(broken)
    broken_tif = tmp_path / "broken.tif"
    broken_tif.write_bytes(b"II*\x00garbage")
    with pytest.raises(DatasetCorruptedError, match="broken.tif"):
        load_image(broken_tif)
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(random_rgb(8, 8), "   ")
    with pytest.raises(ValueError, match="bands"):
        load_image(write_geotiff(tmp_path / "four.tif", h=8, w=8), bands=[5, 2, 1])
    with pytest.raises(ValueError, match="task"):
        Predictor.from_model(predictor.model, predictor.tokenizer, task="captioning")

    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), random_rgb(8, 8))
    cases = [
        (["--image", str(tmp_path / "nope.jpg"), "--query", "q"], "does not exist"),
        (["--image", str(good), "--query", "  "], "--query is empty"),
        (["--image", str(broken), "--query", "q"], "cannot decode"),
        (["--image_dir", str(tmp_path / "nodir"), "--query", "q"], "not a directory"),
        (["--image", str(good), "--query", "q", "--explain", "--task", "referring"], "--explain needs"),
        (["--image", str(good), "--query", "q", "--batch_size", "0"], "--batch_size"),
        (["--queries", str(tmp_path / "none.csv")], "does not exist"),
    ]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("image,query\nok.png,\n")
    cases.append((["--queries", str(bad_csv)], "bad.csv:2"))
    for extra, message in cases:
        caplog.clear()
        rc = predict_cli.main(["--model_path", str(ckpt), "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                               *extra])
        assert rc == 1, extra
        assert message in caplog.text, (extra, caplog.text)
    with pytest.raises(SystemExit):  # argparse: --query and --queries are exclusive, one is required
        predict_cli.main(["--model_path", str(ckpt), "--output_dir", "o", "--image", str(good)])


# ------------------------------------------------------------------------------------------------
# task default, entry points

def test_default_task_from_run_config(tmp_path):
    ckpt_dir = tmp_path / "run" / "final"
    ckpt_dir.mkdir(parents=True)
    assert default_task(ckpt_dir) == "reasoning"
    (ckpt_dir / "resolved_config.yaml").write_text("data: {dataset: RRSIS-D}\ntrain: {output_dir: out/earthreason}\n")
    assert default_task(ckpt_dir) == "referring"
    (ckpt_dir / "resolved_config.yaml").write_text("data: {dataset: EarthReason}\n")
    assert default_task(ckpt_dir) == "reasoning"
    (ckpt_dir / "resolved_config.yaml").unlink()
    (tmp_path / "run" / "resolved_config.yaml").write_text("data:\n  dataset: refsegrs\n")  # the run folder
    assert default_task(ckpt_dir) == "referring"
    (tmp_path / "run" / "resolved_config.yaml").write_text("inference: {task: reasoning}\ndata: {dataset: RefSegRS}\n")
    assert default_task(ckpt_dir) == "reasoning"


def test_console_entry_points(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "segearthr1.cli", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "predict" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model_path" in proc.stdout
    exe = shutil.which("segearthr1")
    if exe is None:
        pytest.skip("the `segearthr1` console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "predict" in proc.stdout


# ------------------------------------------------------------------------------------------------
# device, query length, non-finite logits, the --tile hint

def test_cuda_request_without_cuda_is_one_line(tmp_path, ckpt, quiet_cli, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), random_rgb(8, 8))
    rc = predict_cli.main(["--model_path", str(ckpt), "--image", str(good), "--query", "q", "--output_dir",
                           str(tmp_path / "o"), "--device", "cuda"])
    assert rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no usable CUDA device" in errors[0] and "\n" not in errors[0]
    with pytest.raises(ValueError, match="--device cpu"):
        Predictor(ckpt, device="cuda:1")


def test_query_token_limit(tmp_path, ckpt, predictor, tokenizer, quiet_cli, caplog):
    limit = predictor.query_token_limit()
    # prompt + visual tokens + a query of exactly `limit` tokens fill the tiny LLM's 512 positions
    assert 0 < limit < 512
    words = " ".join(["flood"] * 600)
    ids = tokenizer.encode(" " + words, add_special_tokens=False)
    fitting = tokenizer.decode(ids[:limit]).strip()
    assert len(tokenizer.encode(" " + fitting, add_special_tokens=False)) <= limit
    predictor.predict(random_rgb(16, 16), fitting)  # the longest query the model takes runs
    # ... and the limit is exact: the merged LLM sequence of that query is 512 - (limit - its tokens) long
    from segearthr1.modeling.input_merge import merge_multimodal_inputs
    model = predictor.model
    batch, _, _ = predictor.encode([random_rgb(16, 16)], [fitting])
    visual = model.connector(model.encode_images(batch["images"])["res5"])
    merged = merge_multimodal_inputs(batch["input_ids"], batch["attention_mask"], None, model.get_input_embeddings(),
                                     visual, batch["token_refer_id"], token_answer_id=batch.get("token_answer_id"),
                                     seg_token_id=model.config.seg_token_id,
                                     keep_seg_token=model.config.keep_seg_token)
    n_fitting = len(tokenizer.encode(" " + fitting, add_special_tokens=False))
    assert merged.inputs_embeds.shape[1] == 512 - (limit - n_fitting)
    with pytest.raises(ValueError, match=f"more than the limit of {limit}"):
        predictor.predict(random_rgb(16, 16), words)
    short = Predictor.from_model(predictor.model, tokenizer, max_query_tokens=3)
    with pytest.raises(ValueError, match="limit of 3"):
        short.predict(random_rgb(16, 16), "where is the large red triangle")
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), random_rgb(8, 8))
    rc = predict_cli.main(["--model_path", str(ckpt), "--image", str(good), "--query", "where is the red triangle",
                           "--output_dir", str(tmp_path / "o"), "--device", "cpu", "--max_query_tokens", "2"])
    assert rc == 1 and "--max_query_tokens" in caplog.text and "more than the limit of 2" in caplog.text


def test_nonfinite_logits_warn_and_large_scene_hint(tokenizer, caplog):
    logits = torch.zeros(8, 8)
    logits[2, 3] = float("nan")
    pred = Predictor.from_model(FakeModel(logits), tokenizer).predict(random_rgb(8, 8), "q")
    assert "non-finite" in caplog.text and "1 non-finite mask logits" in caplog.text
    assert pred.mask.shape == (8, 8)
    caplog.clear()
    Predictor.from_model(FakeModel(torch.ones(8, 8)), tokenizer).predict(random_rgb(40, 20), "q")
    assert "--tile" in caplog.text and "5.0x" in caplog.text
    caplog.clear()
    Predictor.from_model(FakeModel(torch.ones(8, 8)), tokenizer).predict(random_rgb(32, 20), "q")
    assert "--tile" not in caplog.text  # 4x is not more than 4x


@pytest.mark.parametrize("crs, transform", [
    (UTM, GEO_TRANSFORM),
    (CRS.from_epsg(4326), Affine(2e-4, 0.0, 12.5, 0.0, -1.5e-4, 47.25)),
])
def test_outputs_agree_with_nodata(tmp_path, ckpt, model, tokenizer, quiet_cli, crs, transform):
    """Mask GeoTIFF 1-pixels == rasterised GeoJSON polygons == the record's areas and bbox, nodata excluded."""
    from pyproj import Geod
    from rasterio.features import rasterize

    tif = write_geotiff(tmp_path / "scene.tif", h=45, w=70, crs=crs, transform=transform, nodata=0)
    out = tmp_path / "out"
    assert predict_cli.main(["--model_path", str(ckpt), "--image", str(tif), "--query", QUERY, "--output_dir",
                             str(out), "--device", "cpu"]) == 0
    rgb = load_image(tif).rgb
    predicted = (expected_logits(model, tokenizer, rgb, QUERY) > 0).numpy()
    with rasterio.open(tif) as src:
        nodata = (src.read() == 0).all(axis=0)
    assert predicted[nodata].any()
    with rasterio.open(out / "scene__0_mask.tif") as ds:
        written = ds.read(1)
        assert ds.crs == crs and ds.transform == transform and ds.nodata == 255
    np.testing.assert_array_equal(written == 1, predicted & ~nodata)
    np.testing.assert_array_equal(written == 255, nodata)
    fc = json.loads((out / "scene__0_mask.geojson").read_text())
    burnt = rasterize([(shape(f["geometry"]), 1) for f in fc["features"]], out_shape=written.shape,
                      transform=transform)
    np.testing.assert_array_equal(burnt == 1, written == 1)
    np.testing.assert_array_equal(cv2.imread(str(out / "scene__0_mask.png"), 0) > 0, written == 1)
    rec = json.loads((out / "scene__0.json").read_text())
    ones = written == 1
    ys, xs = np.nonzero(ones)
    assert rec["mask_area_px"] == int(ones.sum()) and rec["num_polygons"] == len(fc["features"])
    assert rec["bbox_px"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    if crs.is_projected:
        assert rec["area_method"] == "planar" and rec["mask_area_m2"] == pytest.approx(ones.sum() * 2.5 * 3.0)
    else:
        geod = Geod(ellps="WGS84")
        t = transform
        per_row = [abs(geod.polygon_area_perimeter([t.c, t.c + t.a, t.c + t.a, t.c],
                                                   [t.f + r * t.e, t.f + r * t.e, t.f + (r + 1) * t.e,
                                                    t.f + (r + 1) * t.e])[0]) for r in range(written.shape[0])]
        assert rec["area_method"] == "geodesic"
        assert rec["mask_area_m2"] == pytest.approx(float(np.dot(ones.sum(axis=1), per_row)), rel=1e-7)
