"""Dataset name -> class, and where the data lives by default (env SEGEARTH_DATA, else ./datasets)."""
from __future__ import annotations

import os
from pathlib import Path

from .earthreason import EarthReasonDataset
from .refsegrs import RefSegRSDataset
from .rrsisd import RRSISDDataset

DATASETS = {
    "EarthReason": EarthReasonDataset,
    "RRSIS-D": RRSISDDataset,
    "RefSegRS": RefSegRSDataset,
}
DATA_ROOT_ENV = "SEGEARTH_DATA"


def default_data_root() -> Path:
    """DATA_ROOT from $SEGEARTH_DATA, or ./datasets when unset."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "datasets")


def build_dataset(name: str, data_root, split: str, tokenizer, **kwargs):
    """Instantiate dataset `name` (keys of DATASETS); kwargs go to its constructor."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    return DATASETS[name](data_root if data_root is not None else default_data_root(), split, tokenizer,
                          **kwargs)
