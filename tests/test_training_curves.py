"""training_curves.png and `report_to: tensorboard` from a real (single-process, 3-step) training run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2

from segearthr1.data.synthetic import generate
from segearthr1.training.curves import logged_series, plot_training_curves

ROOT = Path(__file__).resolve().parent.parent


def test_logged_series_collects_loss_parts_and_learning_rate():
    history = [{"loss": 3.0, "loss_mask": 1.0, "learning_rate": 1e-4, "grad_norm": 2.0, "step": 1},
               {"loss": 2.0, "loss_mask": 0.5, "learning_rate": 5e-5, "step": 2},
               {"train_runtime": 1.0, "step": 2}, {"eval_giou": 0.5}]
    series = logged_series(history)
    assert set(series) == {"loss", "loss_mask", "learning_rate"}
    assert series["loss_mask"] == ([1, 2], [1.0, 0.5])
    assert plot_training_curves([{"epoch": 1.0}], "unused.png") is None  # nothing logged: no file


def test_training_writes_curves_and_tensorboard_events(tmp_path):
    generate(tmp_path / "data", datasets=("EarthReason",), n_train=6, n_val=1, n_test=0, seed=2, min_size=48,
             max_size=64)
    run = tmp_path / "run"
    env = dict(os.environ, SEGEARTH_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "segearthr1.train", "--config", "configs/tiny.yaml",
           "--set", f"train.output_dir={run}", "--set", "train.max_steps=3", "--set", "train.deepspeed=null",
           "--set", "train.logging_steps=1", "--set", "train.save_steps=2", "--set", "train.report_to=[tensorboard]",
           "--set", "model.image_size=64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("training curves:") >= 2  # on the save at step 2 and at the end
    image = cv2.imread(str(run / "training_curves.png"))
    assert image is not None and image.shape[0] > 200 and image.std() > 5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.glob("runs/*/events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {run / 'runs'}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_mask", "train/loss_dice", "train/learning_rate"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss_mask")] == [1, 2, 3]
