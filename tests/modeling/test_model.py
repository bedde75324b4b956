"""The full model on tiny configs: outputs, losses, gradient flow, batching and backbones."""
import pytest
import torch

from model_utils import TINY_LLAMA, make_batch, tiny_model
from segearthr1.modeling.mask_decoder import UNUSED_PARAMETERS
from segearthr1.processing import IGNORE_LABEL_ID


@pytest.mark.parametrize("kind", ["reason_seg", "refer_seg"])
def test_forward_returns_losses(kind):
    model = tiny_model()
    out = model(**make_batch(kind))
    for name in ("loss", "loss_mask", "loss_dice", "loss_llm"):
        assert torch.isfinite(getattr(out, name)), name
    if kind == "refer_seg":
        assert out.loss_llm.item() == 0.0
    else:
        assert out.loss_llm.item() > 0.0
    torch.testing.assert_close(out.loss, out.loss_llm + out.loss_mask + out.loss_dice)
    assert out.pred_masks.shape == (2, 1, 16, 16)


def test_predict_returns_logits_at_input_size():
    model = tiny_model().eval()
    pred = model.predict(**make_batch("reason_seg"))
    assert pred.mask_logits.shape == (2, 64, 64) and pred.mask_logits.dtype == torch.float32
    assert torch.equal(pred.masks, pred.mask_logits > 0)


def test_answer_does_not_change_the_mask():
    """The answer follows the description positions in a causal LLM, so it cannot change the mask."""
    model = tiny_model().eval()
    batch = make_batch("reason_seg")
    other = dict(batch, token_answer_id=[torch.tensor([5, 6, 7, 999]), torch.tensor([999])])
    torch.testing.assert_close(model.predict(**batch).mask_logits, model.predict(**other).mask_logits)


@pytest.mark.parametrize("kind", ["reason_seg", "refer_seg"])
def test_gradient_flow(kind):
    model = tiny_model().train()
    with torch.no_grad():  # at the reference init some gradients are exactly 0 (zero-init offsets); perturb
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model(**make_batch(kind)).loss.backward()
    unused = {f"mask_decoder.{n}" for n in UNUSED_PARAMETERS}
    for name, param in model.named_parameters():
        if name.startswith("vision_encoder."):
            assert not param.requires_grad and param.grad is None, name
        elif name in unused or (kind == "refer_seg" and name == "language_model.lm_head.weight"):
            assert param.grad is None or param.grad.abs().sum() == 0, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"


def test_vision_encoder_runs_once_per_step():
    model = tiny_model()
    calls = []
    model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    model(**make_batch("reason_seg"))
    assert len(calls) == 1


def test_llm_uses_sdpa_and_no_attention_maps():
    model = tiny_model()
    assert model.language_model.config._attn_implementation == "sdpa"
    assert not model.language_model.config.output_attentions


def test_sample_alone_equals_sample_in_padded_batch():
    model = tiny_model().eval()
    batch = make_batch("reason_seg", batch_size=2)
    alone = {k: (v[1:2] if torch.is_tensor(v) else v[1:2]) for k, v in batch.items()}
    length = int(alone["attention_mask"].sum())
    for key in ("input_ids", "labels", "attention_mask", "refer_embedding_indices", "answer_embedding_indices"):
        alone[key] = alone[key][:, :length]
    torch.testing.assert_close(model.predict(**batch).mask_logits[1], model.predict(**alone).mask_logits[0],
                               atol=1e-5, rtol=1e-4)


def test_llm_loss_matches_full_logits_cross_entropy():
    """Computing logits only at target positions equals the reference's shifted CE over all positions."""
    model = tiny_model().eval()
    batch = make_batch("reason_seg")
    merged, hidden, _ = model._run(batch["input_ids"], batch["attention_mask"], batch["images"],
                                   batch["token_refer_id"], labels=batch["labels"],
                                   token_answer_id=batch["token_answer_id"])
    logits = model.get_output_embeddings()(hidden)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 merged.labels[:, 1:].reshape(-1), ignore_index=IGNORE_LABEL_ID)
    torch.testing.assert_close(model._lm_loss(hidden, merged.labels), expected)


def test_llama_backbone():
    model = tiny_model(text_config=TINY_LLAMA)
    out = model(**make_batch("reason_seg"))
    assert torch.isfinite(out.loss) and out.loss_llm > 0
    out.loss.backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_frozen_encoder_train_mode_follows_config():
    model = tiny_model().train()
    assert model.vision_encoder.training  # faithful: drop-path stays active
    model = tiny_model(vision=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   train_mode_when_frozen=False)).train()
    assert not model.vision_encoder.training and model.connector.training


def test_learned_query_ablation_trains():
    model = tiny_model(mask_decoder=dict(hidden_dim=32, num_heads=2, dim_feedforward=64, num_layers=2,
                                         num_queries=5, query="learned"))
    out = model(**make_batch("refer_seg"))
    assert torch.isfinite(out.loss) and out.loss_seg_class is not None
    out.loss.backward()
    assert model.mask_decoder.query_feat.weight.grad is not None
    pred = model.eval().predict(**make_batch("refer_seg"))
    assert pred.mask_logits.shape == (2, 64, 64)


def test_mixed_dataset_types_rejected():
    model = tiny_model()
    batch = make_batch("refer_seg")
    batch["dataset_type"] = ["refer_seg", "reason_seg"]
    with pytest.raises(ValueError, match="exactly one"):
        model(**batch)
