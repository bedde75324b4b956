"""Which samples an evaluation rank scores, and the ids its files are named by.

Sample ids are the image name (EarthReason stem, RefSegRS ID, RRSIS-D image stem); when a name occurs
more than once in the split (`--question_sampling all`, several RRSIS-D refs per image) the k-th
occurrence in index order is `<image_name>__q<k>` (k from 0). Distributed runs shard the samples by
index (rank r takes r, r+N, ...: no padding duplicates).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset


def sample_ids(dataset) -> list[str]:
    """Unique, deterministic ids for all samples of `dataset` (see the module docstring).

    Datasets without a `sample_name(idx)` method get zero-padded indices.
    """
    n = len(dataset)
    if not hasattr(dataset, "sample_name"):
        width = max(6, len(str(n)))
        return [f"{i:0{width}d}" for i in range(n)]
    names = [str(dataset.sample_name(i)).replace("/", "_").replace("\\", "_") for i in range(n)]
    totals: dict[str, int] = {}
    for name in names:
        totals[name] = totals.get(name, 0) + 1
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        if totals[name] == 1:
            ids.append(name)
        else:
            k = seen.get(name, 0)
            seen[name] = k + 1
            ids.append(f"{name}__q{k}")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise ValueError(f"sample ids are not unique ({dupes}); image names clash with the '__q<k>' suffix. "
                         "Rename those images")
    return ids


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's samples: every world_size-th index starting at rank (no padding, no duplicates)."""
    return list(indices)[rank::world_size]


class IndexedSubset(Dataset):
    """The samples `indices` of `dataset`, each tagged with its global `sample_index`.

    Each sample is produced under a fixed RNG seed derived from (seed, index), so random question
    sampling gives the same sample for any world size, batch size or worker count.
    """

    def __init__(self, dataset, indices: Sequence[int], seed: int = 0):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        idx = self.indices[j]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + idx) % (2 ** 63))
            sample = dict(self.dataset[idx])
        sample["sample_index"] = idx
        return sample
