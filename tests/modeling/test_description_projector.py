"""Description projector: golden perceiver parity, batched == per-sample, explicit formula, grads, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segearthr1.configuration import SegEarthR1Config
from segearthr1.modeling.description_projector import DescriptionProjector, PerceiverResampler

H, C, DIM, OUT, HEADS, DIM_HEAD = 24, 16, 32, 12, 4, 8


def _projector(**kwargs) -> DescriptionProjector:
    """From a config: LLM width H, res5 width C (Swin embed_dim C/8), mask-decoder width OUT."""
    config = SegEarthR1Config(
        text_config=dict(model_type="phi", vocab_size=100, hidden_size=H, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2),
        vision=dict(embed_dim=C // 8, depths=[1] * 4, num_heads=[1] * 4),
        description_projector=dict(dim=DIM, num_heads=HEADS, dim_head=DIM_HEAD, **kwargs),
        mask_decoder=dict(hidden_dim=OUT, num_heads=2))
    return DescriptionProjector.from_config(config)


def _batch(b: int = 3, length: int = 14):
    hidden = torch.randn(b, length, H)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0, [3]] = True                      # T = 1
    mask[1, [2, 4, 5, 9, 13]] = True          # T = 5, not contiguous, reaches the last position
    mask[2, 1:10] = True                      # T = 9
    visual = torch.randn(b, C, 3, 4)
    return hidden, mask, visual


def test_perceiver_matches_reference(reference):
    fx = reference("description_projector.pt")
    cfg = fx["meta"]["config"]
    m = PerceiverResampler(dim=cfg["dim"], depth=cfg["depth"], dim_head=cfg["dim_head"], num_heads=cfg["heads"],
                           ff_mult=cfg["ff_mult"])
    m.load_state_dict(fx["state_dict"], strict=True)
    m.eval()
    with torch.no_grad():
        y = m(latents=fx["latents"], x=fx["x"])
    assert y.shape == fx["y"].shape == (1, 1, 512)
    torch.testing.assert_close(y, fx["y"], atol=1e-5, rtol=1e-4)


def test_perceiver_output_ignores_all_but_the_first_latent():
    """Reference quirk: k/v see only latent 0 and only latent 0 is returned."""
    m = PerceiverResampler(dim=DIM, depth=2, dim_head=DIM_HEAD, num_heads=HEADS, ff_mult=1).eval()
    latents, x = torch.randn(2, 1, 5, DIM), torch.randn(2, 1, 7, DIM)
    other = latents.clone()
    other[:, :, 1:] = torch.randn_like(other[:, :, 1:]) * 10
    with torch.no_grad():
        torch.testing.assert_close(m(latents, x), m(other, x), atol=1e-5, rtol=1e-4)
        changed = latents.clone()
        changed[:, :, 0] += torch.randn_like(changed[:, :, 0])
        assert not torch.allclose(m(latents, x), m(changed, x))


def test_state_dict_names():
    proj = _projector()
    keys = set(proj.state_dict())
    top = {k.split(".")[0] for k in keys}
    assert top == {"text_projector", "origin_SEG_token_projector", "local_project", "SEG_token_projector",
                   "d_layers"}
    assert "d_layers.layers.0.1.3.weight" in keys and "d_layers.layers.0.0.to_kv.weight" in keys
    assert proj.SEG_token_projector.in_features == 2 * DIM
    assert proj.local_project.in_features == C


def test_batched_equals_per_sample():
    proj = _projector().eval()
    hidden, mask, visual = _batch()
    with torch.no_grad():
        batched = proj(hidden, mask, visual)
        assert batched.shape == (3, 1, OUT)
        for i in range(3):
            # Each sample alone, with only its own (unpadded) description positions.
            single = proj(hidden[i:i + 1], mask[i:i + 1], visual[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-4)
            trimmed = proj(hidden[i:i + 1, mask[i]], torch.ones(1, int(mask[i].sum()), dtype=torch.bool),
                           visual[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], trimmed, atol=1e-5, rtol=1e-4)


def _explicit_reference_formula(proj: DescriptionProjector, hidden: torch.Tensor, mask: torch.Tensor,
                                visual: torch.Tensor) -> torch.Tensor:
    """Single sample, written out op by op from DESIGN.md §2.5 (explicit softmax, all latents)."""
    d_all = hidden[mask]                                              # [T, H]
    d_mean = d_all.mean(dim=0, keepdim=True)                          # [1, H]
    lin = lambda layer, t: F.linear(t, layer.weight, layer.bias)      # noqa: E731
    origin = lin(proj.origin_SEG_token_projector, d_mean)             # [1, dim]
    lat = lin(proj.text_projector, torch.cat([d_mean, d_all]))        # [1+T, dim]
    media = lin(proj.local_project, visual.reshape(visual.shape[0], -1).T)  # [h*w, dim]
    attn, ff = proj.d_layers.layers[0]
    ln = lambda norm, t: F.layer_norm(t, (DIM,), norm.weight, norm.bias)  # noqa: E731
    x_n, l_n = ln(attn.norm_media, media), ln(attn.norm_latents, lat)
    q = l_n @ attn.to_q.weight.T
    kv = torch.cat([x_n, l_n[0:1]]) @ attn.to_kv.weight.T
    k, v = kv[:, :HEADS * DIM_HEAD], kv[:, HEADS * DIM_HEAD:]
    heads_out = []
    for h in range(HEADS):
        sl = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
        sim = (q[:, sl] * DIM_HEAD ** -0.5) @ k[:, sl].T
        sim = sim - sim.max(dim=-1, keepdim=True).values
        heads_out.append(torch.softmax(sim, dim=-1) @ v[:, sl])
    lat = torch.cat(heads_out, dim=-1) @ attn.to_out.weight.T + lat
    hidden_ff = F.gelu(ln(ff[0], lat) @ ff[1].weight.T)
    lat = hidden_ff @ ff[3].weight.T + lat
    fused = ln(proj.d_layers.norm, lat)[0:1]                          # [1, dim]
    return lin(proj.SEG_token_projector, torch.cat([origin, fused], dim=-1))  # [1, out]


def test_matches_explicit_formula():
    proj = _projector().eval()
    with torch.no_grad():  # non-trivial biases / LayerNorm affines
        for p in proj.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    hidden, mask, visual = _batch()
    with torch.no_grad():
        ours = proj(hidden, mask, visual)
        for i in (1, 2):
            expected = _explicit_reference_formula(proj, hidden[i], mask[i], visual[i])
            torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_every_parameter():
    proj = _projector()
    hidden, mask, visual = _batch()
    hidden.requires_grad_(True)
    proj(hidden, mask, visual).square().sum().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Gradient flows to description positions only.
    assert hidden.grad[~mask].abs().sum() == 0
    assert (hidden.grad[mask].abs().sum(dim=-1) > 0).all()


def test_empty_description_row_is_an_error():
    proj = _projector()
    hidden, mask, visual = _batch()
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        proj(hidden, mask, visual)


def test_shape_errors():
    proj = _projector()
    hidden, mask, visual = _batch()
    with pytest.raises(ValueError, match="description_mask"):
        proj(hidden, mask[:, :5], visual)
    with pytest.raises(ValueError, match=f"C={C}"):
        proj(hidden, mask, torch.randn(3, C + 1, 3, 4))
    with pytest.raises(ValueError, match="visual_features"):
        proj(hidden, mask, None)


def test_kind_validation_and_none_ablation():
    with pytest.raises(ValueError, match="description_projector.kind='mlp'"):
        _projector(kind="mlp")
    proj = _projector(kind="none")
    assert set(proj.state_dict()) == {"SEG_token_projector.weight", "SEG_token_projector.bias"}
    hidden, mask, _ = _batch()
    out = proj(hidden, mask)
    d_mean = torch.stack([hidden[i][mask[i]].mean(dim=0) for i in range(3)])
    expected = (d_mean @ proj.SEG_token_projector.weight.T + proj.SEG_token_projector.bias).unsqueeze(1)
    torch.testing.assert_close(out, expected)
    assert out.shape == (3, 1, OUT)


def test_full_size_projector_matches_release_inventory():
    """Phi-1.5 (2048) + Swin-B res5 (1024) -> 256: names/shapes as in the released model (top level)."""
    import json

    from conftest import REFERENCE

    inventory = json.loads((REFERENCE / "upstream_keys_full.json").read_text())["state_dict"]
    with torch.device("meta"):
        proj = DescriptionProjector.from_config(SegEarthR1Config())  # defaults = the released model
    ours = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    roots = {k.split(".")[0] for k in ours}
    expected = {name: tuple(shape) for name, shape, *_ in inventory if name.split(".")[0] in roots}
    assert ours == expected
