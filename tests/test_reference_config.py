"""The reference-config table: ours -> reference -> ours is the identity on what the reference can carry,
the released config.json still translates as before, and every field of ours is accounted for."""
import fnmatch
import json
from pathlib import Path

import pytest
from model_utils import REFERENCE, tiny_config

from segearthr1.configuration import PHI_1_5_TEXT_CONFIG, SUB_CONFIGS, SegEarthR1Config
from segearthr1.training.args import build_model_kwargs, resolve_run_config
from segearthr1.weights.reference_config import (MASK_CONFIG_TABLE, NOT_IN_REFERENCE, RELEASE_CONFIG_TABLE,
                                                 TEXT_CONFIG_TABLES, config_from_reference, load_mask_config,
                                                 mask_config_from, mask_config_to_sections, release_config_from)

ROOT = Path(__file__).resolve().parent.parent


def _round_trip(config: SegEarthR1Config) -> SegEarthR1Config:
    return config_from_reference(release_config_from(config), mask_config_from(config), image_size=config.image_size,
                                 seg_token_id=config.seg_token_id, pad_token_id=config.pad_token_id)


def _flat(config: SegEarthR1Config) -> dict:
    """to_dict() with sub-config fields as dotted keys (`vision.embed_dim`)."""
    out = config.to_dict()
    for name in SUB_CONFIGS:
        out.update({f"{name}.{k}": v for k, v in out.pop(name).items()})
    return out


def _not_in_reference(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_IN_REFERENCE)


def _tiny_yaml_config() -> SegEarthR1Config:
    config, _ = resolve_run_config(ROOT / "configs" / "tiny.yaml")
    return SegEarthR1Config(**build_model_kwargs(config["model"]))


def test_default_config_round_trips_exactly():
    config = SegEarthR1Config(seg_token_id=50296, pad_token_id=50295)
    assert _round_trip(config).to_dict() == config.to_dict()


@pytest.mark.parametrize("make", [tiny_config, _tiny_yaml_config], ids=["tests-tiny", "configs-tiny"])
def test_tiny_configs_round_trip_on_every_field_the_reference_carries(make):
    config = make()
    back, default = _flat(_round_trip(config)), _flat(SegEarthR1Config())
    original = _flat(config)
    carried = {k for k in original if not _not_in_reference(k) or k in ("image_size", "seg_token_id", "pad_token_id")}
    assert {k: back[k] for k in carried} == {k: original[k] for k in carried}
    # what the reference cannot carry comes back as the reference's hard-coded value (our default)
    assert {k: back[k] for k in original if k not in carried} == {k: default[k] for k in original if k not in carried}
    assert any(original[k] != default[k] for k in original if k not in carried)  # the tiny configs do differ there


def test_every_field_is_in_the_table_or_declared_not_in_the_reference():
    tabled = {ours for table in (MASK_CONFIG_TABLE, RELEASE_CONFIG_TABLE) for entry in table for ours in entry.ours}
    fields = {k for k in _flat(SegEarthR1Config()) if "." in k}
    assert fields - tabled == {k for k in fields if _not_in_reference(k)}
    assert not {k for k in tabled if _not_in_reference(k)}  # no field is claimed by both


def test_released_config_translates_as_before():
    release = json.loads((REFERENCE / "release_config_rrsisd.json").read_text())
    config = config_from_reference(release, None, seg_token_id=50296, pad_token_id=50295)
    text = {**PHI_1_5_TEXT_CONFIG, "vocab_size": 50297, "bos_token_id": 1, "eos_token_id": 2}
    assert config.to_dict() == SegEarthR1Config(text_config=text, seg_token_id=50296, pad_token_id=50295).to_dict()
    assert config.connector.kind == "sparse_conv" and config.image_size == 1024
    # and the released mask config gives the defaults (= the released model's dimensions)
    mask = load_mask_config(ROOT / "configs" / "mask2former" / "swin" / "maskformer2_swin_base_384_bs16_50ep.yaml")
    with_mask = config_from_reference(release, mask, seg_token_id=50296, pad_token_id=50295)
    assert with_mask.to_dict() == config.to_dict()


def test_connector_alias_both_directions():
    assert release_config_from(SegEarthR1Config())["mm_projector_type"] == "SparseConv_1"
    assert release_config_from(SegEarthR1Config(connector={"kind": "linear"}))["mm_projector_type"] == "linear"
    release = {**release_config_from(SegEarthR1Config()), "mm_projector_type": "mlp2x_gelu"}
    assert config_from_reference(release, {}).connector.kind == "mlp2x_gelu"


def test_dec_layers_counts_one_more_layer_than_built():
    assert mask_config_from(SegEarthR1Config())["MODEL"]["MASK_FORMER"]["DEC_LAYERS"] == 10
    sections = mask_config_to_sections({"MODEL": {"MASK_FORMER": {"DEC_LAYERS": 4}}})
    assert sections["mask_decoder"] == {"num_layers": 3}
    with pytest.raises(ValueError, match=r"MODEL\.MASK_FORMER\.DEC_LAYERS=1"):
        mask_config_to_sections({"MODEL": {"MASK_FORMER": {"DEC_LAYERS": 1}}})


def test_one_reference_key_for_two_fields_must_agree_on_export():
    config = SegEarthR1Config(pixel_decoder={"num_heads": 4}, mask_decoder={"num_heads": 8})
    with pytest.raises(ValueError, match=r"NHEADS.*pixel_decoder\.num_heads=4, mask_decoder\.num_heads=8"):
        mask_config_from(config)


def test_export_refuses_a_non_phi_llm():
    from model_utils import TINY_LLAMA

    with pytest.raises(ValueError, match="text_config.model_type='llama'"):
        release_config_from(tiny_config(text_config=TINY_LLAMA))
    assert "rms_norm_eps" in {e.reference for e in TEXT_CONFIG_TABLES["llama"]}  # llama releases still load
