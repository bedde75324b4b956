"""Checkpoint files and directories: truncation is named, resume falls back, saves fail cleanly,
loading checks the model type; and the non-finite guard's decisions (no launcher needed here)."""
from __future__ import annotations

import errno
import json
import logging

import pytest
import torch
from model_utils import tiny_model, trained_tokenizer
from safetensors.torch import save_file

from segearthr1.weights.integrity import check_json, check_safetensors, check_torch_file
from segearthr1.errors import CheckpointCorruptedError, CheckpointNotFoundError, CheckpointSaveError, NonFiniteError
from segearthr1.weights.pretrained import load_pretrained, save_pretrained
from segearthr1.training.checkpoints import (find_resume_checkpoint, publish, reported_save_errors, staging_path,
                                             validate_checkpoint)
from segearthr1.training.guard import NonFiniteGuard, check_finite_weights, zero_loss


def _checkpoint(run, step):
    path = run / f"checkpoint-{step}"
    (path / "global_step").mkdir(parents=True)
    save_file({"w": torch.arange(100.0)}, str(path / "model.safetensors"))
    torch.save({"m": torch.ones(100)}, path / "global_step" / "mp_rank_00_model_states.pt")
    (path / "latest").write_text("global_step")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_truncated_files_are_named(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    weights, state = ckpt / "model.safetensors", ckpt / "global_step" / "mp_rank_00_model_states.pt"
    check_safetensors(weights)
    check_torch_file(state)
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointCorruptedError, match=r"model\.safetensors is truncated"):
        check_safetensors(weights)
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointCorruptedError, match=r"mp_rank_00_model_states\.pt is truncated"):
        check_torch_file(state)
    (ckpt / "trainer_state.json").write_text("")
    with pytest.raises(CheckpointCorruptedError, match=r"trainer_state\.json is not valid JSON \(empty file\)"):
        check_json(ckpt / "trainer_state.json")


@pytest.mark.parametrize("damage", ["trainer_state", "deepspeed_state", "weights", "latest_tag", "wrong_step"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, damage, caplog):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    if damage == "trainer_state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "deepspeed_state":
        file = newest / "global_step" / "mp_rank_00_model_states.pt"
        file.write_bytes(file.read_bytes()[:100])
    elif damage == "weights":
        (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:50])
    elif damage == "latest_tag":
        (newest / "latest").write_text("global_step999")
    else:
        (newest / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path).name == "checkpoint-2"
    assert "not resuming from" in caplog.text and str(newest) in caplog.text


def test_every_checkpoint_damaged_is_an_error_and_none_is_a_fresh_start(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    (_checkpoint(tmp_path, 2) / "trainer_state.json").unlink()
    with pytest.raises(CheckpointCorruptedError, match="no usable checkpoint"):
        find_resume_checkpoint(tmp_path)


def test_publish_replaces_a_skipped_damaged_checkpoint(tmp_path):
    old = _checkpoint(tmp_path, 4)
    (old / "trainer_state.json").write_text("")
    staged = staging_path(tmp_path, "checkpoint-4")
    staged.parent.mkdir()
    _checkpoint(staged.parent, 4)
    publish(staged, tmp_path / "checkpoint-4")
    validate_checkpoint(tmp_path / "checkpoint-4")
    assert not staged.parent.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4772096 "
                                                "vs 4771984")])
def test_full_disk_during_a_save_is_reported_and_keeps_the_previous_checkpoint(tmp_path, error):
    previous = _checkpoint(tmp_path, 2)
    staged = staging_path(tmp_path, "checkpoint-4")
    with pytest.raises(CheckpointSaveError) as info:
        with reported_save_errors(staged, tmp_path):
            staged.mkdir(parents=True)
            (staged / "model.safetensors").write_bytes(b"partial")
            raise error
    message = str(info.value)
    assert "disk full" in message and str(staged) in message and "MiB free" in message
    assert f"newest complete checkpoint {previous} is intact" in message
    assert not staged.exists() and not (tmp_path / "checkpoint-4").exists()
    validate_checkpoint(previous)


def test_other_save_errors_keep_their_cause(tmp_path):
    with pytest.raises(CheckpointSaveError, match="PermissionError: denied; no earlier checkpoint exists"):
        with reported_save_errors(staging_path(tmp_path, "checkpoint-2"), tmp_path):
            raise PermissionError("denied")


def test_guard_error_names_step_parts_and_last_good_checkpoint():
    guard = NonFiniteGuard(last_good=lambda: "/runs/x/checkpoint-4")
    assert not guard.check(5, torch.tensor(1.5), {"loss_mask": torch.tensor(0.5)})
    with pytest.raises(NonFiniteError) as info:
        guard.check(6, torch.tensor(float("nan")), {"loss_mask": torch.tensor(float("inf")),
                                                     "loss_dice": torch.tensor(0.25)})
    message = str(info.value)
    assert "non-finite loss at step 6" in message and "loss nan" in message and "loss_mask inf" in message
    assert "loss_dice 0.25" in message and "Last good checkpoint: /runs/x/checkpoint-4" in message


def test_guard_skips_up_to_the_budget_then_stops():
    guard = NonFiniteGuard("skip", max_skips=2)
    nan = torch.tensor(float("nan"))
    assert guard.check(1, nan, {}) and guard.check(2, torch.tensor(1.0), {"loss_llm": nan})
    with pytest.raises(NonFiniteError, match="after skipping 2 step"):
        guard.check(3, nan, {})
    with pytest.raises(ValueError, match="train.nonfinite='sometimes'"):
        NonFiniteGuard("sometimes")


def test_skipped_step_has_zero_gradients_and_nan_weights_are_never_saved():
    model = torch.nn.Linear(3, 2)
    zero_loss(model).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    check_finite_weights(model, "checkpoint-1")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not saving checkpoint-1: 1 parameter tensor"):
        check_finite_weights(model, "checkpoint-1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save_pretrained(tiny_model(), trained_tokenizer(), path)
    return path


def test_load_checks_model_type_and_names_truncated_weights(saved, tmp_path, caplog):
    import shutil

    with caplog.at_level(logging.WARNING):
        load_pretrained(saved)
    assert "to instantiate a model of type" not in caplog.text  # transformers' spurious warning is gone
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "phi"}))
    with pytest.raises(CheckpointNotFoundError, match="not a SegEarth-R1 checkpoint: its config.json has "
                                                      "model_type 'phi'"):
        load_pretrained(other)
    (other / "config.json").write_text(json.dumps(config))
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointCorruptedError, match=r"other/model\.safetensors is truncated"):
        load_pretrained(other)
