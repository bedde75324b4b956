"""Pixel decoder: golden parity (pixel_decoder.pt), full-size key manifest, init, grads, batch invariance."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REFERENCE
from segearthr1.configuration import SegEarthR1Config
from segearthr1.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from segearthr1.modeling.position_encoding import PositionEmbeddingSine


def _decoder(embed_dim: int, **pixel_decoder) -> MSDeformAttnPixelDecoder:
    """The pixel decoder of a config whose Swin maps are embed_dim * (1, 2, 4, 8) wide, strides 4..32."""
    config = SegEarthR1Config(vision=dict(embed_dim=embed_dim, depths=[1] * 4, num_heads=[1] * 4),
                              pixel_decoder=pixel_decoder)
    return MSDeformAttnPixelDecoder.from_config(config)


def _from_fixture_config(cfg: dict) -> MSDeformAttnPixelDecoder:
    embed_dim = cfg["input_channels"]["res2"]
    assert cfg["input_channels"] == {f"res{i}": embed_dim * 2 ** (i - 2) for i in range(2, 6)}
    assert cfg["input_strides"] == {f"res{i}": 2 ** i for i in range(2, 6)}
    return _decoder(
        embed_dim, conv_dim=cfg["conv_dim"], mask_dim=cfg["mask_dim"], num_heads=cfg["transformer_nheads"],
        num_points=4, ffn_dim=cfg["transformer_dim_feedforward"], num_encoder_layers=cfg["transformer_enc_layers"],
        dropout=cfg["transformer_dropout"], transformer_in_features=cfg["transformer_in_features"],
        common_stride=cfg["common_stride"])


def _tiny(**kw) -> MSDeformAttnPixelDecoder:
    args = dict(conv_dim=32, mask_dim=32, num_heads=2, num_points=2, ffn_dim=64, num_encoder_layers=1)
    args.update(kw)
    return _decoder(8, **args)


def _tiny_features(batch=2, size=64):
    """Maps of the _tiny decoder's Swin (embed_dim 8) for a size x size image."""
    return {f"res{i}": torch.randn(batch, 8 * 2 ** (i - 2), size // 2 ** i, size // 2 ** i) for i in range(2, 6)}


def test_matches_reference(reference):
    fx = reference("pixel_decoder.pt")
    dec = _from_fixture_config(fx["meta"]["config"])
    dec.load_state_dict(fx["state_dict"], strict=True)
    assert list(dec.state_dict()) == list(fx["state_dict"])  # same names in the same order
    dec.eval()
    with torch.no_grad():
        out = dec.forward_features(fx["features"])
    torch.testing.assert_close(out.mask_features, fx["mask_features"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.transformer_encoder_features, fx["transformer_encoder_features"], atol=1e-5, rtol=1e-4)
    assert len(out.multi_scale_features) == 3
    for mine, ref in zip(out.multi_scale_features, fx["multi_scale_features"]):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    assert [tuple(m.shape[-2:]) for m in out.multi_scale_features] == [(8, 8), (16, 16), (32, 32)]


def test_full_size_names_and_shapes_match_upstream_manifest():
    manifest = json.loads((REFERENCE / "upstream_keys_full.json").read_text())
    upstream = {name[len("pixel_decoder."):]: tuple(shape) for name, shape, _, _ in manifest["state_dict"]
                if name.startswith("pixel_decoder.")}
    dec = MSDeformAttnPixelDecoder.from_config(SegEarthR1Config())  # defaults = the released model
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == upstream


def test_reference_initialisation():
    dec = _tiny()
    for proj in dec.input_proj:
        assert proj[0].bias.abs().sum() == 0
    for conv in (dec.adapter_1[0], dec.layer_1[0], dec.mask_features):
        assert conv.bias.abs().sum() == 0
        # c2-xavier = kaiming_uniform(a=1): bound sqrt(3 / fan_in)
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= math.sqrt(3.0 / fan_in) + 1e-6
    layer = dec.transformer.encoder.layers[0].self_attn
    assert layer.sampling_offsets.weight.abs().sum() == 0 and layer.sampling_offsets.bias.abs().sum() > 0
    assert dec.transformer.level_embed.std() > 0.5  # normal(0, 1)


def test_fpn_relu_and_shapes():
    dec = _tiny().eval()
    with torch.no_grad():
        out = dec(_tiny_features())
    assert out.mask_features.shape == (2, 32, 16, 16)
    assert out.transformer_encoder_features.shape == (2, 32, 2, 2)
    assert [tuple(m.shape) for m in out.multi_scale_features] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    assert len(dec.adapter_1) == 3 and isinstance(dec.adapter_1[2], torch.nn.ReLU)  # lateral conv + GN + ReLU


def test_fpn_levels_follow_common_stride():
    """Built by hand (no config has a stride-2 map): one FPN level per halving below the finest level."""
    dec = MSDeformAttnPixelDecoder(input_channels={"res1": 8, "res2": 8, "res3": 16, "res4": 32, "res5": 64},
                                   input_strides={"res1": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32},
                                   conv_dim=32, mask_dim=16, num_heads=2, num_points=1, ffn_dim=32,
                                   num_encoder_layers=1, dropout=0.0, transformer_in_features=("res3", "res4", "res5"),
                                   common_stride=2, deform_attn_impl="pytorch")
    assert dec.num_fpn_levels == 2 and hasattr(dec, "adapter_2") and hasattr(dec, "layer_2")
    feats = _tiny_features(batch=1, size=64)
    feats["res1"] = torch.randn(1, 8, 32, 32)
    assert dec.eval()(feats).mask_features.shape == (1, 16, 32, 32)
    no_fpn = _tiny(common_stride=8).eval()  # mask features straight from the finest transformer level
    assert no_fpn.num_fpn_levels == 0 and not hasattr(no_fpn, "adapter_1")
    assert no_fpn(_tiny_features(batch=1)).mask_features.shape == (1, 32, 8, 8)


def test_gradients_reach_every_parameter():
    dec = _tiny().train()
    # At the reference init the offset/attention-weight matrices are zero, so the position code and
    # level embedding get an exactly-zero gradient; perturb (as the fixtures do) to see every path.
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = dec(_tiny_features(batch=1))
    loss = out.mask_features.square().mean() + sum(m.square().mean() for m in out.multi_scale_features)
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_invariance(reference):
    fx = reference("pixel_decoder.pt")
    dec = _from_fixture_config(fx["meta"]["config"])
    dec.load_state_dict(fx["state_dict"], strict=True)
    dec.eval()
    with torch.no_grad():
        single = dec.forward_features({k: v[:1] for k, v in fx["features"].items()})
    torch.testing.assert_close(single.mask_features, fx["mask_features"][:1], atol=1e-5, rtol=1e-4)
    for mine, ref in zip(single.multi_scale_features, fx["multi_scale_features"]):
        torch.testing.assert_close(mine, ref[:1], atol=1e-5, rtol=1e-4)


def test_sine_position_embedding_closed_form():
    feats, eps, temp = 4, 1e-6, 10000.0
    pe = PositionEmbeddingSine(num_pos_feats=feats, normalize=True)
    pos = pe(torch.zeros(2, 3, 5, 7))
    assert pos.shape == (2, 2 * feats, 5, 7)
    for i, j, k in [(0, 0, 0), (4, 6, 1), (2, 3, 3)]:
        y = (i + 1) / (5 + eps) * 2 * math.pi
        x = (j + 1) / (7 + eps) * 2 * math.pi
        dim_t = temp ** (2 * (k // 2) / feats)
        fn = math.sin if k % 2 == 0 else math.cos
        assert pos[1, k, i, j].item() == pytest.approx(fn(y / dim_t), abs=1e-6)  # y block first
        assert pos[1, feats + k, i, j].item() == pytest.approx(fn(x / dim_t), abs=1e-6)
    assert pe(torch.zeros(1, 1, 5, 7, dtype=torch.float64)).dtype == torch.float64
