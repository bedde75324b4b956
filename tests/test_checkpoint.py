"""Checkpoint I/O: our format, reference releases, key inventory, initialisation from Phi + Mask2Former."""
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_utils import REFERENCE, TINY_PHI, make_batch, tiny_config, tiny_model, trained_tokenizer
from segearthr1.weights.key_maps import (UNUSED_REFERENCE_PARAMETERS, UPSTREAM_KEY_MAP, convert_upstream_state_dict,
                                         fuse_qkv, rename_to_upstream_key, rename_upstream_key, split_fused_qkv)
from segearthr1.configuration import SegEarthR1Config
from segearthr1.errors import CheckpointKeyError, CheckpointNotFoundError
from segearthr1.modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from segearthr1.weights.export import export_reference_release
from segearthr1.weights.initialisation import build_for_training
from segearthr1.weights.pretrained import load_pretrained, save_pretrained
from segearthr1.weights.reference_config import write_mask_config_yaml


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model().eval()
    save_pretrained(model, trained_tokenizer(), tmp_path / "ckpt")
    loaded, tokenizer = load_pretrained(tmp_path / "ckpt")
    _assert_same_state(model, loaded)
    assert tokenizer.convert_tokens_to_ids("[SEG]") == 999 and tokenizer.pad_token_id == 998
    batch = make_batch("reason_seg")
    assert torch.equal(model.predict(**batch).mask_logits, loaded.predict(**batch).mask_logits)
    assert loaded.config.to_dict() == model.config.to_dict()


def reference_tiny_model():
    """The reference hard-codes the description projector (512-d, 8 heads of 64): no config key carries
    it, so a reference release always has those dimensions; likewise the pixel decoder's FFN (1024)."""
    return tiny_model(description_projector={}, pixel_decoder=dict(conv_dim=32, mask_dim=32, num_heads=2,
                                                                    num_encoder_layers=1)).eval()


def test_reference_release_directory_loads_and_matches(tmp_path):
    model = reference_tiny_model()
    release = export_reference_release(model, trained_tokenizer(), tmp_path / "release")
    mask_yaml = write_mask_config_yaml(model.config, tmp_path / "mask.yaml")
    raw = load_file(str(release / "model.safetensors"))
    assert "model.layers.0.self_attn.query_key_value.weight" in raw and "seg_query" in raw
    assert json.loads((release / "config.json").read_text())["model_type"] == "llava_phi"
    loaded, _ = load_pretrained(release, mask_config=mask_yaml, image_size=64)
    _assert_same_state(model, loaded)
    batch = make_batch("refer_seg")
    torch.testing.assert_close(model.predict(**batch).mask_logits, loaded.predict(**batch).mask_logits,
                               atol=0, rtol=0)


def test_reference_release_with_base_chain(tmp_path):
    model = reference_tiny_model()
    release = export_reference_release(model, trained_tokenizer(), tmp_path / "release")
    write_mask_config_yaml(model.config, tmp_path / "child_base.yaml")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "child.yaml").write_text("_BASE_: ../child_base.yaml\nMODEL:\n  MASK_FORMER:\n    DROPOUT: 0.0\n")
    loaded, _ = load_pretrained(release, mask_config=tmp_path / "cfg" / "child.yaml", image_size=64)
    assert loaded.config.mask_decoder.num_layers == model.config.mask_decoder.num_layers


def test_wrong_checkpoint_lists_offending_keys(tmp_path):
    model = tiny_model()
    save_pretrained(model, trained_tokenizer(), tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    state["connector.bogus.weight"] = torch.zeros(1)
    del state["mask_decoder.decoder_norm.weight"]
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as err:
        load_pretrained(tmp_path / "ckpt")
    assert "connector.bogus.weight" in str(err.value) and "mask_decoder.decoder_norm.weight" in str(err.value)


def test_reference_checkpoint_with_unknown_key_is_rejected(tmp_path):
    model = reference_tiny_model()
    release = export_reference_release(model, trained_tokenizer(), tmp_path / "release")
    state = load_file(str(release / "model.safetensors"))
    state["something_new.weight"] = torch.zeros(1)
    save_file(state, str(release / "model.safetensors"))
    with pytest.raises(CheckpointKeyError, match="something_new.weight"):
        load_pretrained(release, mask_config=write_mask_config_yaml(model.config, tmp_path / "m.yaml"), image_size=64)


def test_missing_directory_names_the_layout(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nope")


def test_fused_qkv_layout_is_head_major():
    heads, head_dim, hidden = 4, 3, 12
    q, k, v = (torch.randn(heads * head_dim, hidden) for _ in range(3))
    fused = fuse_qkv(q, k, v, heads)
    # rows ordered (head, q|k|v, head_dim): head 1's k block starts at row (1*3 + 1) * head_dim
    torch.testing.assert_close(fused[(1 * 3 + 1) * head_dim:(1 * 3 + 2) * head_dim], k[head_dim:2 * head_dim])
    for a, b in zip(split_fused_qkv(fused, heads), (q, k, v)):
        assert torch.equal(a, b)


def test_rename_table_round_trips():
    for upstream, _ in UPSTREAM_KEY_MAP:
        key = upstream + "x.weight"
        assert rename_to_upstream_key(rename_upstream_key(key)) == key


def test_full_size_model_matches_released_inventory():
    """The default (full-size) model, built on the meta device, has exactly the released parameter
    names and shapes after the rename table (minus the documented unused keys; vocab rows aside)."""
    inventory = json.loads((REFERENCE / "upstream_keys_full.json").read_text())
    with torch.device("meta"):
        model = SegEarthR1ForReasoningSegmentation(SegEarthR1Config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = {"seg_query"}
    expected = {}
    for name, shape, _, _ in inventory["state_dict"]:
        if name in dropped:
            continue
        converted, _ = convert_upstream_state_dict({name: torch.empty(shape, device="meta")},
                                                   num_heads=model.config.text_config.num_attention_heads)
        for key, value in converted.items():
            expected[key] = tuple(value.shape)
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:10], sorted(set(expected) - set(ours))[:10])
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert sum(v.numel() for v in model.parameters()) + 100 * 2048 == inventory["num_parameters"]
    assert set(UNUSED_REFERENCE_PARAMETERS) == set(inventory["never_receive_gradient"])


# -------------------------------------------------------------------------------------------------
# initialisation for training from a local Phi directory and a Mask2Former .pkl

def _write_phi_dir(path, fused: bool):
    """A tiny 'pretrained' Phi HF directory in either layout, plus the raw tokenizer (no [PAD]/[SEG])."""
    from transformers import PhiConfig, PhiForCausalLM

    path.mkdir()
    config = {k: v for k, v in TINY_PHI.items() if k != "model_type"}
    config["vocab_size"] = 1024
    phi = PhiForCausalLM(PhiConfig(**config))
    state = {k: v.contiguous() for k, v in phi.state_dict().items()}
    if fused:
        heads = config["num_attention_heads"]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn"
            for kind in ("weight", "bias"):
                q, k, v = (state.pop(f"{p}.{n}.{kind}") for n in ("q_proj", "k_proj", "v_proj"))
                state[f"{p}.query_key_value.{kind}"] = fuse_qkv(q, k, v, heads)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "phi", **config}))
    for f in (REFERENCE / "tokenizer_tiny").iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return phi


def _write_mask2former_pkl(path, model):
    """A Mask2Former-format pickle holding the model's encoder/decoder weights in detectron2 names."""
    weights = {}
    for key, value in model.state_dict().items():
        value = value.numpy()
        if key.startswith("vision_encoder."):
            weights["backbone." + key[len("vision_encoder."):]] = value
        elif key.startswith("pixel_decoder."):
            rest = key[len("pixel_decoder."):]
            if rest.endswith(".0.bias") and rest.split(".")[0].split("_")[0] in ("adapter", "layer"):
                continue  # Mask2Former's FPN convs have no bias
            for name in ("adapter_1", "layer_1"):
                rest = rest.replace(f"{name}.0.weight", f"{name}.weight").replace(f"{name}.1.", f"{name}.norm.")
            weights["sem_seg_head.pixel_decoder." + rest] = value
        elif key.startswith("mask_decoder."):
            rest = key[len("mask_decoder."):]
            if rest.split(".")[0] in ("SEG_query_embed", "new_query_embed", "SEG_proj", "CLASS_proj"):
                continue
            weights["sem_seg_head.predictor." + rest.replace("query_feat.", "static_query.")] = value
    weights["sem_seg_head.predictor.class_embed.weight"] = np.zeros((134, 32), np.float32)
    weights["pixel_mean"] = np.zeros((3, 1, 1), np.float32)
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)


@pytest.mark.parametrize("fused", [True, False])
def test_build_for_training_from_phi_dir_and_mask2former(tmp_path, fused):
    phi = _write_phi_dir(tmp_path / "phi", fused)
    donor = tiny_model(seed=3)
    _write_mask2former_pkl(tmp_path / "m2f.pkl", donor)
    model, tokenizer = build_for_training(tiny_config(), tmp_path / "phi", tmp_path / "m2f.pkl")
    assert len(tokenizer) == 1000 and tokenizer.pad_token_id == 998 and model.config.seg_token_id == 999
    state = model.state_dict()
    emb = state["language_model.model.embed_tokens.weight"]
    assert emb.shape[0] == 1000
    # rows 0..997 come from the (1024-row) Phi checkpoint; adding [PAD] truncates to 999 rows and sets row 998
    # to the mean of rows 0..997; adding [SEG] grows to 1000 rows, so row 999 is a fresh N(0, 0.02) draw.
    torch.testing.assert_close(emb[:998], phi.model.embed_tokens.weight[:998])
    torch.testing.assert_close(emb[998], phi.model.embed_tokens.weight[:998].mean(0))
    assert not torch.allclose(emb[999], phi.model.embed_tokens.weight[999]) and emb[999].std() < 0.1
    assert "language_model.lm_head.bias" not in state
    torch.testing.assert_close(state["language_model.model.layers.1.self_attn.k_proj.weight"],
                               phi.model.layers[1].self_attn.k_proj.weight)
    donor_state = donor.state_dict()
    for key in ("vision_encoder.layers.2.blocks.0.attn.qkv.weight", "pixel_decoder.adapter_1.1.weight",
                "pixel_decoder.transformer.level_embed", "mask_decoder.query_feat.weight",
                "mask_decoder.transformer_ffn_layers.1.linear2.weight"):
        assert torch.equal(state[key], donor_state[key]), key
    assert torch.count_nonzero(state["pixel_decoder.adapter_1.0.bias"]) == 0  # left at c2-xavier init (zero)
    out = model(**make_batch("reason_seg", tokenizer=tokenizer))
    assert torch.isfinite(out.loss)


def test_mask2former_pkl_with_foreign_key_is_rejected(tmp_path):
    _write_phi_dir(tmp_path / "phi", fused=False)
    _write_mask2former_pkl(tmp_path / "m2f.pkl", tiny_model())
    with open(tmp_path / "m2f.pkl", "rb") as f:
        data = pickle.load(f)
    data["model"]["sem_seg_head.pixel_decoder.extra.weight"] = np.zeros(3, np.float32)
    with open(tmp_path / "m2f.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(CheckpointKeyError, match="pixel_decoder.extra.weight"):
        build_for_training(tiny_config(), tmp_path / "phi", tmp_path / "m2f.pkl")
