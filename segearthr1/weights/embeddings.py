"""Token-embedding set-up for training: add `[PAD]`/`[SEG]` and resize the LLM's tables as the reference did.

Why its own module: both a fresh training model (`initialisation.build_for_training`) and a randomly
initialised tiny one (`train.py`, `benchmark.py`) need exactly the reference's order of resizes and
its mean-initialised `[PAD]` row, or token ids and embedding rows stop matching released checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from ..processing import PAD_TOKEN, SEG_TOKEN, setup_tokenizer


@torch.no_grad()
def resize_token_embeddings(model: SegEarthR1ForReasoningSegmentation, new_size: int) -> None:
    """Resize input and output embeddings to `new_size` rows like HF `resize_token_embeddings` did in
    the reference: the first min(old, new) rows are kept (a shrink truncates), rows beyond the old count
    are drawn from N(0, initializer_range). The output head stays bias-free."""
    lm = model.language_model
    old_in, old_out = lm.get_input_embeddings(), lm.get_output_embeddings()
    old_rows = old_in.weight.shape[0]
    if new_size == old_rows:
        return
    std = getattr(model.config.text_config, "initializer_range", 0.02)
    keep = min(old_rows, new_size)
    new_in = nn.Embedding(new_size, old_in.weight.shape[1], dtype=old_in.weight.dtype, device=old_in.weight.device)
    new_out = nn.Linear(old_out.in_features, new_size, bias=False, dtype=old_out.weight.dtype,
                        device=old_out.weight.device)
    for new, old in ((new_in, old_in), (new_out, old_out)):
        new.weight.normal_(0.0, std)
        new.weight[:keep] = old.weight[:keep]
    lm.set_input_embeddings(new_in)
    lm.set_output_embeddings(new_out)
    model.config.text_config.vocab_size = new_size


@torch.no_grad()
def mean_init_last_rows(model: SegEarthR1ForReasoningSegmentation, num_rows: int) -> None:
    """Set the last `num_rows` input/output embedding rows to the mean of the rows before them
    (the reference's rule for an added `[PAD]`)."""
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        weight[-num_rows:] = weight[:-num_rows].mean(0, keepdim=True)


def setup_tokenizer_and_embeddings(model: SegEarthR1ForReasoningSegmentation, tokenizer) -> None:
    """The reference training set-up, in its order: add `[PAD]` if the tokenizer has no pad token,
    resize to len(tokenizer) and mean-initialise its rows; add `[SEG]` and resize again. Records the
    ids in the config."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        resize_token_embeddings(model, len(tokenizer))
        mean_init_last_rows(model, 1)
    setup_tokenizer(tokenizer)  # adds [SEG] (and nothing else now that a pad token exists)
    resize_token_embeddings(model, len(tokenizer))
    vocab = tokenizer.get_vocab()
    model.config.seg_token_id = vocab[SEG_TOKEN]
    model.config.pad_token_id = tokenizer.pad_token_id
