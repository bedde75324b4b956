"""Datasets in their real on-disk formats, preprocessing and batch collation."""
from .collate import DataCollator
from .image_io import read_image_rgb, read_mask
from .registry import DATASETS, build_dataset, default_data_root
from .transforms import LetterboxGeometry, letterbox_image, letterbox_mask, normalize_image, unletterbox_logits

__all__ = ["DATASETS", "DataCollator", "LetterboxGeometry", "build_dataset", "default_data_root", "letterbox_image",
           "letterbox_mask", "normalize_image", "read_image_rgb", "read_mask", "unletterbox_logits"]
