"""Inference for analysts: (image, query) -> mask at the image's resolution, in its CRS, plus polygons.

`Predictor` / `Prediction` (predictor.py) are the Python API; `segearthr1 predict` (predict_cli.py)
writes masks, overlays, JSON records and, for GeoTIFFs, mask GeoTIFFs and GeoJSON (geo.py);
explain.py generates the textual answer of reasoning checkpoints. Imported lazily: this package
pulls in torch and transformers.
"""
from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "Predictor": "segearthr1.inference.predictor",
    "Prediction": "segearthr1.inference.predictor",
    "load_image": "segearthr1.inference.predictor",
    "default_task": "segearthr1.inference.predictor",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
