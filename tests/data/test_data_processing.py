"""Prompt rendering, tokenizer set-up, label masking and collation against prompts.pt."""
from __future__ import annotations

import pytest
import torch
from conftest import REFERENCE, load_reference
from transformers import AutoTokenizer

from segearthr1.data.collate import DataCollator
from segearthr1.data.registry import build_conversation, encode_sample_text, prompt_template
from segearthr1.processing import (
    ANSWER_TOKEN_INDEX,
    IGNORE_LABEL_ID,
    IMAGE_TOKEN_INDEX,
    NO_TARGET_ANSWER,
    REFER_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    encode_query,
    seg_token_id,
    setup_tokenizer,
    tokenize_conversation,
    tokenize_with_placeholders,
)

PROMPTS = load_reference("prompts.pt")
EXAMPLE_KEYS = [k for k in PROMPTS["examples"] if not k.endswith("collated_pair")]
TEXT_KEYS = ("input_ids", "labels", "token_refer_id", "refer_embedding_indices", "token_answer_id",
             "answer_embedding_indices", "dataset_type")


def _load(name: str, fast: bool):
    return AutoTokenizer.from_pretrained(str(REFERENCE / name), use_fast=fast)


@pytest.fixture(scope="module", params=["trained-slow", "trained-fast", "setup-slow", "setup-fast"])
def tokenizer(request):
    """The saved trained tokenizer in both flavours, and tokenizer_tiny set up by our own code."""
    kind, flavour = request.param.split("-")
    fast = flavour == "fast"
    if kind == "trained":
        return _load("tokenizer_tiny_trained", fast)
    tok = _load("tokenizer_tiny", fast)
    assert setup_tokenizer(tok) == ["[PAD]", "[SEG]"]
    return tok


def _source(key: str):
    """(dataset, train, instruction, answer) of a prompts.pt example from meta.source_texts."""
    parts = key.split("/")
    dataset, train = parts[0], parts[1] == "train"
    src = PROMPTS["meta"]["source_texts"][dataset]["train" if train else "val"][1 if "empty" in key else 0]
    if dataset == "EarthReason":
        answers = src["qa"]["answer"]
        return dataset, train, src["qa"]["questions"][0], (answers[0] if answers else None)
    return dataset, train, src["sentence" if dataset == "RRSIS-D" else "phrase"], None


@pytest.mark.parametrize("key", EXAMPLE_KEYS)
def test_prompt_and_ids_match_reference(tokenizer, key):
    ex = PROMPTS["examples"][key]
    dataset, train, instruction, answer = _source(key)
    assert build_conversation(dataset, train) == ex["prompt"]
    out = encode_sample_text(tokenizer, dataset, instruction, answer, train)
    expected_keys = {k for k in TEXT_KEYS if k in ex}
    assert set(out) == expected_keys
    for k in expected_keys:
        if isinstance(ex[k], torch.Tensor):
            assert out[k].dtype == torch.long, k
            assert torch.equal(out[k], ex[k]), k
        else:
            assert out[k] == ex[k], k


def test_collated_pair_matches_reference(tokenizer):
    ref = PROMPTS["examples"]["EarthReason/eval/collated_pair"]
    samples = []
    for key, name in (("EarthReason/eval", "er_val_000"), ("EarthReason/eval/empty_answer", "er_val_001")):
        dataset, train, instruction, answer = _source(key)
        samples.append({**encode_sample_text(tokenizer, dataset, instruction, answer, train), "image_name": name})
    batch = DataCollator(tokenizer.pad_token_id)(samples)
    assert set(ref) - {"meta"} <= set(batch)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(batch[k], v), k
        elif k in ("token_refer_id", "token_answer_id"):
            assert len(batch[k]) == len(v) and all(torch.equal(a, b) for a, b in zip(batch[k], v)), k
        else:
            assert batch[k] == v, k


def test_tokenizer_strings_match_reference(tokenizer):
    for text, ids in PROMPTS["tokenizer_checks"]["strings_to_ids"].items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text


def test_setup_tokenizer_ids_and_idempotence():
    for fast in (False, True):
        tok = _load("tokenizer_tiny", fast)
        assert tok.pad_token is None and len(tok) == 998
        assert setup_tokenizer(tok) == ["[PAD]", "[SEG]"]
        assert (tok.pad_token_id, seg_token_id(tok), len(tok)) == (998, 999, 1000)
        assert setup_tokenizer(tok) == []
        assert len(tok) == 1000
        trained = _load("tokenizer_tiny_trained", fast)
        assert setup_tokenizer(trained) == [] and len(trained) == 1000


def test_seg_token_id_requires_setup():
    tok = _load("tokenizer_tiny", True)
    with pytest.raises(ValueError, match="setup_tokenizer"):
        seg_token_id(tok)


def test_label_masking_rule_keeps_last_instruction_token():
    """Positions 0..n-2 masked, n = tokens of the prompt up to '[/INST] '; the rest keeps its ids."""
    tok = _load("tokenizer_tiny_trained", False)
    for dataset in ("RefSegRS", "EarthReason"):
        prompt = build_conversation(dataset, True)
        ids, labels = tokenize_conversation(prompt, tok)
        head = prompt.split("[/INST] ")[0] + "[/INST] "
        n = len(tokenize_with_placeholders(head, tok))
        assert (labels[: n - 1] == IGNORE_LABEL_ID).all()
        assert torch.equal(labels[n - 1:], ids[n - 1:])
        assert ids[-1].item() == 997 and labels[-1].item() == 997
        assert (ids == IMAGE_TOKEN_INDEX).sum() == 1 and (ids == REFER_TOKEN_INDEX).sum() == 1
        assert (ids == SEG_TOKEN_INDEX).sum() == 1
        assert (ids == ANSWER_TOKEN_INDEX).sum() == (1 if dataset == "EarthReason" else 0)


class _PadCollidingTokenizer:
    """Wraps a tokenizer but claims the id of ' ' (220) is padding, so the count check must fail."""

    def __init__(self, tok):
        self._tok, self.pad_token_id, self.model_max_length = tok, 220, 2048

    def encode(self, text, add_special_tokens=False):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_length_mismatch_masks_all_labels(caplog):
    tok = _PadCollidingTokenizer(_load("tokenizer_tiny_trained", False))
    _, labels = tokenize_conversation(build_conversation("RefSegRS", True), tok)
    assert (labels == IGNORE_LABEL_ID).all()
    assert "tokenization mismatch" in caplog.text


def test_empty_answer_uses_fixed_text():
    tok = _load("tokenizer_tiny_trained", True)
    a = encode_sample_text(tok, "EarthReason", "Where?", None, True)
    b = encode_sample_text(tok, "EarthReason", "Where?", NO_TARGET_ANSWER, True)
    assert torch.equal(a["token_answer_id"], b["token_answer_id"])
    assert encode_sample_text(tok, "RefSegRS", "x", "ignored", True).keys().isdisjoint({"token_answer_id"})


def test_encode_query_uses_eval_prompts():
    tok = _load("tokenizer_tiny_trained", True)
    reasoning = encode_query(tok, "Which red triangle is the landmark?", task="reasoning")
    ref = encode_sample_text(tok, "EarthReason", "Which red triangle is the landmark?", "x", train=False)
    assert torch.equal(reasoning["input_ids"], ref["input_ids"])
    assert torch.equal(reasoning["token_refer_id"], ref["token_refer_id"])
    assert reasoning["token_answer_id"].tolist() == [999]
    assert reasoning["dataset_type"] == "reason_seg"
    referring = encode_query(tok, "the red triangle", task="referring")
    assert torch.equal(referring["input_ids"], PROMPTS["examples"]["RefSegRS/eval"]["input_ids"])
    assert "token_answer_id" not in referring and referring["dataset_type"] == "refer_seg"
    short = encode_query(tok, "the red triangle", task="referring", template=prompt_template("RRSIS-D", train=False))
    assert torch.equal(short["input_ids"], PROMPTS["examples"]["RRSIS-D/eval"]["input_ids"])
    with pytest.raises(ValueError, match="task"):
        encode_query(tok, "q", task="detect")
    with pytest.raises(ValueError, match="reason_seg"):
        encode_query(tok, "q", task="referring", template=prompt_template("EarthReason", train=False))


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_conversation("COCO", True)


def test_text_encoder_reuses_token_ids_and_matches_uncached():
    """TextEncoder keeps each question's ids: the same tensors as a fresh encoding, tokenised once, and a
    tensor handed out can be changed without touching the next one."""
    from segearthr1.processing import TextEncoder, encode_payload

    tok = _load("tokenizer_tiny_trained", True)
    enc = TextEncoder(tok, prompt_template("EarthReason", train=True))
    question, answer = (encode_payload(tok, t) for t in (" Which red triangle is the landmark?", "The red triangle."))
    calls = []
    encode = tok.encode
    tok.encode = lambda *a, **k: calls.append(a[0]) or encode(*a, **k)
    first = enc("Which red triangle is the landmark?", "The red triangle.")
    first["token_refer_id"][0] = -5
    again = enc("Which red triangle is the landmark?", "The red triangle.")
    assert calls == [" Which red triangle is the landmark?", "The red triangle."]
    assert torch.equal(again["token_refer_id"], question) and torch.equal(again["token_answer_id"], answer)
    enc.PAYLOAD_CACHE_SIZE = 2  # full: new texts are encoded every time and not kept
    enc("Where is the blue circle?")
    enc("Where is the blue circle?")
    assert calls[2:] == [" Where is the blue circle?", NO_TARGET_ANSWER] * 2
