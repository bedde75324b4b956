"""Predictor: (image, query) -> mask at the image's own resolution, probabilities, polygons, answer.

The model works on a letterboxed S×S canvas (S = `config.image_size`, 1024 for released models).
Masks are mapped back exactly the way the data pipeline recorded the letterbox: the *logits* are
cropped to the resized image band, resized bilinearly (align_corners=False) to the original H×W,
and thresholded (`logits > threshold`, default 0 as in the reference). Probabilities are the
sigmoid of those logits.

Example:
    from segearthr1 import Predictor
    predictor = Predictor("checkpoints/segearthr1-earthreason")
    pred = predictor.predict("scene.tif", "Where could a helicopter land after the flood?", explain=True)
    pred.mask            # [H, W] bool at the GeoTIFF's resolution
    pred.polygons        # shapely polygons in the GeoTIFF's CRS
    pred.answer          # the model's textual answer
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.collate import DataCollator
from ..data.image_io import bands_to_rgb_uint8, read_image_rgb
from ..data.registry import names_for_task
from ..data.transforms import LetterboxGeometry, letterbox_image, normalize_image, unletterbox_logits
from ..runtime import check_finite_logits
from ..processing import (ANSWER_TOKEN_INDEX, IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX, SEG_TOKEN_INDEX,
                          TASK_PROMPTS, encode_query)
from ..visualization import draw_overlay
from .explain import answer_prefix, capture_visual_tokens, generate_answers
from .geo import (GeoInfo, area_fields, bbox_to_map, mask_bbox_pixels, mask_to_polygons, read_raster,
                  simplify_polygons)

logger = logging.getLogger(__name__)

TASKS = tuple(TASK_PROMPTS)  # ("reasoning", "referring")
# Extensions read like the benchmark images (OpenCV, identical pixels); everything else via rasterio.
OPENCV_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
RUN_CONFIG_NAMES = ("resolved_config.yaml", "resolved_config.yml")
DEFAULT_MAX_NEW_TOKENS = 64
TILE_HINT_FACTOR = 4  # warn (suggesting tiled inference) when a scene is shrunk more than this


# ------------------------------------------------------------------------------------------------
# inputs

@dataclass
class LoadedImage:
    """An input image as the model sees it (RGB uint8) plus where it came from."""

    rgb: np.ndarray  # [H, W, 3] uint8
    source: str  # file path, or "<array>"
    geo: GeoInfo | None = None  # rasterio georeferencing (None for OpenCV-read files and arrays)
    read_s: float = 0.0


def load_image(image: str | Path | np.ndarray | LoadedImage, bands: Sequence[int] | None = None) -> LoadedImage:
    """Read a path (JPEG/PNG/BMP with OpenCV like the benchmarks; TIFF/GeoTIFF and other rasters with
    rasterio, keeping their georeferencing) or wrap an array ([H,W,3] uint8 RGB used as is; [H,W] or
    [H,W,C] of any dtype converted by the data pipeline's band/stretch rules)."""
    if isinstance(image, LoadedImage):
        return image
    start = time.perf_counter()
    bands = None if bands is None else [int(b) for b in bands]
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and bands is None:
            rgb = np.ascontiguousarray(image)
        elif image.ndim in (2, 3):
            chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
            rgb = bands_to_rgb_uint8(chw, bands=bands, name="array")
        else:
            raise ValueError(f"image array must be [H,W] or [H,W,C], got shape {image.shape}")
        return LoadedImage(rgb, "<array>", None, time.perf_counter() - start)
    if not isinstance(image, (str, Path)):
        raise ValueError(f"image must be a file path or a numpy array, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        what = "is a directory (use --image_dir for folders)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image {path} {what}; pass an existing image file (JPEG, PNG, TIFF/GeoTIFF)")
    if path.suffix.lower() in OPENCV_EXTENSIONS:
        rgb, geo = read_image_rgb(path, bands=bands), None
    else:
        data, geo = read_raster(path, bands=bands)
        rgb = bands_to_rgb_uint8(data, bands=bands, nodata=geo.nodata, name=str(path))
    return LoadedImage(rgb, str(path), geo, time.perf_counter() - start)


def check_query(query: Any, where: str = "query") -> str:
    """The query stripped; a ValueError for anything but a non-empty string."""
    if not isinstance(query, str):
        raise ValueError(f"{where} must be a string, got {type(query).__name__}: {query!r}")
    text = query.strip()
    if not text:
        raise ValueError(f"{where} is empty; give a question or referring expression, e.g. "
                         f"--query \"Which buildings are flooded?\"")
    return text


def check_device(device: str) -> None:
    """A one-line error for a CUDA device on a machine without CUDA (instead of a deep torch traceback)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but this machine has no usable CUDA device "
                         f"(torch.cuda.is_available() is False); use --device cpu or --device auto")


def default_task(model_path: str | Path) -> str:
    """The prompt template a checkpoint was trained with, as far as its directory tells.

    Looks for the run config the trainer writes (`resolved_config.yaml`) in the checkpoint directory
    and its parent. An explicit `task: reasoning|referring` anywhere in it wins; then `data.dataset`
    (RRSIS-D or RefSegRS -> "referring"); otherwise, if the dataset names the file mentions are all
    referring datasets, the task is "referring". Everything else, reference release directories
    included (their config.json names no dataset), defaults to "reasoning": pass
    `task="referring"` / `--task referring` for RRSIS-D/RefSegRS releases.
    """
    import yaml

    model_path = Path(model_path)
    for folder in (model_path, model_path.parent):
        for name in RUN_CONFIG_NAMES:
            path = folder / name
            if not path.is_file():
                continue
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                logger.warning("cannot parse %s (%s); task defaults to reasoning", path, err)
                return "reasoning"
            task = _task_from_run_config(data)
            logger.info("task %s inferred from %s", task, path)
            return task
    return "reasoning"


def _task_from_run_config(data: Any) -> str:
    strings: list[str] = []
    explicit: list[str] = []

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if key == "task" and node in TASKS:
                explicit.append(node)
            strings.append(node.strip().lower())

    walk(data)
    if explicit:
        return explicit[0]
    dataset = data.get("data", {}).get("dataset") if isinstance(data, dict) and isinstance(data.get("data"), dict) \
        else None
    referring, reasoning = names_for_task("referring"), names_for_task("reasoning")
    if isinstance(dataset, str) and dataset.strip().lower() in referring | reasoning:
        return "referring" if dataset.strip().lower() in referring else "reasoning"
    named = {s for s in strings if s in referring | reasoning}
    return "referring" if named and named <= referring else "reasoning"


# ------------------------------------------------------------------------------------------------
# outputs

@dataclass
class Prediction:
    """One (image, query) result at the image's original resolution.

    mask: [H,W] bool (logits > threshold, nodata pixels never set); probability: [H,W] float32
    sigmoid of the logits (None for tiled predictions, which never hold a whole-scene float map);
    polygons: shapely polygons of the mask (holes kept) in map coordinates when the image is
    georeferenced, else in pixel-edge coordinates (x = column, y = row); answer: generated text with
    `explain=True` (reasoning task), else None; geo: the input's georeferencing or None; record: the
    JSON-ready summary (query, areas, bounding boxes, mean probability, timings, CRS, ...).
    """

    mask: np.ndarray
    probability: np.ndarray | None
    polygons: list
    answer: str | None
    geo: GeoInfo | None
    record: dict
    letterbox: LetterboxGeometry | None  # None for tiled predictions (one letterbox per tile)
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB input, for overlays

    def overlay(self, caption: str | None = None) -> np.ndarray:
        """The input with the mask tinted and outlined; caption defaults to the query (+ answer)."""
        if self.image is None:
            raise ValueError("this Prediction holds no image; overlay needs the RGB input")
        if caption is None:
            caption = self.record["query"] + (f" -> {self.answer}" if self.answer else "")
        return draw_overlay(self.image, self.mask, caption=caption)


class Predictor:
    """Loads a checkpoint once and answers (image, query) pairs; see the module docstring.

    Args:
        model_path: our checkpoint directory or a reference release directory.
        mask_config: the reference mask-config YAML (reference releases only).
        device / dtype: "auto" = CUDA if available, bf16 on CUDA and fp32 on CPU.
        task: "reasoning" or "referring" prompt; None = `default_task(model_path)`.
        image_size: letterbox size override for reference releases (default 1024).
        bands: 1-based band numbers (1 or 3) for multi-band rasters; None = the data pipeline's rule.
        threshold: logit threshold of the mask (0 = probability 0.5, the reference rule).
        simplify: polygon simplification tolerance in CRS units (pixels for plain images); None = exact.
        max_query_tokens: reject longer queries (None = the model's limit, `query_token_limit()`).
        tile: run `predict` tile by tile (tiling.py) for scenes larger than the model's input;
            tile_size (source pixels, None = the model's input size) and overlap set the tiles.
    """

    def __init__(self, model_path: str | Path, mask_config: str | Path | None = None, device: str = "auto",
                 dtype: str = "auto", task: str | None = None, image_size: int | None = None, *,
                 bands: Sequence[int] | None = None, threshold: float = 0.0, simplify: float | None = None,
                 max_query_tokens: int | None = None, tile: bool = False, tile_size: int | None = None,
                 overlap: int | None = None):
        from ..weights.pretrained import load_pretrained

        check_device(device)
        model, tokenizer = load_pretrained(model_path, mask_config=mask_config, device=device, dtype=dtype,
                                           image_size=image_size)
        self._setup(model, tokenizer, task or default_task(model_path), str(model_path), bands, threshold, simplify,
                    max_query_tokens, tile, tile_size, overlap)

    @classmethod
    def from_model(cls, model, tokenizer, task: str = "reasoning", *, model_name: str = "<in-memory>",
                   bands: Sequence[int] | None = None, threshold: float = 0.0, simplify: float | None = None,
                   max_query_tokens: int | None = None, tile: bool = False, tile_size: int | None = None,
                   overlap: int | None = None) -> "Predictor":
        """Wrap an already loaded model (e.g. in a notebook after training)."""
        self = cls.__new__(cls)
        self._setup(model.eval(), tokenizer, task, model_name, bands, threshold, simplify, max_query_tokens, tile,
                    tile_size, overlap)
        return self

    def _setup(self, model, tokenizer, task, model_name, bands, threshold, simplify, max_query_tokens=None,
               tile=False, tile_size=None, overlap=None) -> None:
        from .tiling import TileSpec

        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
        if simplify is not None and simplify < 0:
            raise ValueError(f"simplify={simplify} must be >= 0 (tolerance in CRS units)")
        self.model, self.tokenizer, self.task, self.model_name = model, tokenizer, task, model_name
        self.bands = None if bands is None else [int(b) for b in bands]
        self.threshold, self.simplify = float(threshold), simplify
        self.image_size = int(model.config.image_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._collate = DataCollator(tokenizer.pad_token_id)
        if max_query_tokens is not None and max_query_tokens < 1:
            raise ValueError(f"max_query_tokens={max_query_tokens} must be >= 1")
        limit = self.query_token_limit()
        if max_query_tokens is not None and limit is not None and max_query_tokens > limit:
            logger.warning("max_query_tokens=%d exceeds the model's limit of %d query tokens; using %d",
                           max_query_tokens, limit, limit)
        self.max_query_tokens = min(v for v in (max_query_tokens, limit, math.inf) if v is not None)
        self.tile = TileSpec.build(tile_size or self.image_size, overlap) if tile else None
        logger.info("predictor ready: %s, task %s (%s prompt), %s %s, letterbox %d", model_name, task,
                    TASK_PROMPTS[task].dataset_type, self.device, self.dtype, self.image_size)

    def query_token_limit(self) -> int | None:
        """Most query tokens that fit: the LLM's positions minus the prompt, visual tokens and [SEG]s
        (None for stand-in models without an LLM config)."""
        if not hasattr(self.model.config, "text_config") or not hasattr(self.model, "connector"):
            return None
        probe = "x"
        sample = encode_query(self.tokenizer, probe, task=self.task)
        ids = sample["input_ids"]
        used = int((ids >= 0).sum()) + int((ids == IMAGE_TOKEN_INDEX).sum()) * self.model.connector.num_tokens()
        used += int((ids == REFER_TOKEN_INDEX).sum()) * len(sample["token_refer_id"])
        if "token_answer_id" in sample:
            used += int((ids == ANSWER_TOKEN_INDEX).sum()) * len(sample["token_answer_id"])
        if getattr(self.model.config, "keep_seg_token", False):
            used += int((ids == SEG_TOKEN_INDEX).sum())
        probe_tokens = len(self.tokenizer.encode(" " + probe, add_special_tokens=False))
        return int(self.model.config.text_config.max_position_embeddings) - (used - probe_tokens)

    def check_query_length(self, text: str, where: str = "query") -> None:
        """A ValueError naming the count and the limit for a query the model cannot take whole."""
        count = len(self.tokenizer.encode(" " + text, add_special_tokens=False))
        if count > self.max_query_tokens:
            raise ValueError(f"{where} has {count} tokens, more than the limit of {self.max_query_tokens} "
                             f"(--max_query_tokens; the model's own limit is {self.query_token_limit()}); "
                             f"shorten the question: {text[:60]!r}...")

    # --------------------------------------------------------------------------------------------
    def predict(self, image: str | Path | np.ndarray | LoadedImage, query: str, explain: bool = False,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Prediction:
        """One (image, query) pair; see `predict_batch`."""
        return self.predict_batch([image], [query], explain=explain, max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[str | Path | np.ndarray | LoadedImage], queries: Sequence[str],
                      explain: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[Prediction]:
        """Predictions for pairs (images[i], queries[i]) run as one model batch."""
        if len(images) != len(queries):
            raise ValueError(f"got {len(images)} images and {len(queries)} queries; pass one query per image")
        if not images:
            return []
        if explain and self.task != "reasoning":
            raise ValueError(f"explain=True needs the reasoning prompt (it has the answer slot), but task is "
                             f"{self.task!r}; use task='reasoning' or drop explain")
        if explain and self.tile is not None:
            raise ValueError("explain=True is not supported with tile=True: the answer is about the whole scene, "
                             "which tiled inference never sees at once; use a Predictor without tile")
        texts = [self.checked_query(q, f"query {i}") for i, q in enumerate(queries)]
        if self.tile is not None:
            return [self._predict_tiled(image, text) for image, text in zip(images, texts)]
        loaded = [load_image(img, self.bands) for img in images]
        for item in loaded:
            self._hint_tiling(item)

        start = time.perf_counter()
        batch, samples, geometries = self.encode([item.rgb for item in loaded], texts)
        prep_s = time.perf_counter() - start

        start = time.perf_counter()
        capture = capture_visual_tokens(self.model) if explain else contextlib.nullcontext({})
        with capture as captured:
            logits = self.letterboxed_logits(batch, ", ".join(item.source for item in loaded))
        model_s = time.perf_counter() - start

        answers: list = [None] * len(loaded)
        explain_s = 0.0
        if explain:
            start = time.perf_counter()
            prefixes = [answer_prefix(s["input_ids"]) for s in samples]
            answers = generate_answers(self.model, self.tokenizer, prefixes, captured["visual_tokens"],
                                       batch["token_refer_id"], max_new_tokens=max_new_tokens)
            explain_s = (time.perf_counter() - start) / len(loaded)

        share = len(loaded)
        return [self._finish(item, text, logits[i], geometries[i], answers[i],
                             {"read_s": item.read_s, "preprocess_s": prep_s / share, "model_s": model_s / share,
                              "explain_s": explain_s})
                for i, (item, text) in enumerate(zip(loaded, texts))]

    # --------------------------------------------------------------------------------------------
    def checked_query(self, query: Any, where: str = "query") -> str:
        """`check_query` plus the token limit."""
        text = check_query(query, where)
        self.check_query_length(text, where)
        return text

    def encode(self, rgbs: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[dict, list, list]:
        """Letterboxed, normalised images + encoded queries as one batch on the model's device."""
        samples, geometries = [], []
        for rgb, text in zip(rgbs, texts):
            canvas, geometry = letterbox_image(rgb, self.image_size)
            sample = encode_query(self.tokenizer, text, task=self.task)
            sample["images"] = normalize_image(canvas)
            samples.append(sample)
            geometries.append(geometry)
        batch = self._collate(samples)
        for key in ("input_ids", "attention_mask", "images"):
            batch[key] = batch[key].to(self.device)
        return batch, samples, geometries

    @torch.no_grad()
    def letterboxed_logits(self, batch: dict, where: str) -> torch.Tensor:
        """[B,S,S] float32 CPU mask logits of an `encode`d batch; warns when any are NaN/Inf."""
        logits = self.model.predict(**batch).mask_logits.float().cpu()
        check_finite_logits(logits, f"prediction for {where}", logger)
        return logits

    def _hint_tiling(self, item: LoadedImage) -> None:
        factor = max(item.rgb.shape[:2]) / self.image_size
        if factor > TILE_HINT_FACTOR:
            logger.warning("%s (%dx%d) is shrunk %.1fx to the model's %d² input, so small objects may be lost; "
                           "--tile (Predictor(tile=True)) predicts it tile by tile at full resolution",
                           item.source, item.rgb.shape[1], item.rgb.shape[0], factor, self.image_size)

    def _predict_tiled(self, image, query: str) -> Prediction:
        from .tiling import predict_tiled_prediction

        return predict_tiled_prediction(self, image, query)

    def _finish(self, item: LoadedImage, query: str, letterboxed: torch.Tensor, geometry: LetterboxGeometry,
                answer, timings: dict) -> Prediction:
        start = time.perf_counter()
        logits = unletterbox_logits(letterboxed, geometry)
        mask = (logits > self.threshold).numpy()
        probability = torch.sigmoid(logits).numpy()
        dropped = 0
        if item.geo is not None and item.geo.nodata_mask is not None:  # nodata is never part of the answer
            dropped = int((mask & item.geo.nodata_mask).sum())
            mask &= ~item.geo.nodata_mask
        geo = item.geo if item.geo is not None and item.geo.is_georeferenced else None
        exact = mask_to_polygons(mask, None if geo is None else geo.transform)
        polygons = simplify_polygons(exact, self.simplify)
        record = self._record(item, query, mask, probability, geometry, geo, polygons, answer, exact)
        if item.geo is not None and item.geo.nodata_mask is not None:
            record["nodata_px"] = int(item.geo.nodata_mask.sum())
            record["mask_px_dropped_on_nodata"] = dropped
        timings["postprocess_s"] = time.perf_counter() - start
        record["timings_s"] = {k: round(v, 6) for k, v in timings.items()}
        return Prediction(mask=mask, probability=probability, polygons=polygons,
                          answer=None if answer is None else answer.text, geo=geo, record=record,
                          letterbox=geometry, image=item.rgb)

    def _record(self, item, query, mask, probability, geometry, geo, polygons, answer, exact) -> dict:
        area_px = int(mask.sum())
        bbox = mask_bbox_pixels(mask)
        record: dict = {
            "image": item.source, "query": query, "task": self.task, "model": self.model_name,
            "image_size": {"height": int(mask.shape[0]), "width": int(mask.shape[1])},
            "letterbox": geometry.to_dict(), "bands": self.bands, "threshold": self.threshold,
            "mask_area_px": area_px,
            "mean_probability": float(probability[mask].mean()) if area_px else None,
            "bbox_px": bbox, "num_polygons": len(polygons), "simplify": self.simplify,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
        }
        if geo is None:
            record.update({"crs": None, "transform": None, "mask_area_m2": None, "area_method": None, "bbox_map": None,
                           "crs_note": "image has no CRS or geotransform (not a GeoTIFF); areas are in pixels, "
                                       "bbox and polygons in pixel coordinates (x = column, y = row)"})
        else:
            record.update(geo.to_record())
            record["bbox_map"] = None if bbox is None else bbox_to_map(bbox, geo.transform)
            record.update(area_fields(area_px, exact, geo))
        if answer is not None:
            record.update({"answer": answer.text, "answer_raw": answer.raw, "answer_tokens": answer.num_tokens,
                           "answer_mean_logprob": sum(answer.logprobs) / max(len(answer.logprobs), 1)})
        return record


__all__ = ["Predictor", "Prediction", "LoadedImage", "load_image", "default_task", "check_query", "TASKS"]
