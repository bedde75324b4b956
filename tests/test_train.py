"""Training through the real DeepSpeed launcher (2 CPU processes, gloo, ZeRO-2) on generated data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segearthr1.data.synthetic import generate
from segearthr1.weights.pretrained import load_pretrained
from segearthr1.training.trainer import last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = [
    "model.image_size=64", "model.vision.embed_dim=16", "model.vision.depths=[1,1,1,1]",
    "model.vision.num_heads=[1,1,1,1]", "train.per_device_train_batch_size=2", "train.logging_steps=1",
    "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=3",
    "train.deepspeed=scripts/zero2.json",  # the reference default (tiny.yaml itself uses ZeRO-1 for CPU speed)
]


MASTER_PORT = 29500 + os.getpid() % 1000


def _leftover_shm() -> list[Path]:
    """DeepSpeed CPU all-reduce segments of this test's port that outlived the run (it never unlinks them)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{MASTER_PORT}_*"))


def _launch(tmp_path, max_steps, *extra):
    env = dict(os.environ, SEGEARTH_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for stale in _leftover_shm():  # of an earlier process with the same port
        stale.unlink()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(MASTER_PORT), "--module",
           "segearthr1.train", "--config", "configs/tiny.yaml", "--set", f"train.output_dir={tmp_path / 'run'}",
           "--set", f"train.max_steps={max_steps}"]
    for item in TINY_OVERRIDES:
        cmd += ["--set", item]
    result = subprocess.run(cmd + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not _leftover_shm(), "the run left DeepSpeed's shared-memory buffers in /dev/shm"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", datasets=("EarthReason",), n_train=12, n_val=2, n_test=0, seed=1, min_size=48, max_size=96)
    return root


def test_deepspeed_zero2_two_processes_train_checkpoint_and_resume(data_root):
    log = _launch(data_root, 4)
    run = data_root / "run"
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(map(lambda v: v == v and v < 1e4, losses))
    parts = [e for e in state["log_history"] if "loss_mask" in e]
    assert parts and all({"loss_mask", "loss_dice", "loss_llm"} <= set(e) for e in parts)
    assert "world size 2" in log
    assert "no identity all-reduce" not in log  # two processes really reduce (training/lone_process.py)
    ds_config = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert ds_config["global_step"] == 4
    assert any(p.name.startswith("global_step") for p in (run / "checkpoint-4").iterdir())  # DeepSpeed states
    assert (run / "checkpoint-4" / "resolved_config.yaml").is_file()
    # the checkpoint is our HF format: it loads with the tokenizer, and predicts
    model, tokenizer = load_pretrained(run / "checkpoint-4")
    assert tokenizer.convert_tokens_to_ids("[SEG]") == 999 and model.config.image_size == 64
    final, _ = load_pretrained(run / "final")
    for (k, a), (_, b) in zip(model.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), k

    log = _launch(data_root, 6, "--resume")
    assert "resuming from" in log and "checkpoint-4" in log
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 6 and steps[-2:] == [5, 6]


def test_last_complete_checkpoint_skips_a_partial_save(tmp_path):
    from safetensors.torch import save_file

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        save_file({"w": torch.zeros(2)}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "segearthr1.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    for flag in ("--config", "--set", "--resume", "--print_config", "--data_path", "--model_name_or_path",
                 "--vision_tower", "--mask_config", "--dataset_type", "--output_dir"):
        assert flag in out, flag
