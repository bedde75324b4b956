"""Vectorised multimodal input assembly (DESIGN.md §2.4 "Embedding merge").

The reference walks every token in Python; here each sentinel is expanded with one cumulative sum
and a handful of scatter writes, so the cost does not depend on the sequence length in Python.

Per sample: `<image>` -> the visual tokens (label IGNORE); `<refer>` -> the refer payload embeddings
(label IGNORE; these are the *description positions*); `<answer>` -> the answer payload embeddings
with labels = the payload ids; `<seg>` -> removed, or (learned-query ablation) the `[SEG]` embedding;
other ids -> token embeddings. Padding (attention_mask False) is dropped and the result is
right-padded with zeros again, so the attention mask is True exactly on the real positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..processing import ANSWER_TOKEN_INDEX, IGNORE_LABEL_ID, IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX, SEG_TOKEN_INDEX


@dataclass
class MergedInputs:
    inputs_embeds: torch.Tensor  # [B, L', H]
    attention_mask: torch.Tensor  # [B, L'] bool, True on real positions (right padding)
    labels: torch.Tensor | None  # [B, L'] long, IGNORE_LABEL_ID where no LM target
    description_mask: torch.Tensor  # [B, L'] bool, True at the refer-payload positions


def _payload_layout(payloads: Sequence[torch.Tensor], device: torch.device):
    """Flatten a list of 1-D id tensors: (flat ids, lengths [B], sample index and offset per token)."""
    lengths = torch.tensor([len(p) for p in payloads], device=device, dtype=torch.long)
    flat = torch.cat([p.to(device=device, dtype=torch.long) for p in payloads]) if len(payloads) else \
        torch.zeros(0, dtype=torch.long, device=device)
    sample = torch.repeat_interleave(torch.arange(len(payloads), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(flat.numel(), device=device) - starts[sample]
    return flat, lengths, sample, offset


def _check_one_per_row(flags: torch.Tensor, what: str, allowed: tuple[int, ...] = (1,)) -> torch.Tensor:
    counts = flags.sum(1)
    bad = [i for i, c in enumerate(counts.tolist()) if c not in allowed]
    if bad:
        raise ValueError(f"input_ids rows {bad} contain {counts[bad].tolist()} {what} sentinel(s); expected "
                         f"{' or '.join(map(str, allowed))} per sample (build inputs with segearthr1.processing)")
    return counts


def merge_multimodal_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    visual_tokens: torch.Tensor,
    token_refer_id: Sequence[torch.Tensor],
    token_answer_id: Sequence[torch.Tensor] | None = None,
    seg_token_id: int | None = None,
    keep_seg_token: bool = False,
) -> MergedInputs:
    """Build the LLM's `inputs_embeds` from sentinel-bearing `input_ids` (see module docstring)."""
    device = input_ids.device
    batch, length = input_ids.shape
    if len(token_refer_id) != batch:
        raise ValueError(f"token_refer_id has {len(token_refer_id)} entries for a batch of {batch}")
    valid = attention_mask.bool()
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & valid
    is_refer = (input_ids == REFER_TOKEN_INDEX) & valid
    is_answer = (input_ids == ANSWER_TOKEN_INDEX) & valid
    is_seg = (input_ids == SEG_TOKEN_INDEX) & valid
    _check_one_per_row(is_image, "<image>")
    _check_one_per_row(is_refer, "<refer>")
    answer_counts = _check_one_per_row(is_answer, "<answer>", allowed=(0, 1))
    if keep_seg_token and seg_token_id is None:
        raise ValueError("keep_seg_token=True needs seg_token_id (the tokenizer's [SEG] id)")
    has_answer = bool(answer_counts.any())
    if has_answer:
        if token_answer_id is None or len(token_answer_id) != batch:
            raise ValueError("input_ids contain <answer> sentinels but token_answer_id is missing or has the wrong length")
        given = torch.tensor([len(t) > 0 for t in token_answer_id], device=device)
        if not torch.equal(given, answer_counts.bool()):
            raise ValueError("token_answer_id must be non-empty exactly for the samples whose input_ids hold <answer>")

    num_visual = visual_tokens.shape[1]
    refer_flat, refer_len, refer_sample, refer_offset = _payload_layout(token_refer_id, device)
    if (refer_len == 0).any():
        raise ValueError("every token_refer_id must hold at least one id (the description and [SEG])")

    # Expansion count per original position -> start index of each position in the merged sequence.
    text = valid & (input_ids >= 0)
    counts = text.long()
    counts = counts + is_image.long() * num_visual
    counts = counts + is_refer.long() * refer_len[:, None]
    if has_answer:
        answer_flat, answer_len, answer_sample, answer_offset = _payload_layout(
            [t if len(t) else t.new_zeros(0) for t in token_answer_id], device)
        counts = counts + is_answer.long() * answer_len[:, None]
    if keep_seg_token:
        counts = counts + is_seg.long()
    new_lengths = counts.sum(1)
    starts = torch.cumsum(counts, 1) - counts
    new_len = int(new_lengths.max())

    hidden = visual_tokens.shape[-1]
    dtype = visual_tokens.dtype
    embeds = visual_tokens.new_zeros(batch, new_len, hidden)
    new_labels = torch.full((batch, new_len), IGNORE_LABEL_ID, dtype=torch.long, device=device)
    description = torch.zeros(batch, new_len, dtype=torch.bool, device=device)

    # Ordinary tokens (and the kept [SEG] of the learned-query ablation).
    token_positions = text | is_seg if keep_seg_token else text
    rows, cols = token_positions.nonzero(as_tuple=True)
    ids = input_ids[rows, cols]
    if keep_seg_token:
        ids = torch.where(ids == SEG_TOKEN_INDEX, torch.full_like(ids, seg_token_id), ids)
    targets = starts[rows, cols]
    embeds[rows, targets] = embed_tokens(ids).to(dtype)
    if labels is not None:
        token_labels = labels[rows, cols]
        if keep_seg_token:
            token_labels = torch.where(token_labels == SEG_TOKEN_INDEX, torch.full_like(token_labels, seg_token_id),
                                       token_labels)
        new_labels[rows, targets] = token_labels

    # Visual tokens: one block of num_visual positions per sample.
    rows, cols = is_image.nonzero(as_tuple=True)
    block = starts[rows, cols][:, None] + torch.arange(num_visual, device=device)
    embeds[rows[:, None], block] = visual_tokens[rows]

    # Refer payload: description positions, no LM target.
    refer_start = starts[is_refer.nonzero(as_tuple=True)]  # one per row, rows in order
    refer_pos = refer_start[refer_sample] + refer_offset
    embeds[refer_sample, refer_pos] = embed_tokens(refer_flat).to(dtype)
    description[refer_sample, refer_pos] = True

    # Answer payload: the LLM learns to produce it.
    if has_answer:
        answer_rows = is_answer.any(1)
        answer_start = torch.zeros(batch, dtype=torch.long, device=device)
        answer_start[answer_rows] = starts[is_answer.nonzero(as_tuple=True)]
        answer_pos = answer_start[answer_sample] + answer_offset
        embeds[answer_sample, answer_pos] = embed_tokens(answer_flat).to(dtype)
        if labels is not None:
            new_labels[answer_sample, answer_pos] = answer_flat

    new_mask = torch.arange(new_len, device=device)[None, :] < new_lengths[:, None]
    return MergedInputs(embeds, new_mask, new_labels if labels is not None else None, description)
