"""Run configs: every shipped YAML loads and validates; inheritance, overrides and flags behave."""
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


def test_ablation_changes_only_its_switch(monkeypatch):
    monkeypatch.chdir(ROOT)
    base, _ = resolve_run_config(ROOT / "configs" / "earthreason.yaml")
    ablated, _ = resolve_run_config(ROOT / "configs" / "ablations" / "no_description_projector.yaml")
    assert ablated["model"]["description_projector"]["kind"] == "none"
    assert base["model"]["description_projector"]["kind"] == "perceiver"
    assert {k: v for k, v in ablated["model"].items() if k != "description_projector"} == \
        {k: v for k, v in base["model"].items() if k != "description_projector"}


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


@pytest.mark.parametrize("section, value, field", [
    ("pixel_decoder", {"transformer_in_features": ["res2", "res3", "res4", "res5"]}, "transformer_in_features"),
    ("pixel_decoder", {"transformer_in_features": ["res4", "res5"]}, "transformer_in_features"),
    ("pixel_decoder", {"transformer_in_features": ["res3", "res3", "res5"]}, "transformer_in_features"),
    ("pixel_decoder", {"deform_attn_impl": "triton"}, "deform_attn_impl"),
    ("pixel_decoder", {"num_heads": 7}, "num_heads"),
    ("mask_decoder", {"num_heads": 3}, "num_heads"),
    ("mask_decoder", {"hidden_dim": 66, "num_heads": 2}, "hidden_dim"),
])
def test_cross_field_rules_fail_when_the_config_is_built(section, value, field):
    """Rules between fields fail at config time, naming the field, not at the first forward."""
    with pytest.raises(ValueError, match=field):
        SegEarthR1Config(**{section: value})


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
