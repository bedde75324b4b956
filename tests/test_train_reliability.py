"""Training faults through the real DeepSpeed launcher (2 CPU processes, gloo, configs/tiny.yaml's ZeRO-0):
kill -9 of the launcher's process group between checkpoints and during a save, damaged newest
checkpoints, a diverging run, 2 nodes x 1 process under torchrun, and one process without a launcher.

Every resumed run must end with weights equal to the uninterrupted run with the same seed (random
question sampling on, so the data path's randomness is part of what is compared).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segearthr1.data.synthetic import generate
from segearthr1.training.checkpoints import STAGING_DIR, list_checkpoints, validate_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 6
TINY = [
    "model.image_size=64", "model.vision.embed_dim=16", "model.vision.depths=[1,1,1,1]",
    "model.vision.num_heads=[1,1,1,1]", "train.per_device_train_batch_size=2", "train.logging_steps=1",
    "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=3",
    "data.question_sampling=random", f"train.max_steps={MAX_STEPS}",
]


def _port(offset: int) -> int:
    return 29600 + (os.getpid() * 7 + offset) % 100  # this project's test port range: 29600-29699


def _env(data: Path) -> dict:
    env = dict(os.environ, SEGEARTH_DATA=str(data), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _train_args(run: Path, *extra) -> list[str]:
    args = ["--config", "configs/tiny.yaml", "--set", f"train.output_dir={run}"]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def _deepspeed(run: Path, port_offset: int, *extra) -> list[str]:
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(_port(port_offset)), "--module", "segearthr1.train",
            *_train_args(run, *extra)]


def _run(cmd, data, expect_ok=True):
    result = subprocess.run(cmd, cwd=ROOT, env=_env(data), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, log[-5000:]
    return result.returncode, log


def _kill_when(cmd, data, ready, timeout=300):
    """Start `cmd` in its own process group, SIGKILL the whole group as soon as `ready()` is true."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= 1e-6, f"final weights differ by up to {worst:.3g}"


def _losses(run: Path) -> list[float]:
    state = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Generated data and the uninterrupted reference run (1 node x 2 processes)."""
    root = tmp_path_factory.mktemp("reliability")
    generate(root / "data", datasets=("EarthReason",), n_train=16, n_val=2, n_test=0, seed=3, min_size=48,
             max_size=96)
    _run(_deepspeed(root / "reference", 0), root / "data")
    return root


def test_kill_between_checkpoints_then_resume_is_exact(base):
    run = base / "killed"
    _kill_when(_deepspeed(run, 1), base / "data", lambda: (run / "checkpoint-2").is_dir())
    assert not (run / "final").exists()
    for _, path in list_checkpoints(run):
        validate_checkpoint(path)  # what the kill left is complete
    _, log = _run(_deepspeed(run, 2, "--resume"), base / "data")
    assert "resuming from" in log
    _assert_same_weights(run / "final", base / "reference" / "final")
    assert _losses(run) == _losses(base / "reference")


def test_kill_during_a_save_leaves_no_partial_checkpoint(base):
    run = base / "killed_saving"
    _kill_when(_deepspeed(run, 3), base / "data", lambda: (run / STAGING_DIR / "checkpoint-4").is_dir())
    assert not (run / "checkpoint-4").exists() or validate_checkpoint(run / "checkpoint-4") is None
    assert (run / "checkpoint-2").is_dir()
    _, log = _run(_deepspeed(run, 4, "--resume"), base / "data")
    assert "resuming from" in log
    _assert_same_weights(run / "final", base / "reference" / "final")


def _damage_deepspeed_state(ckpt: Path):
    state = next(ckpt.glob("global_step*/*model_states.pt"))
    state.write_bytes(state.read_bytes()[:1000])


def _damage_trainer_state(ckpt: Path):
    (ckpt / "trainer_state.json").write_text("")


def _damage_weights(ckpt: Path):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(base):
    """Each damage kind is caught by validation; one of them is resumed for real through the launcher."""
    from segearthr1.training.checkpoints import find_resume_checkpoint

    for damage in (_damage_deepspeed_state, _damage_trainer_state, _damage_weights):
        run = base / f"damaged_{damage.__name__}"
        shutil.copytree(base / "reference", run)
        shutil.rmtree(run / "final")
        damage(run / f"checkpoint-{MAX_STEPS}")
        assert find_resume_checkpoint(run).name == "checkpoint-4", damage.__name__
    run = base / "damaged__damage_deepspeed_state"
    _, log = _run(_deepspeed(run, 5, "--resume"), base / "data")
    assert "not resuming from" in log and "checkpoint-6" in log and "truncated" in log
    _assert_same_weights(run / "final", base / "reference" / "final")


def test_diverging_run_stops_and_saves_nothing_non_finite(base):
    run = base / "diverged"
    code, log = _run(_deepspeed(run, 6, "--set", "train.learning_rate=1e6", "--set", "train.max_steps=20"),
                     base / "data", expect_ok=False)
    assert code != 0
    assert "non-finite loss at step" in log and "Last good checkpoint" in log
    assert not (run / "final").exists()
    saved = [p for _, p in list_checkpoints(run)]
    for path in saved:
        assert all(torch.isfinite(t).all() for t in _weights(path).values()), path


def test_skip_policy_skips_up_to_its_budget_then_stops(base):
    run = base / "skipping"
    code, log = _run([sys.executable, "-m", "segearthr1.train", *_train_args(
        run, "--set", "train.learning_rate=1e6", "--set", "train.max_steps=20", "--set", "train.nonfinite=skip",
        "--set", "train.nonfinite_max_skips=2")], base / "data", expect_ok=False)
    assert code == 1 and log.count("skipping this batch") == 2 and "after skipping 2 step(s)" in log
    for _, path in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in _weights(path).values()), path
        state = json.loads((path / "trainer_state.json").read_text())
        assert all(math.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)


def test_two_nodes_one_process_each_match_one_node_two_processes(base):
    """The multi-node launch of the README, rehearsed on 127.0.0.1: 2 torchrun "nodes" x 1 process."""
    run = base / "two_nodes"
    endpoint = f"127.0.0.1:{_port(7)}"
    nodes = [subprocess.Popen(["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "rehearsal",
                               "-m", "segearthr1.train", *_train_args(run)],
                              cwd=ROOT, env=_env(base / "data"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    assert "world size 2" in logs[0]
    assert _losses(run) == _losses(base / "reference")
    _assert_same_weights(run / "final", base / "reference" / "final")


def test_single_process_without_a_launcher(base):
    run = base / "single"
    _, log = _run([sys.executable, "-m", "segearthr1.train", *_train_args(run, "--set", "train.max_steps=2")],
                  base / "data")
    assert "world size 1" in log and "mpi4py" not in log
    assert (run / "final" / "model.safetensors").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs: room for one tiny checkpoint (14 MiB) but not two. Needs mount rights (root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_during_the_second_save_is_reported_and_keeps_the_first(base, small_disk):
    run = small_disk / "run"
    code, log = _run([sys.executable, "-m", "segearthr1.train", *_train_args(run)], base / "data", expect_ok=False)
    assert code == 1
    assert "disk full while saving checkpoint to" in log and "MiB free" in log, log[-3000:]
    assert f"the newest complete checkpoint {run / 'checkpoint-2'} is intact" in log
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "resolved_config.yaml", "training_curves.png"]
    validate_checkpoint(run / "checkpoint-2")
