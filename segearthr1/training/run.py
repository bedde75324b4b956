"""Train SegEarth-R1 with the HF Trainer (+ DeepSpeed when `train.deepspeed` names a config).

    deepspeed --num_gpus 8 -m segearthr1.train --config configs/earthreason.yaml [--set train.learning_rate=1e-4]
    bash scripts/train.sh configs/earthreason.yaml          # the same through the launcher script

Options (besides the YAML):
    --config PATH        run config (configs/*.yaml; `base:` inheritance; unknown keys are errors)
    --set KEY=VALUE      dotted override, repeatable (e.g. --set train.num_train_epochs=3)
    --resume             continue from the newest complete checkpoint-N in output_dir (same as
                         --set train.resume=true); a damaged newest checkpoint is skipped with a
                         warning; a run with no checkpoint starts from scratch
    --print_config       print the resolved config and exit

Run without a launcher (`python -m segearthr1.train ...`) it trains as one process; a NaN/Inf loss
stops the run (exit 1) naming the step and the last good checkpoint (`train.nonfinite`).
Every reference `scripts/train.sh` flag that still makes sense is accepted unchanged
(`--data_path --model_name_or_path --vision_tower --mask_config --dataset_type --output_dir
--mm_projector_type --train_backbone --lora_enable --lora_r --lora_alpha --model_max_length` and
every HF TrainingArguments flag such as `--bf16 True --deepspeed scripts/zero2.json`); flags of
reference features that do not exist here (e.g. `--version`, `--lazy_preprocess`) are accepted and
reported as ignored; `--question_sampling`/`--sentence_sampling`, `--tokenizer_path` and `--lora_dropout` map
to `data.question_sampling`, `init.tokenizer_path` and `model.lora.dropout`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from ..config_io import dump_yaml
from ..errors import CheckpointCorruptedError, CheckpointSaveError, NonFiniteError
from ..runtime import is_main_process, setup_logging, tune_cpu_allocator_for
from .args import (DEFAULT_TRAIN_ARGS, OUR_TRAIN_KEYS, build_model_kwargs, data_args, init_args, resolve_run_config,
                   split_cli_pairs)
from .curves import TrainingCurvesCallback
from .shm_release import ReleaseDeepSpeedShmCallback

logger = logging.getLogger("segearthr1.train")

# Errors that end a run with one clear line (exit 1) instead of a traceback.
RUN_ERRORS = (NonFiniteError, CheckpointSaveError, CheckpointCorruptedError)


def parse_args(argv: list[str] | None = None,
               prog: str | None = None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(prog=prog or "python -m segearthr1.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable")
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    return args, split_cli_pairs(rest)


def _git_info() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return f"{sha or 'unknown'}{' (dirty)' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _log_startup(config_path, world_size: int, model) -> None:
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = "not installed"
    lines = [f"git {_git_info()}", f"torch {torch.__version__}, transformers {transformers.__version__}, "
             f"deepspeed {ds_version}", f"world size {world_size}", f"config {config_path}"]
    for name, (trainable, frozen) in model.trainable_parameter_report().items():
        if trainable or frozen:
            lines.append(f"  {name:<22} trainable {trainable:>13,}  frozen {frozen:>13,}")
    logger.info("start-up:\n  %s", "\n  ".join(lines))


def build_model_and_tokenizer(config: dict):
    """Model + tokenizer as the run config says: from local pretrained weights, or randomly
    initialised (tiny/CPU configs) with the tokenizer from `init.tokenizer_path`."""
    from ..configuration import SegEarthR1Config
    from ..modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
    from ..weights.embeddings import setup_tokenizer_and_embeddings
    from ..weights.files import load_tokenizer
    from ..weights.initialisation import build_for_training

    init = init_args(config)
    model_config = SegEarthR1Config(**build_model_kwargs(config["model"]))
    if init.llm_path or init.mask2former_path:
        return build_for_training(model_config, init.llm_path, init.mask2former_path, init.tokenizer_path)
    tokenizer = load_tokenizer(Path(init.tokenizer_path))
    model = SegEarthR1ForReasoningSegmentation(model_config)
    setup_tokenizer_and_embeddings(model, tokenizer)
    return model, tokenizer


def build_training_arguments(config: dict):
    from transformers import TrainingArguments

    values = {**DEFAULT_TRAIN_ARGS, **{k: v for k, v in config["train"].items() if k not in OUR_TRAIN_KEYS}}
    if not torch.cuda.is_available():
        values.setdefault("use_cpu", True)
        for flag in ("bf16", "fp16", "tf32"):
            if values.get(flag):
                logger.warning("train.%s requested but no CUDA device: training in fp32 on CPU", flag)
                values[flag] = False
    if values.get("gradient_checkpointing"):
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    return TrainingArguments(**values)


def single_process_environment() -> None:
    """Without a launcher (no WORLD_SIZE/RANK), describe a 1-process group on this host, so DeepSpeed
    does not try MPI discovery (which needs mpi4py) and HF does not guess."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    logger.info("no launcher environment: training as a single process (use deepspeed or torchrun for more)")


def dataset_kwargs(config: dict, model, seed: int) -> dict:
    """Constructor arguments of the training dataset: sampling seeded from the run seed (exact resume),
    questions truncated so prompt + question + answer + image tokens fit both `data.max_length` and
    the LLM's `max_position_embeddings`."""
    from ..data.base import text_token_budget
    from ..data.registry import get_spec

    data = data_args(config)
    return {"image_size": model.config.image_size, "train": True, "seed": seed,
            **get_spec(data.dataset).dataset_options(data.question_sampling, data.foreground),
            "max_text_tokens": text_token_budget(model, data.max_length), "cache_gb": data.cache_gb}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    setup_logging()
    args, pairs = parse_args(argv, prog)
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    try:
        config, ignored = resolve_run_config(args.config, overrides, pairs)
    except (ValueError, TypeError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if ignored:
        logger.info("ignored reference flags (no effect here): %s", ", ".join("--" + k for k in ignored))
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        return 0
    single_process_environment()
    try:
        return _train(config, args.config)
    except RUN_ERRORS as err:
        if is_main_process():
            logger.error("%s: %s", type(err).__name__, err)
        return 1


def _train(config: dict, config_path) -> int:
    from transformers import set_seed

    from ..data.collate import DataCollator
    from ..data.registry import build_dataset
    from .checkpoints import find_resume_checkpoint, newest_valid_checkpoint, publish, staging_path
    from .guard import NonFiniteGuard, check_finite_weights
    from .trainer import SegEarthR1Trainer

    training_args = build_training_arguments(config)
    output_dir = Path(training_args.output_dir)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "resolved_config.yaml").write_text(dump_yaml(config), encoding="utf-8")
    resume_from = None
    if config["train"].get("resume"):  # before the model loads: a damaged run fails fast
        resume_from = find_resume_checkpoint(output_dir)
        logger.info("resuming from %s", resume_from or "nothing (no complete checkpoint yet): starting fresh")

    set_seed(training_args.seed)
    model, tokenizer = build_model_and_tokenizer(config)
    # after the build: the weights keep their own blocks (runtime.tune_cpu_allocator says why)
    if training_args.use_cpu:
        tune_cpu_allocator_for("cpu", "training")
    data = data_args(config)
    train_set = build_dataset(data.dataset, data.data_path, data.train_split, tokenizer,
                              **dataset_kwargs(config, model, training_args.seed))
    logger.info("training on %s/%s: %d samples from %s", data.dataset, data.train_split, len(train_set), data.data_path)
    _log_startup(config_path, training_args.world_size, model)

    guard = NonFiniteGuard(config["train"].get("nonfinite", "error"), config["train"].get("nonfinite_max_skips", 0),
                           last_good=lambda: newest_valid_checkpoint(output_dir))
    trainer = SegEarthR1Trainer(
        model=model, args=training_args, train_dataset=train_set,
        data_collator=DataCollator(tokenizer.pad_token_id, max_length=data.max_length),
        processing_class=tokenizer, guard=guard, run_files_dir=output_dir,
        callbacks=[TrainingCurvesCallback(), ReleaseDeepSpeedShmCallback()])
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    final_dir = output_dir / "final"
    check_finite_weights(trainer.model, str(final_dir))
    staged = staging_path(output_dir, final_dir.name)  # written aside, renamed when complete
    trainer.save_model(str(staged))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staged))
        (staged / "resolved_config.yaml").write_text(dump_yaml(config), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        publish(staged, final_dir)
        summary = {"global_step": trainer.state.global_step, "final_checkpoint": str(final_dir),
                   "nonfinite_steps_skipped": guard.skipped, "log_history": trainer.state.log_history[-5:]}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        logger.info("training done after %d steps; final model in %s", trainer.state.global_step, final_dir)
    return 0
