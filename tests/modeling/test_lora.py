"""LoRA: only the intended parameters train; checkpoints round-trip; merging keeps outputs."""
import pytest
import torch

from model_utils import make_batch, tiny_config, trained_tokenizer
from segearthr1.modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from segearthr1.weights.pretrained import load_pretrained, save_pretrained

LORA = dict(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def lora_model(**lora):
    torch.manual_seed(0)
    return SegEarthR1ForReasoningSegmentation(tiny_config(lora={**LORA, **lora}))


def test_lora_trains_only_adapters_embeddings_and_heads():
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():  # make lora_B non-zero so the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(**make_batch("reason_seg")).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    llm_changed = {k for k in changed if k.startswith("language_model.")}
    assert llm_changed and all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in llm_changed), llm_changed
    assert any("lora_A" in k for k in llm_changed) and any("q_proj.lora" in k for k in llm_changed)
    assert not any(k.startswith("vision_encoder.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed) and any(k.startswith("connector.") for k in changed)
    assert not any("k_proj" in k or "fc1" in k for k in llm_changed)


def test_lora_without_embedding_training_freezes_the_whole_base_llm():
    model = lora_model(train_embeddings=False)
    trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_checkpoint_round_trip_and_merge(tmp_path):
    model = lora_model().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = make_batch("refer_seg")
    expected = model.predict(**batch).mask_logits
    save_pretrained(model, trained_tokenizer(), tmp_path / "ckpt")
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.predict(**batch).mask_logits, expected)
    assert loaded.merge_lora() == 2 * 2  # q_proj and v_proj in 2 layers
    assert not any("lora_" in k for k in loaded.state_dict())
    torch.testing.assert_close(loaded.predict(**batch).mask_logits, expected, atol=1e-4, rtol=1e-4)


def test_unknown_lora_target_is_an_error():
    with pytest.raises(ValueError, match="name no Linear"):
        lora_model(target_modules=["query_key_value"])
