"""Tiny random SegEarth-R1 models and batches for tests (real tokenizer, real prompt encoding)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from segearthr1.configuration import SegEarthR1Config
from segearthr1.data.collate import DataCollator
from segearthr1.modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from segearthr1.data.registry import encode_sample_text

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
TOKENIZER_TRAINED = REFERENCE / "tokenizer_tiny_trained"  # [PAD]=998, [SEG]=999, len 1000
TOKENIZER_RAW = REFERENCE / "tokenizer_tiny"

TINY_PHI = dict(model_type="phi", vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512)
TINY_LLAMA = dict(model_type="llama", vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(text_config=None, image_size: int = 64, **overrides) -> SegEarthR1Config:
    """CPU-sized model: Swin 16-wide with 1 block per stage, 32-wide LLM and decoders."""
    kwargs = dict(
        text_config=dict(text_config or TINY_PHI), image_size=image_size,
        vision=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, drop_path_rate=0.1),
        description_projector=dict(dim=32, num_heads=2, dim_head=16),
        pixel_decoder=dict(conv_dim=32, mask_dim=32, num_heads=2, ffn_dim=64, num_encoder_layers=1),
        mask_decoder=dict(hidden_dim=32, num_heads=2, dim_feedforward=64, num_layers=2, num_queries=5),
        loss=dict(num_points=64), seg_token_id=999, pad_token_id=998)
    kwargs.update(overrides)
    return SegEarthR1Config(**kwargs)


def tiny_model(seed: int = 0, **kw) -> SegEarthR1ForReasoningSegmentation:
    torch.manual_seed(seed)
    return SegEarthR1ForReasoningSegmentation(tiny_config(**kw))


def trained_tokenizer(use_fast: bool = False):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_TRAINED), use_fast=use_fast)


def make_batch(kind: str = "reason_seg", batch_size: int = 2, image_size: int = 64, seed: int = 0,
               tokenizer=None) -> dict:
    """A collated batch in the reference's format with real prompt tokenisation."""
    tokenizer = tokenizer or trained_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    dataset = "EarthReason" if kind == "reason_seg" else "RefSegRS"
    texts = ["where is the red triangle", "which area could people gather in after a flood near the river",
             "the blue circle", "the large green square left of the road"]
    answers = ["The red triangle is in the north.", "", "A circle.", "Near the road."]
    samples = []
    for i in range(batch_size):
        sample = encode_sample_text(tokenizer, dataset, texts[i % 4], answers[i % 4], train=True)
        sample["images"] = torch.randn(3, image_size, image_size, generator=gen)
        mask = torch.zeros(1, image_size, image_size, dtype=torch.uint8)
        y, x = torch.randint(0, image_size // 2, (2,), generator=gen).tolist()
        mask[:, y:y + image_size // 3, x:x + image_size // 4] = 1
        sample["masks"] = mask
        samples.append(sample)
    return DataCollator(tokenizer.pad_token_id)(samples)
