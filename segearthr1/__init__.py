"""segearthr1: language-guided segmentation of remote-sensing images (SegEarth-R1).

Public API (imported lazily so `import segearthr1` stays light):
    SegEarthR1Config, SegEarthR1ForReasoningSegmentation, load_pretrained, save_pretrained,
    build_for_training, export_reference_release, MaskCriterion, SegmentationMeter, evaluate_model,
    build_dataset, DataCollator, Predictor, Prediction
"""
from __future__ import annotations

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "SegEarthR1Config": "segearthr1.configuration",
    "SegEarthR1ForReasoningSegmentation": "segearthr1.modeling.segearthr1",
    "load_pretrained": "segearthr1.weights.pretrained",
    "save_pretrained": "segearthr1.weights.pretrained",
    "build_for_training": "segearthr1.weights.initialisation",
    "export_reference_release": "segearthr1.weights.export",
    "MaskCriterion": "segearthr1.losses",
    "SegmentationMeter": "segearthr1.evaluation.metrics",
    "evaluate_model": "segearthr1.evaluation.loop",
    "build_dataset": "segearthr1.data.registry",
    "DataCollator": "segearthr1.data.collate",
    "Predictor": "segearthr1.inference.predictor",
    "Prediction": "segearthr1.inference.predictor",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
