"""Batch collation into the dict the model consumes (DESIGN.md §2.9)."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ..processing import IGNORE_LABEL_ID

_PADDED = ("input_ids", "labels", "refer_embedding_indices", "answer_embedding_indices")
_STACKED = ("images", "masks")


class DataCollator:
    """Right-pads token tensors, stacks images/masks, keeps payloads and everything else as lists.

    input_ids are padded with `pad_token_id`, labels with IGNORE_LABEL_ID, the embedding-index tensors
    with 0; attention_mask = input_ids != pad_token_id. `max_length` truncates like the reference
    collator (tokenizer.model_max_length); None keeps full length. A batch holds one dataset_type.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; run segearthr1.processing.setup_tokenizer(tokenizer) "
                             "so the tokenizer has a [PAD] token")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        types = {s.get("dataset_type") for s in samples}
        if len(types) > 1:
            raise ValueError(f"a batch must hold one dataset_type, got {sorted(map(str, types))}; "
                             f"sample batches per dataset (one dataset per DataLoader or a grouped sampler)")
        keys = list(samples[0])
        for i, s in enumerate(samples[1:], start=1):
            if set(s) != set(keys):
                raise ValueError(f"sample {i} has keys {sorted(s)} but sample 0 has {sorted(keys)}")

        batch: dict = {}
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_LABEL_ID}
        for key in _PADDED:
            if key in samples[0]:
                padded = pad_sequence([s[key] for s in samples], batch_first=True,
                                      padding_value=pad_values.get(key, 0))
                batch[key] = padded if self.max_length is None else padded[:, :self.max_length]
        if "input_ids" in batch:
            batch["attention_mask"] = batch["input_ids"].ne(self.pad_token_id)
        for key in _STACKED:
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        for key in keys:
            if key not in batch:
                batch[key] = [s[key] for s in samples]
        return batch


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The collated batch with its tensors (and lists of tensors, e.g. payloads) moved to `device`."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out
