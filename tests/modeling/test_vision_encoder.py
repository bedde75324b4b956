"""SwinEncoder: golden parity with the reference backbone (swin.pt), drop-path, freeze, sizes."""
from __future__ import annotations

import pytest
import torch

from segearthr1.configuration import FEATURE_NAMES as NAMES
from segearthr1.configuration import IMAGE_CHANNELS, SegEarthR1Config, swin_feature_sizes
from segearthr1.modeling.vision_encoder import SwinEncoder


def encoder(**vision) -> SwinEncoder:
    """The encoder of a config with these `vision` fields (the others: defaults = Swin-B)."""
    return SwinEncoder.from_config(SegEarthR1Config(vision=vision))


def fixture_vision_config(fx: dict) -> dict:
    """The reference backbone's arguments recorded in swin.pt as `vision` config fields."""
    cfg = fx["meta"]["config"]
    assert cfg["in_chans"] == IMAGE_CHANNELS and not cfg["ape"]
    return {key: cfg[key] for key in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias",
                                      "drop_path_rate", "patch_size", "patch_norm")}


def fixture_encoder(fx: dict) -> SwinEncoder:
    enc = encoder(**fixture_vision_config(fx))
    enc.load_state_dict(fx["state_dict"], strict=True)
    return enc.eval()


def _tiny(**kwargs) -> SwinEncoder:
    args = dict(embed_dim=8, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, drop_path_rate=0.0)
    args.update(kwargs)
    return encoder(**args)


@pytest.mark.parametrize("inp, out", [("x1", "out1"), ("x2", "out2")])
def test_matches_reference_outputs(reference, inp, out):
    fx = reference("swin.pt")
    enc = fixture_encoder(fx)
    with torch.no_grad():
        feats = enc(fx[inp])
    assert list(feats) == list(NAMES)
    for name, ref in zip(NAMES, fx[out]):
        assert feats[name].shape == ref.shape, name
        torch.testing.assert_close(feats[name], ref, atol=1e-5, rtol=1e-4)


def _both_attention_paths(enc: SwinEncoder, x: torch.Tensor) -> tuple[dict, dict]:
    """(no-grad forward: qkv/proj on the real tokens only, forward with autograd on: the padded windows)."""
    enc.freeze()
    with torch.no_grad():
        real_tokens = enc(x)
    with torch.enable_grad():
        padded = enc(x)
    return real_tokens, padded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_attention_on_real_tokens_equals_the_padded_windows(reference, dtype):
    """Under no_grad a padded block projects only the real tokens (the padding row's qkv is the bias);
    the result must be the numbers of the padded-window path training uses: bit-identical in fp32."""
    fx = reference("swin.pt")
    enc = fixture_encoder(fx).to(dtype)
    x = torch.cat([fx["x1"], fx["x1"].flip(-1)]).to(dtype)  # 200 x 264: every stage padded, batch 2
    real_tokens, padded = _both_attention_paths(enc, x)
    for name in NAMES:
        if dtype == torch.float32:
            assert torch.equal(real_tokens[name], padded[name]), name
        else:
            torch.testing.assert_close(real_tokens[name], padded[name], atol=1e-2, rtol=1e-2, msg=name)
    # without a qkv bias the padding row is zeros (a random tiny encoder; odd sizes, shifted blocks)
    enc = _tiny(qkv_bias=False)
    real_tokens, padded = _both_attention_paths(enc, torch.randn(2, 3, 36, 28))
    for name in NAMES:
        assert torch.equal(real_tokens[name], padded[name]), name


def test_state_dict_layout_matches_reference(reference):
    fx = reference("swin.pt")
    enc = encoder(**fixture_vision_config(fx))
    ours = enc.state_dict()
    assert set(ours) == set(fx["state_dict"])
    for key, ref in fx["state_dict"].items():
        assert ours[key].shape == ref.shape, key
    # The index buffer is computed, persistent, int64 and identical to the reference (it was not perturbed).
    idx_key = "layers.0.blocks.1.attn.relative_position_index"
    assert ours[idx_key].dtype == torch.int64
    assert torch.equal(ours[idx_key], fx["state_dict"][idx_key])
    assert enc.out_channels == [32, 64, 128, 256]
    assert enc.out_strides == [4, 8, 16, 32]


def test_drop_path_only_in_train_mode():
    enc = _tiny(drop_path_rate=0.5)
    x = torch.randn(2, 3, 40, 36)
    enc.eval()
    with torch.no_grad():
        a, b = enc(x), enc(x)
    for name in NAMES:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    enc.train()
    with torch.no_grad():
        c, d = enc(x), enc(x)
    assert not torch.allclose(c["res5"], d["res5"])
    assert not torch.allclose(c["res5"], a["res5"])


def test_no_drop_path_rate_means_train_equals_eval():
    enc = _tiny(drop_path_rate=0.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        train_out = enc.train()(x)["res3"]
        eval_out = enc.eval()(x)["res3"]
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)


def test_drop_path_rates_are_linear_over_all_blocks():
    enc = _tiny(drop_path_rate=0.4, depths=(2, 1, 1, 1))
    rates = [float(getattr(blk.drop_path, "drop_prob", 0.0)) for stage in enc.layers for blk in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.4, 5))


def test_freeze_leaves_no_trainable_params_and_keeps_mode():
    enc = _tiny().train()
    assert any(p.requires_grad for p in enc.parameters())
    assert enc.freeze() is enc
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.training
    out = enc(torch.randn(1, 3, 32, 32))
    assert not out["res5"].requires_grad


def test_gradient_checkpointing_gives_same_grads():
    x = torch.randn(1, 3, 36, 28)
    enc = _tiny()
    ref_loss = sum(v.square().mean() for v in enc(x).values())
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    enc.use_checkpoint = True
    assert enc.use_checkpoint
    loss = sum(v.square().mean() for v in enc(x).values())
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for name, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_feature_sizes_helper():
    assert swin_feature_sizes(1024, 4) == [256, 128, 64, 32]
    assert swin_feature_sizes(200, 4) == [50, 25, 13, 7]
    enc = _tiny().eval()
    for size in (200, 64, 96, 37):
        with torch.no_grad():
            feats = enc(torch.randn(1, 3, size, size))
        assert [feats[n].shape[-1] for n in NAMES] == swin_feature_sizes(size, enc.patch_size)
        assert [feats[n].shape[-2] for n in NAMES] == swin_feature_sizes(size, enc.patch_size)
    with pytest.raises(ValueError, match="image_size"):
        swin_feature_sizes(0, 4)


def test_shifted_window_path_is_exercised():
    """A second (shifted) block must change the output relative to an unshifted copy of it."""
    enc = _tiny(depths=(2, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        shifted = enc(x)["res2"]
        enc.layers[0].blocks[1].shift_size = 0
        unshifted = enc(x)["res2"]
    assert not torch.allclose(shifted, unshifted)


def test_rejects_non_image_input():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        _tiny()(torch.randn(3, 32, 32))


def test_full_size_swin_b_matches_release_inventory():
    """Default SwinEncoder == the released model's ``model.vision_tower.*`` names and shapes (meta device)."""
    import json

    from conftest import REFERENCE

    inventory = json.loads((REFERENCE / "upstream_keys_full.json").read_text())["state_dict"]
    prefix = "model.vision_tower."
    expected = {name[len(prefix):]: tuple(shape) for name, shape, *_ in inventory if name.startswith(prefix)}
    with torch.device("meta"):
        enc = SwinEncoder.from_config(SegEarthR1Config())  # defaults = Swin-B
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == expected
    assert enc.out_channels == [128, 256, 512, 1024]
