"""Connectors: golden parity of SparseConv_1 (connector.pt), size checks, registry, ablation variants."""
from __future__ import annotations

import pytest
import torch

from segearthr1.configuration import CONNECTOR_KINDS, REFERENCE_CONNECTOR_NAMES, SegEarthR1Config
from segearthr1.modeling.connector import (
    CONNECTORS,
    IdentityConnector,
    LinearConnector,
    MLPGeluConnector,
    SparseConvConnector,
    build_connector,
)


def _config(kind: str, res5_channels: int, llm_hidden: int, res5_size: int, **connector) -> SegEarthR1Config:
    """A config whose Swin gives `res5_channels` x `res5_size`² maps and whose LLM is `llm_hidden` wide."""
    return SegEarthR1Config(
        text_config=dict(model_type="phi", vocab_size=100, hidden_size=llm_hidden, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2),
        image_size=res5_size * 32, vision=dict(embed_dim=res5_channels // 8, depths=[1] * 4, num_heads=[1] * 4),
        connector=dict(kind=kind, **connector))


def _sparse_conv(in_channels: int, out_channels: int, feature_size: int) -> SparseConvConnector:
    return SparseConvConnector(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                               kernel_size=3, stride=2)


def test_sparse_conv_matches_reference(reference):
    fx = reference("connector.pt")
    cfg = fx["meta"]["config"]
    conn = build_connector(_config("SparseConv_1", cfg["c1"], cfg["c2"], 2 * cfg["size"],
                                   kernel_size=cfg["patch_size"], stride=cfg["stride"]))
    assert type(conn) is SparseConvConnector
    conn.load_state_dict(fx["state_dict"], strict=True)
    conn.eval()
    with torch.no_grad():
        y = conn(fx["x"])
    assert y.shape == fx["y"].shape == (2, 64, 48)
    torch.testing.assert_close(y, fx["y"], atol=1e-5, rtol=1e-4)
    assert conn.num_tokens() == 64 == conn.num_tokens(32)


def test_sparse_conv_layer_norm_shapes_follow_feature_size():
    conn = _sparse_conv(8, 6, feature_size=32)
    assert tuple(conn.norm1.normalized_shape) == (6, 16, 16)
    assert tuple(conn.norm2.normalized_shape) == (6, 8, 8)
    odd = _sparse_conv(8, 6, feature_size=25)
    assert tuple(odd.norm1.normalized_shape) == (6, 13, 13)
    assert tuple(odd.norm2.normalized_shape) == (6, 7, 7)
    y = odd(torch.randn(2, 8, 25, 25))
    assert y.shape == (2, 49, 6) and odd.num_tokens() == 49


def test_sparse_conv_tokens_are_row_major():
    conn = _sparse_conv(4, 3, feature_size=8).eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        tokens = conn(x)
        grid = conn.fc(conn.norm2(conn.proj2(conn.norm1(conn.proj1(x)))))  # [1, 3, 2, 2]
    torch.testing.assert_close(tokens[0, 1], grid[0, :, 0, 1])  # token 1 = row 0, col 1
    torch.testing.assert_close(tokens[0, 2], grid[0, :, 1, 0])


def test_sparse_conv_wrong_size_is_a_clear_error():
    conn = _sparse_conv(8, 6, feature_size=32)
    with pytest.raises(ValueError, match=r"\[B, C, 32, 32\].*\(1, 8, 16, 16\)"):
        conn(torch.randn(1, 8, 16, 16))
    with pytest.raises(ValueError, match="feature_size=32"):
        conn.num_tokens(16)


@pytest.mark.parametrize("kind, cls", [
    ("sparse_conv", SparseConvConnector), ("SparseConv_1", SparseConvConnector), ("linear", LinearConnector),
    ("mlp2x_gelu", MLPGeluConnector), ("identity", IdentityConnector),
])
def test_build_connector_both_namings(kind, cls):
    width = 8
    conn = build_connector(_config(kind, width, width, res5_size=8))
    assert type(conn) is cls
    y = conn(torch.randn(2, width, 8, 8))
    assert y.shape == (2, conn.num_tokens(), width)


def test_registry_is_keyed_by_the_config_kinds():
    assert set(CONNECTORS) == set(CONNECTOR_KINDS)
    assert set(REFERENCE_CONNECTOR_NAMES.values()) <= set(CONNECTOR_KINDS)


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match=r"connector.kind='conv3d'.*sparse_conv"):
        _config("conv3d", 8, 8, 8)


def test_identity_requires_equal_widths():
    with pytest.raises(ValueError, match="connector.kind='identity' needs res5 channels"):
        _config("identity", 8, 16, 8)
    x = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(IdentityConnector(in_channels=4, out_channels=4, feature_size=3)(x),
                               x.flatten(2).transpose(1, 2))


def test_flat_connector_parameter_names_and_math():
    lin = LinearConnector(in_channels=4, out_channels=6, feature_size=3)
    assert set(lin.state_dict()) == {"weight", "bias"}  # the reference builds a bare nn.Linear
    mlp = MLPGeluConnector(in_channels=4, out_channels=6, feature_size=3)
    assert set(mlp.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(2, 4, 3, 3)
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(lin(x), tokens @ lin.weight.T + lin.bias)
    hidden = torch.nn.functional.gelu(tokens @ mlp[0].weight.T + mlp[0].bias)
    torch.testing.assert_close(mlp(x), hidden @ mlp[2].weight.T + mlp[2].bias)
    assert lin.num_tokens() == 9 and lin.num_tokens(32) == 1024


@pytest.mark.parametrize("kind", ["sparse_conv", "linear", "mlp2x_gelu"])
def test_gradients_reach_every_parameter(kind):
    conn = build_connector(_config(kind, 8, 6, res5_size=8))
    conn(torch.randn(2, 8, 8, 8)).square().sum().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_full_size_connector_matches_release_inventory():
    """SparseConv_1 for Swin-B res5 (1024 ch, 32x32) -> Phi-1.5 (2048) == ``model.mm_projector.*``."""
    import json

    from conftest import REFERENCE

    inventory = json.loads((REFERENCE / "upstream_keys_full.json").read_text())["state_dict"]
    prefix = "model.mm_projector."
    expected = {name[len(prefix):]: tuple(shape) for name, shape, *_ in inventory if name.startswith(prefix)}
    with torch.device("meta"):
        conn = build_connector(SegEarthR1Config())  # defaults = the released model
    assert {k: tuple(v.shape) for k, v in conn.state_dict().items()} == expected
    assert conn.num_tokens() == 64
