"""Mask decoder: golden parity (mask_decoder.pt), key manifest, masked attention, grads, learned-query mode."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REFERENCE
from segearthr1.configuration import SegEarthR1Config
from segearthr1.modeling.mask_decoder import UNUSED_PARAMETERS, MaskDecoder


def _decoder(conv_dim: int, mask_dim: int, **mask_decoder) -> MaskDecoder:
    """The mask decoder of a config whose pixel decoder gives conv_dim-wide maps, mask_dim embeddings."""
    config = SegEarthR1Config(pixel_decoder=dict(conv_dim=conv_dim, mask_dim=mask_dim, num_heads=2),
                              mask_decoder=mask_decoder)
    return MaskDecoder.from_config(config)


def _from_fixture(fx: dict, **overrides) -> MaskDecoder:
    cfg = fx["meta"]["config"]
    assert not cfg["use_seg_query"]
    dec = _decoder(cfg["in_channels"], cfg["mask_dim"], hidden_dim=cfg["hidden_dim"], num_queries=cfg["num_queries"],
                   num_heads=cfg["nheads"], dim_feedforward=cfg["dim_feedforward"], num_layers=cfg["dec_layers"],
                   pre_norm=cfg["pre_norm"], enforce_input_project=cfg["enforce_input_project"], **overrides)
    dec.load_state_dict(fx["state_dict"], strict=True)
    return dec.eval()


def _tiny(conv_dim=64, **kw) -> MaskDecoder:
    args = dict(hidden_dim=32, num_queries=5, num_heads=2, dim_feedforward=64, num_layers=4)
    args.update(kw)
    return _decoder(conv_dim, 24, **args)


def _tiny_inputs(batch=2, in_channels=64, hidden=32, mask_dim=24):
    feats = [torch.randn(batch, in_channels, s, s) for s in (2, 4, 8)]
    return feats, torch.randn(batch, mask_dim, 16, 16), torch.randn(batch, 1, hidden)


def test_matches_reference(reference):
    fx = reference("mask_decoder.pt")
    dec = _from_fixture(fx)
    assert list(dec.state_dict()) == list(fx["state_dict"])  # same names in the same order
    with torch.no_grad():
        out = dec(fx["multi_scale_features"], fx["mask_features"], fx["SEG_embedding"])
    torch.testing.assert_close(out.pred_masks, fx["pred_masks"], atol=1e-5, rtol=1e-4)
    assert len(out.aux_pred_masks) == len(fx["aux_pred_masks"]) == 3
    for mine, ref in zip(out.aux_pred_masks, fx["aux_pred_masks"]):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    assert out.pred_seg_logits is None and out.aux_pred_seg_logits is None
    assert bool(fx["pred_SEG_logits_is_none"])


def test_full_size_names_and_shapes_match_upstream_manifest():
    manifest = json.loads((REFERENCE / "upstream_keys_full.json").read_text())
    upstream = {name[len("predictor."):]: tuple(shape) for name, shape, _, _ in manifest["state_dict"]
                if name.startswith("predictor.")}
    dec = MaskDecoder.from_config(SegEarthR1Config())  # defaults = the reference (9 built layers, 256 wide)
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == upstream
    never = {n[len("predictor."):] for n in manifest["never_receive_gradient"] if n.startswith("predictor.")}
    assert set(UNUSED_PARAMETERS) == never


def test_input_projection_only_when_needed():
    assert not any(k.startswith("input_proj") for k in _tiny(conv_dim=32).state_dict())
    assert "input_proj.2.weight" in _tiny(conv_dim=32, enforce_input_project=True).state_dict()
    assert tuple(_tiny(conv_dim=64).state_dict()["input_proj.0.weight"].shape) == (32, 64, 1, 1)


def test_masked_attention_hides_blocked_memory(reference):
    """Layer 1 attends to level 0 only where the initial prediction is foreground: changing the memory
    at blocked positions leaves its output unchanged, changing an allowed position does not."""
    fx = reference("mask_decoder.pt")
    dec = _from_fixture(fx)
    feats, mask_features, query = fx["multi_scale_features"], fx["mask_features"], fx["SEG_embedding"]
    with torch.no_grad():
        base = dec(feats, mask_features, query)
        level0 = feats[0]
        logits = F.interpolate(base.aux_pred_masks[0], size=level0.shape[-2:], mode="bilinear", align_corners=False)
        blocked = logits.sigmoid() < 0.5  # [B, 1, h, w]
        assert blocked.any() and not blocked.flatten(1).all(1).any()  # non-trivial mask, no fully-blocked row
        noise = torch.randn_like(level0)
        hidden = [level0 + noise * blocked, *feats[1:]]
        visible = [level0 + noise * ~blocked, *feats[1:]]
        out_hidden = dec(hidden, mask_features, query)
        out_visible = dec(visible, mask_features, query)
    torch.testing.assert_close(out_hidden.aux_pred_masks[1], base.aux_pred_masks[1], atol=1e-6, rtol=0)
    assert (out_visible.aux_pred_masks[1] - base.aux_pred_masks[1]).abs().max() > 1e-3


def test_fully_blocked_row_attends_everywhere():
    """If the previous prediction is background everywhere, the query attends to the whole level."""
    dec = _tiny(conv_dim=32, num_layers=1).eval()
    feats, mask_features, query = _tiny_inputs(batch=1, in_channels=32)
    with torch.no_grad():
        for p in dec.mask_embed.parameters():
            p.zero_()
        dec.mask_embed.layers[2].bias.fill_(-1.0)
        mask_features = mask_features.abs()  # logits = -sum(mask_features) < 0 everywhere: all blocked
        out = dec(feats, mask_features, query)
        assert (out.aux_pred_masks[0] < 0).all()
        # Reference behaviour: the all-blocked row is unblocked, i.e. the same as no mask at all.
        layer = dec.transformer_cross_attention_layers[0]
        memory = feats[0].flatten(2).permute(2, 0, 1) + dec.level_embed.weight[0][None, None]
        pos = dec.pe_layer(feats[0]).flatten(2).permute(2, 0, 1)
        expected = layer(query.transpose(0, 1), memory, None, pos)
        expected = dec.transformer_ffn_layers[0](dec.transformer_self_attention_layers[0](expected))
        expected_mask = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(dec.decoder_norm(expected).transpose(0, 1)),
                                     mask_features)
    torch.testing.assert_close(out.pred_masks, expected_mask, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_used_parameter():
    dec = _tiny().train()
    feats, mask_features, query = _tiny_inputs()
    out = dec(feats, mask_features, query)
    (out.pred_masks.square().mean() + sum(m.square().mean() for m in out.aux_pred_masks)).backward()
    unused = set(UNUSED_PARAMETERS)
    for name, p in dec.named_parameters():
        if name in unused:
            assert p.grad is None, f"{name} should take no part in description mode"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert unused <= {n for n, _ in dec.named_parameters()}


def test_learned_query_mode():
    dec = _tiny(query="learned").train()
    feats, mask_features, query = _tiny_inputs()
    out = dec(feats, mask_features, query)
    assert out.pred_masks.shape == (2, 5, 16, 16)
    assert out.pred_seg_logits.shape == (2, 5)
    assert len(out.aux_pred_masks) == len(out.aux_pred_seg_logits) == 4
    assert all(m.shape == (2, 5, 16, 16) for m in out.aux_pred_masks)
    # documented score: <SEG_proj(decoder_norm(q)), description> / sqrt(C) for the first (un-refined) queries
    with torch.no_grad():
        q0 = dec.SEG_proj(dec.decoder_norm(dec.query_feat.weight))
        expected = torch.einsum("qc,bc->bq", q0, query[:, 0]) / math.sqrt(32)
    torch.testing.assert_close(out.aux_pred_seg_logits[0], expected, atol=1e-5, rtol=1e-5)
    (out.pred_masks.square().mean() + out.pred_seg_logits.square().mean()).backward()
    for name in ("query_feat.weight", "query_embed.weight", "SEG_proj.layers.0.weight"):
        assert dec.get_parameter(name).grad is not None and dec.get_parameter(name).grad.abs().sum() > 0, name
    # without a description embedding the learned mode still segments, with no scores
    out = dec(feats, mask_features)
    assert out.pred_masks.shape == (2, 5, 16, 16) and out.pred_seg_logits is None


def test_batch_invariance(reference):
    fx = reference("mask_decoder.pt")
    dec = _from_fixture(fx)
    with torch.no_grad():
        single = dec([f[:1] for f in fx["multi_scale_features"]], fx["mask_features"][:1], fx["SEG_embedding"][:1])
    torch.testing.assert_close(single.pred_masks, fx["pred_masks"][:1], atol=1e-5, rtol=1e-4)
    for mine, ref in zip(single.aux_pred_masks, fx["aux_pred_masks"]):
        torch.testing.assert_close(mine, ref[:1], atol=1e-5, rtol=1e-4)


def test_argument_errors():
    dec = _tiny()
    feats, mask_features, query = _tiny_inputs()
    with pytest.raises(ValueError, match="feature levels"):
        dec(feats[:2], mask_features, query)
    with pytest.raises(ValueError, match="needs the description query"):
        dec(feats, mask_features, None)
    with pytest.raises(ValueError, match="expected"):
        dec(feats, mask_features, query[:, :, :16])
    with pytest.raises(ValueError, match=r"mask_decoder.query='both'.*'description', 'learned'"):
        _tiny(query="both")


def test_sdpa_attention_option_stays_within_tolerance_of_the_reference(reference):
    """The opt-in SDPA kernel is not bit-exact but stays within the fixture tolerance on this input."""
    fx = reference("mask_decoder.pt")
    model = _from_fixture(fx, sdpa_attention=True)
    model.eval()
    with torch.no_grad():
        out = model(fx["multi_scale_features"], fx["mask_features"], fx["SEG_embedding"])
    assert all(layer.sdpa for layer in model.transformer_cross_attention_layers)
    torch.testing.assert_close(out.pred_masks, fx["pred_masks"], atol=1e-4, rtol=1e-4)
