"""HF Trainer subclass: per-loss logging, a non-finite guard, atomic checkpoints, validated resume."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoints import (find_resume_checkpoint, newest_valid_checkpoint, publish, reported_save_errors,
                          staging_path)
from .guard import NonFiniteGuard, check_finite_weights, zero_loss
from .lone_process import skip_identity_collectives

logger = logging.getLogger(__name__)

LOGGED_LOSSES = ("loss_mask", "loss_dice", "loss_llm", "loss_seg_class")
RUN_FILES = ("resolved_config.yaml",)


class SegEarthR1Trainer(Trainer):
    """HF Trainer with:

    * the loss parts (`loss_mask`, `loss_dice`, `loss_llm`) in the logged dict with fixed names,
      averaged over the logging window and across processes like HF's own `loss`;
    * a non-finite guard (`guard`): every training step's loss and parts are checked on all processes;
    * atomic checkpoints: written under `.saving/`, checked for NaN weights first, renamed into place
      when complete, with the run files (`run_files_dir`/resolved_config.yaml) inside;
    * in a one-process DeepSpeed stage-0 job, none of the engine's identity all-reduces (lone_process.py).
    """

    def __init__(self, *args, guard: NonFiniteGuard | None = None, run_files_dir: str | Path | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self.guard = guard or NonFiniteGuard(last_good=lambda: newest_valid_checkpoint(self.args.output_dir))
        self.run_files_dir = Path(run_files_dir) if run_files_dir else None
        self._engine_checked = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._engine_checked:  # the DeepSpeed engine exists only once train() has built it
            self._engine_checked = True
            if self.is_deepspeed_enabled:
                skip_identity_collectives(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training:
            parts = {name: value.detach().float() for name in LOGGED_LOSSES
                     if (value := getattr(outputs, name, None)) is not None}
            if self.guard.check(self.state.global_step + 1, loss, parts):
                loss = zero_loss(model)  # skipped: all-zero gradients, nothing of this batch is logged
            else:
                for name, value in parts.items():
                    self._loss_sums[name] = self._loss_sums.get(name, torch.zeros_like(value)) + value
                self._loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._loss_count:
            for name, total in self._loss_sums.items():
                mean = self.accelerator.reduce(total / self._loss_count, reduction="mean")
                logs[name] = round(float(mean), 4)
            self._loss_sums, self._loss_count = {}, 0
        if "loss" in logs and self.guard.skipped:
            logs["nonfinite_skipped"] = self.guard.skipped  # skipped batches count 0 in `loss`
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """HF's save, into `.saving/checkpoint-N`, published by one rename once every process is done."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial=trial))
        staged = staging_path(run_dir, name)
        check_finite_weights(self.model, f"{name} (step {self.state.global_step})")
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        output_dir = self.args.output_dir
        self.args.output_dir = str(staged.parent)  # HF writes <output_dir>/checkpoint-N
        try:
            with reported_save_errors(staged, run_dir):
                super()._save_checkpoint(model, trial)
                if self.args.should_save and self.run_files_dir is not None:
                    for file in RUN_FILES:
                        if (self.run_files_dir / file).is_file():
                            shutil.copy(self.run_files_dir / file, staged / file)
        finally:
            self.args.output_dir = output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            logger.info("saved %s", run_dir / name)
        self.accelerator.wait_for_everyone()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that validates (see checkpoints.find_resume_checkpoint)."""
    return find_resume_checkpoint(output_dir)
