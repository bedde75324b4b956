"""Answer text of reasoning checkpoints: greedy generation after the mask prefix, with the LLM's KV cache.

EarthReason's prompt ends `... [/INST] Sure, It is <seg>. \\n<answer>. <|endoftext|>`; in training the
`<answer>` slot held the answer tokens followed by `[SEG]`. So the answer is generated from the prefix
that stops right before `<answer>` (`<seg>` is dropped by the embedding merge as in training): one
cached pass over the merged prefix embeddings, then one token at a time until `<|endoftext|>` or
`max_new_tokens`. The returned text is what precedes the first generated `[SEG]` (the answer payload);
the full decoded continuation is kept as `raw`. The mask is never touched: it comes from `predict()`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..modeling.input_merge import merge_multimodal_inputs
from ..perf.cpu_low_precision import cpu_products_in_fp32_for
from ..processing import ANSWER_TOKEN_INDEX, DEFAULT_SEPARATOR, SEG_TOKEN

logger = logging.getLogger(__name__)


@dataclass
class GeneratedAnswer:
    text: str  # the answer: decoded tokens before the first [SEG], stripped
    raw: str  # everything generated before <|endoftext|>, [SEG] included
    num_tokens: int  # tokens generated, <|endoftext|> included when reached
    logprobs: list[float]  # log-probability of each generated token (same length as num_tokens)


@contextlib.contextmanager
def capture_visual_tokens(model) -> Iterator[dict]:
    """Keep the connector's output of the next forward (the visual tokens the LLM saw), so answering
    reuses `predict()`'s vision pass instead of running the encoder a second time."""
    store: dict = {}

    def hook(module, inputs, output):
        store["visual_tokens"] = output

    handle = model.connector.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def answer_prefix(input_ids: torch.Tensor) -> torch.Tensor:
    """The prompt ids (with sentinels) up to, not including, the `<answer>` sentinel."""
    positions = (input_ids == ANSWER_TOKEN_INDEX).nonzero()
    if positions.shape[0] != 1:
        raise ValueError(f"the prompt holds {positions.shape[0]} <answer> slots; answer generation needs a "
                         f"reasoning prompt with exactly one (task='reasoning')")
    return input_ids[:int(positions[0, 0])]


def _left_pad(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B,L,H] + [B,L] -> left-padded, so every row's next token goes in the last column."""
    length = mask.shape[1]
    shift = length - mask.sum(1)
    src = torch.arange(length, device=mask.device)[None, :] - shift[:, None]
    valid = src >= 0
    gathered = embeds.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(valid[..., None], gathered, torch.zeros_like(gathered)), valid


def _cache_kwarg(language_model) -> str:
    """Name of the cache argument: `cache` in recent transformers, `past_key_values` before."""
    params = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    ids = tokenizer.encode(DEFAULT_SEPARATOR, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no eos token and encodes {DEFAULT_SEPARATOR!r} as {ids}; "
                         f"answer generation needs a single end-of-text id")
    return int(ids[0])


@torch.no_grad()
def generate_answers(model, tokenizer, prefix_ids: Sequence[torch.Tensor], visual_tokens: torch.Tensor,
                     token_refer_id: Sequence[torch.Tensor], max_new_tokens: int = 64) -> list[GeneratedAnswer]:
    """Greedy answers for a batch. `prefix_ids`: per-sample prompt ids from `answer_prefix`;
    `visual_tokens` [B,N,H]: the connector output of the same images; `token_refer_id`: the queries'
    refer payloads (as given to `predict`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    with cpu_products_in_fp32_for(model):  # bf16/fp16 on a CPU without native kernels (perf/cpu_low_precision.py)
        return _greedy_answers(model, tokenizer, prefix_ids, visual_tokens, token_refer_id, max_new_tokens)


def _greedy_answers(model, tokenizer, prefix_ids, visual_tokens, token_refer_id, max_new_tokens):
    device = visual_tokens.device
    embed = model.get_input_embeddings()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = pad_sequence([p.to(device) for p in prefix_ids], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(p) for p in prefix_ids], device=device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
    merged = merge_multimodal_inputs(ids, mask, None, embed, visual_tokens.to(embed.weight.dtype), token_refer_id,
                                     None, seg_token_id=model.config.seg_token_id,
                                     keep_seg_token=model.config.keep_seg_token)
    embeds, attention = _left_pad(merged.inputs_embeds, merged.attention_mask)
    positions = (attention.long().cumsum(1) - 1).clamp(min=0)
    lm = model.language_model
    cache_kw = _cache_kwarg(lm)
    eos = _eos_id(tokenizer)

    out = lm(inputs_embeds=embeds, attention_mask=attention.long(), position_ids=positions, use_cache=True)
    scores = out.logits[:, -1].float().log_softmax(-1)
    next_ids = scores.argmax(-1)
    generated, logprobs = [next_ids], [scores.max(-1).values]
    done = next_ids == eos
    position = positions[:, -1]
    attention = attention.long()
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        position = position + 1
        out = lm(input_ids=next_ids[:, None], attention_mask=attention, position_ids=position[:, None],
                 use_cache=True, **{cache_kw: cache})
        scores = out.logits[:, -1].float().log_softmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, eos), scores.argmax(-1))
        generated.append(next_ids)
        logprobs.append(scores.max(-1).values)
        done = done | (next_ids == eos)
    rows = zip(torch.stack(generated, 1).tolist(), torch.stack(logprobs, 1).tolist())
    return [_decode(tokens, scores, tokenizer, eos) for tokens, scores in rows]


def _decode(tokens: list[int], logprobs: list[float], tokenizer, eos: int) -> GeneratedAnswer:
    stop = tokens.index(eos) if eos in tokens else len(tokens)
    body = tokens[:stop]
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    answer = body[:body.index(seg_id)] if seg_id in body else body
    count = min(len(tokens), stop + 1)
    text = tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    raw = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return GeneratedAnswer(text=text, raw=raw, num_tokens=count, logprobs=logprobs[:count])
