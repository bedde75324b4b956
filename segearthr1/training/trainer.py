"""HF Trainer subclass: per-loss logging, run files in every checkpoint, safe resume."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

LOGGED_LOSSES = ("loss_mask", "loss_dice", "loss_llm", "loss_seg_class")
RUN_FILES = ("resolved_config.yaml",)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class SegEarthR1Trainer(Trainer):
    """Adds the loss parts (`loss_mask`, `loss_dice`, `loss_llm`) to the logged dict with fixed names,
    averaged over the logging window and across processes like HF's own `loss`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name in LOGGED_LOSSES:
                value = getattr(outputs, name, None)
                if value is not None:
                    value = value.detach().float()
                    self._loss_sums[name] = self._loss_sums.get(name, torch.zeros_like(value)) + value
            self._loss_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._loss_count:
            for name, total in self._loss_sums.items():
                mean = self.accelerator.reduce(total / self._loss_count, reduction="mean")
                logs[name] = round(float(mean), 4)
            self._loss_sums, self._loss_count = {}, 0
        super().log(logs, *args, **kwargs)


class RunFilesCallback(TrainerCallback):
    """Copy the resolved run config into each checkpoint so every checkpoint says how it was made."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for name in RUN_FILES:
            source = self.run_dir / name
            if source.is_file() and checkpoint.is_dir():
                shutil.copy(source, checkpoint / name)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that finished saving (trainer_state.json is written last), so a run
    killed while saving resumes from the previous complete checkpoint."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = []
    for path in output_dir.iterdir():
        m = _CHECKPOINT.match(path.name)
        if m and path.is_dir():
            candidates.append((int(m.group(1)), path))
    for step, path in sorted(candidates, reverse=True):
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("skipping incomplete checkpoint %s (no trainer_state.json: the run stopped while saving)", path)
    return None
