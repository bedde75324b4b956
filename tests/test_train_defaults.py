"""The training recipe lives once (DEFAULT_TRAIN_ARGS); run configs hold only differences from it."""
from pathlib import Path

import yaml

from segearthr1.training.args import DEFAULT_TRAIN_ARGS, resolve_run_config

ROOT = Path(__file__).resolve().parent.parent


def test_base_yaml_train_section_holds_only_differences():
    train = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())["train"]
    assert train, "base.yaml should still state the recipe's DeepSpeed/bf16 choices"
    assert {k: v for k, v in train.items() if DEFAULT_TRAIN_ARGS.get(k, object()) == v} == {}


def test_resolved_config_lists_every_default_and_the_yaml_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = resolve_run_config(ROOT / "configs" / "rrsisd.yaml")
    assert {k: config["train"][k] for k in DEFAULT_TRAIN_ARGS if k not in ("output_dir", "dataloader_num_workers")} == \
        {k: v for k, v in DEFAULT_TRAIN_ARGS.items() if k not in ("output_dir", "dataloader_num_workers")}
    assert config["train"]["output_dir"] == "outputs/rrsisd" and config["train"]["dataloader_num_workers"] == 4
    (tmp_path / "run.yaml").write_text("init: {tokenizer_path: tok}\ntrain: {warmup_ratio: 0.1, seed: 7}\n")
    config, _ = resolve_run_config(tmp_path / "run.yaml")
    assert config["train"]["warmup_steps"] == 0.1 and config["train"]["seed"] == 7  # an alias beats the default
    assert config["train"]["learning_rate"] == DEFAULT_TRAIN_ARGS["learning_rate"]


def test_training_arguments_get_the_recipe(monkeypatch):
    from segearthr1.training.run import build_training_arguments

    monkeypatch.chdir(ROOT)
    config, _ = resolve_run_config(ROOT / "configs" / "tiny.yaml", ["train.deepspeed=null"])
    args = build_training_arguments(config)
    tiny_lr = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["train"]["learning_rate"]
    assert tiny_lr != DEFAULT_TRAIN_ARGS["learning_rate"]  # so the check below sees the YAML win
    assert (args.learning_rate, args.seed, args.remove_unused_columns, args.logging_nan_inf_filter) == \
        (tiny_lr, DEFAULT_TRAIN_ARGS["seed"], False, False)
