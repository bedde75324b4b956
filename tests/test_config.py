"""Run configs: every shipped YAML loads and validates; inheritance, overrides and flags behave."""
import json
from pathlib import Path

import pytest
import yaml

from segearthr1.config_io import load_yaml_config
from segearthr1.configuration import SegEarthR1Config
from segearthr1.training.args import (REFERENCE_FLAG_PATHS, build_model_kwargs, resolve_run_config,
                                      split_cli_pairs)

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "mask2former" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = resolve_run_config(path)
    model_config = SegEarthR1Config(**build_model_kwargs(config["model"]))
    assert model_config.image_size > 0
    assert config["train"].get("output_dir")


def test_ablation_files_hold_only_their_change():
    for path in (ROOT / "configs" / "ablations").glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert raw["base"] == "../earthreason.yaml", path
        leaves = sum(1 for section in ("model", "data", "init") for _ in _leaves(raw.get(section, {})))
        assert 1 <= leaves <= 4, f"{path.name} changes {leaves} keys"


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


def _model_config(path) -> dict:
    config, _ = resolve_run_config(path)
    return SegEarthR1Config(**build_model_kwargs(config["model"])).to_dict()


def test_ablation_changes_only_its_switch(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = _model_config(ROOT / "configs" / "earthreason.yaml")
    ablated = _model_config(ROOT / "configs" / "ablations" / "no_description_projector.yaml")
    assert ablated["description_projector"]["kind"] == "none"
    assert base["description_projector"]["kind"] == "perceiver"
    assert {k: v for k, v in ablated.items() if k != "description_projector"} == \
        {k: v for k, v in base.items() if k != "description_projector"}


def _dotted_leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _dotted_leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_model_sections_hold_only_changes_to_the_dataclass_defaults(path):
    """Each model number lives once, in configuration.py: a YAML repeating a default is a second copy.
    (text_config is exempt: a given text_config replaces the Phi-1.5 one whole, it is not merged.)"""
    defaults = SegEarthR1Config().to_dict()
    section = yaml.safe_load(path.read_text()).get("model", {})
    for dotted, value in _dotted_leaves({k: v for k, v in section.items() if k != "text_config"}):
        node = defaults
        for part in dotted.split("."):
            node = node[part]
        assert node != value, f"{path.name}: model.{dotted}={value!r} repeats the dataclass default"


def test_base_recipe_is_the_dataclass_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "model" not in yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    assert _model_config(ROOT / "configs" / "earthreason.yaml") == SegEarthR1Config().to_dict()


def test_reference_recipe_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = resolve_run_config(ROOT / "configs" / "rrsisd.yaml")
    train = config["train"]
    assert (train["learning_rate"], train["num_train_epochs"], train["lr_scheduler_type"]) == (1e-4, 15, "cosine")
    assert train["deepspeed"] == "scripts/zero2.json" and train["bf16"] and train["gradient_checkpointing"]
    assert SegEarthR1Config(**build_model_kwargs(config["model"])).to_dict() == SegEarthR1Config().to_dict() | {
        "text_config": SegEarthR1Config().to_dict()["text_config"]}


@pytest.mark.parametrize("body, message", [
    ("base: ok.yaml\nmodel: {conector: {kind: linear}}\n", "model.conector"),
    ("base: ok.yaml\nmodel: {connector: {knd: linear}}\n", "did you mean kind"),
    ("base: ok.yaml\ntrain: {learning_rat: 1}\n", "did you mean learning_rate"),
    ("base: ok.yaml\ndata: {dataset: EarthReason, question_sampling: every}\n", "question_sampling"),
    ("trainer: {}\n", "top-level"),
])
def test_unknown_keys_are_errors(tmp_path, body, message):
    (tmp_path / "ok.yaml").write_text("init: {tokenizer_path: tok}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(body)
    with pytest.raises(ValueError, match=message):
        resolve_run_config(bad)


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {dataset: RefSegRS}\ntrain: {learning_rate: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {learning_rate: 0.1}\n")
    merged = load_yaml_config(tmp_path / "b.yaml")
    assert merged["train"]["learning_rate"] == 0.1 and merged["data"]["dataset"] == "RefSegRS"
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_yaml_config(tmp_path / "b.yaml")


def test_overrides_env_and_reference_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SEGEARTH_DATA", str(tmp_path))
    flags = split_cli_pairs(["--model_name_or_path", "pretrained/phi", "--dataset_type", "rrsisd",
                             "--train_backbone", "True", "--bf16", "--warmup_ratio", "0.05",
                             "--mm_projector_type", "SparseConv_1", "--version", "llava_phi",
                             "--per_device_train_batch_size=4"])
    config, ignored = resolve_run_config(ROOT / "configs" / "earthreason.yaml", ["train.learning_rate=3e-5"], flags)
    assert config["data"]["data_path"] == str(tmp_path)
    assert config["init"]["llm_path"] == "pretrained/phi" and config["data"]["dataset"] == "RRSIS-D"
    assert config["model"]["vision"]["frozen"] is False and config["train"]["bf16"] is True
    assert config["train"]["warmup_steps"] == 0.05 and config["train"]["per_device_train_batch_size"] == 4
    assert config["train"]["learning_rate"] == 3e-5 and ignored == ["version"]
    with pytest.raises(ValueError, match="--no_such_flag"):
        resolve_run_config(ROOT / "configs" / "earthreason.yaml", [], [("no_such_flag", "1")])
    assert set(REFERENCE_FLAG_PATHS) >= {"data_path", "model_name_or_path", "vision_tower", "mask_config",
                                        "dataset_type", "mm_projector_type"}


def test_mask_config_supplies_decoder_dims(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = resolve_run_config(ROOT / "configs" / "earthreason.yaml", [], [
        ("mask_config", "configs/mask2former/swin/maskformer2_swin_base_384_bs16_50ep.yaml")])
    model = SegEarthR1Config(**build_model_kwargs(config["model"]))
    assert model.mask_decoder.num_layers == 9 and model.pixel_decoder.num_encoder_layers == 6
    assert list(model.vision.depths) == [2, 2, 18, 2]


def test_mask_config_values_reach_the_model(tmp_path, monkeypatch):
    """base.yaml no longer repeats the defaults, so a mask config's dimensions are not shadowed by it."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "mask.yaml").write_text("MODEL: {SWIN: {DEPTHS: [2, 2, 6, 2]}, MASK_FORMER: {DEC_LAYERS: 7}}\n")
    flags = [("mask_config", str(tmp_path / "mask.yaml"))]
    config, _ = resolve_run_config(ROOT / "configs" / "earthreason.yaml", [], flags)
    model = SegEarthR1Config(**build_model_kwargs(config["model"]))
    assert model.mask_decoder.num_layers == 6 and list(model.vision.depths) == [2, 2, 6, 2]


TINY_TEXT = dict(model_type="phi", vocab_size=100, hidden_size=48, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pixel_decoder={"transformer_in_features": ["res2", "res3", "res4", "res5"]}),
     r"pixel_decoder.transformer_in_features=.*exactly 3 distinct levels"),
    (dict(pixel_decoder={"transformer_in_features": ["res4", "res5"]}), r"transformer_in_features=.*exactly 3"),
    (dict(pixel_decoder={"transformer_in_features": ["res3", "res3", "res5"]}), r"transformer_in_features=.*distinct"),
    (dict(pixel_decoder={"transformer_in_features": ["res2", "res4", "res5"]}), r"res2 is the FPN level"),
    (dict(pixel_decoder={"deform_attn_impl": "triton"}), r"pixel_decoder.deform_attn_impl='triton'.*choose one of"),
    (dict(pixel_decoder={"num_heads": 7}), r"pixel_decoder.num_heads=7 does not divide pixel_decoder.conv_dim=256"),
    (dict(pixel_decoder={"conv_dim": 48, "num_heads": 4}), r"pixel_decoder.conv_dim=48 must be a multiple of 32"),
    (dict(pixel_decoder={"common_stride": 16}), r"pixel_decoder.common_stride=16 .*choose one of \[4, 8\]"),
    (dict(vision={"patch_size": 8}), r"pixel_decoder.common_stride=4 .*choose one of \[8, 16\]"),
    (dict(mask_decoder={"num_heads": 3}), r"mask_decoder.num_heads=3 does not divide mask_decoder.hidden_dim=256"),
    (dict(mask_decoder={"hidden_dim": 66, "num_heads": 2}), r"mask_decoder.hidden_dim=66 must be a multiple of 4"),
    (dict(mask_decoder={"query": "both"}), r"mask_decoder.query='both'.*'description', 'learned'"),
    (dict(vision={"num_heads": [4, 8, 16, 24]}), r"vision.num_heads\[3\]=24 does not divide .*=1024"),
    (dict(vision={"depths": [2, 2, 18]}), r"vision.depths=\[2, 2, 18\].*4 stages"),
    (dict(description_projector={"num_heads": 0}), r"description_projector.num_heads=0 must be > 0"),
    (dict(description_projector={"kind": "mlp"}), r"description_projector.kind='mlp'.*'perceiver', 'none'"),
    (dict(connector={"kind": "conv3d"}), r"connector.kind='conv3d'.*'sparse_conv'"),
    (dict(text_config=dict(TINY_TEXT, num_attention_heads=5)),
     r"text_config.num_attention_heads=5 does not divide text_config.hidden_size=48"),
    (dict(loss={"importance_sample_ratio": 1.5}), r"loss.importance_sample_ratio=1.5 must be in \[0, 1\]"),
    (dict(loss={"oversample_ratio": 0.9}), r"loss.oversample_ratio=0.9 must be >= 1"),
    (dict(image_size=16), r"image_size=16 is smaller than the encoder's total stride 32"),
    (dict(pixel_decoder={"common_stride": 3}), r"pixel_decoder.common_stride=3 .*choose one of \[4, 8\]"),
    (dict(pixel_decoder={"transformer_in_features": ["res3", "res4", "res6"]}),
     r"pixel_decoder.transformer_in_features\[\*\]='res6'.*'res2', 'res3', 'res4', 'res5'"),
    (dict(mask_decoder={"num_layers": 0}), r"mask_decoder.num_layers=0 must be > 0"),
    (dict(vision={"window_size": 0}), r"vision.window_size=0 must be > 0"),
    (dict(vision={"drop_path_rate": 1.5}), r"vision.drop_path_rate=1.5 must be in \[0, 1\)"),
    (dict(vision={"embed_dim": 10, "num_heads": [3, 3, 3, 3]}), r"vision.num_heads\[0\]=3 does not divide .*=10"),
    (dict(loss={"num_points": 0}), r"loss.num_points=0 must be > 0"),
])
def test_rules_fail_when_the_config_is_built(kwargs, message):
    """Every model rule (one field or between fields) fails at config time, naming the field and what is
    allowed, not at the first forward; the modules do not re-check them."""
    with pytest.raises(ValueError, match=message):
        SegEarthR1Config(**kwargs)


def test_old_description_projector_heads_name_still_loads(tmp_path):
    """`description_projector.heads` was renamed `num_heads`: old config.json and YAML files still load."""
    config = SegEarthR1Config(description_projector={"heads": 4, "dim_head": 32})
    assert config.description_projector.num_heads == 4
    saved = SegEarthR1Config(text_config=TINY_TEXT, description_projector={"num_heads": 2}).to_dict()
    assert saved["description_projector"]["num_heads"] == 2
    saved["description_projector"]["heads"] = saved["description_projector"].pop("num_heads")  # as written before
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = SegEarthR1Config.from_pretrained(tmp_path)
    expected = SegEarthR1Config(text_config=TINY_TEXT, description_projector={"num_heads": 2}).to_dict()
    assert loaded.description_projector.num_heads == 2
    assert loaded.to_dict()["description_projector"] == expected["description_projector"]
    with pytest.raises(ValueError, match="description_projector.heads and description_projector.num_heads"):
        SegEarthR1Config(description_projector={"heads": 4, "num_heads": 4})


def test_old_heads_name_in_a_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "old.yaml").write_text(f"base: {ROOT / 'configs' / 'earthreason.yaml'}\n"
                                       "model: {description_projector: {heads: 4}}\n")
    config, _ = resolve_run_config(tmp_path / "old.yaml")
    assert SegEarthR1Config(**build_model_kwargs(config["model"])).description_projector.num_heads == 4
    # On a base that already uses the new name, the two spellings meet: a clear error, not a silent pick.
    (tmp_path / "mixed.yaml").write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                                         "model: {description_projector: {heads: 4}}\n")
    with pytest.raises(ValueError, match="keep only description_projector.num_heads"):
        resolve_run_config(tmp_path / "mixed.yaml")


def test_compiled_deform_attn_is_a_config_choice():
    assert SegEarthR1Config(pixel_decoder={"deform_attn_impl": "cuda"}).pixel_decoder.deform_attn_impl == "cuda"


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=abc", "train.learning_rate='abc' is a str; expected float"),
    ("train.max_steps=1.5", "train.max_steps=1.5 is a float; expected int"),
    ("train.bf16=no", "train.bf16='no' is a str; expected bool"),
    ("train.nonfinite=maybe", "train.nonfinite='maybe' is a str; expected one of 'error', 'skip'"),
    ("data.max_length=long", "data.max_length='long' is a str; expected int or null"),
])
def test_set_values_are_type_checked_before_anything_loads(override, message, monkeypatch, capsys):
    from segearthr1.train import main

    monkeypatch.setenv("SEGEARTH_DATA", "/nonexistent")
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_run_config(ROOT / "configs" / "tiny.yaml", [override])
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"  # one line, no traceback


def test_yaml_1_1_booleans_stay_strings(monkeypatch):
    monkeypatch.setenv("SEGEARTH_DATA", "/nonexistent")
    config, _ = resolve_run_config(ROOT / "configs" / "tiny.yaml", ["train.save_strategy=no", "train.bf16=true",
                                                                     "train.lr_scheduler_type=off"])
    assert config["train"]["save_strategy"] == "no" and config["train"]["bf16"] is True
    assert config["train"]["lr_scheduler_type"] == "off"
