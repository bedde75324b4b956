"""Checkpoint directories you can trust: atomic publication, validation, fallback on resume.

Why: HF writes `checkpoint-N/` in place, so a kill or a full disk leaves a directory that looks like a
checkpoint but is not one. Here every checkpoint is written under `<output_dir>/.saving/checkpoint-N`
and renamed to `<output_dir>/checkpoint-N` only when every process has finished writing it (a rename
within one filesystem is atomic): a `checkpoint-N` directory is complete or absent. Resume still
validates the newest one (a disk can fail later) and falls back to the previous one, saying why.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator

from ..weights.integrity import check_file, check_json
from ..errors import CheckpointCorruptedError, CheckpointSaveError

logger = logging.getLogger(__name__)

STAGING_DIR = ".saving"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Messages of writers that hit a full disk without saying so (torch's zip writer reports a short write
# as "unexpected pos"; DeepSpeed and safetensors pass the OS error through).
_DISK_FULL_MARKERS = ("no space left", "unexpected pos", "file write failed", "disk quota exceeded")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, path)] of the `checkpoint-N` directories in `output_dir`, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def validate_checkpoint(path: str | Path) -> None:
    """Raise CheckpointCorruptedError naming the first problem of a training checkpoint directory:
    no or unreadable trainer_state.json, a step that disagrees with the name, a DeepSpeed `latest`
    tag without its directory, or any truncated weight/state/JSON file."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointCorruptedError(what=f"{state_file} is missing (the save did not finish)")
    state = check_json(state_file)
    m = CHECKPOINT_PATTERN.match(path.name)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointCorruptedError(what=f"{state_file} has no integer 'global_step'")
    if m and state["global_step"] != int(m.group(1)):
        raise CheckpointCorruptedError(what=f"{state_file} says global_step {state['global_step']} but the "
                                            f"directory is {path.name}")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin")):
        raise CheckpointCorruptedError(what="no model weights", where=path, expected="model.safetensors")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if not tag or not (path / tag).is_dir():
            raise CheckpointCorruptedError(what=f"names DeepSpeed state {tag!r} but {path / (tag or '?')} does not "
                                                "exist", where=latest)
    for file in sorted(path.rglob("*")):
        if file.is_file():
            check_file(file)


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that validates; each newer damaged one is skipped with a warning naming
    what is wrong. None if there is no checkpoint at all; CheckpointCorruptedError if every one is
    damaged (starting over silently would discard the run)."""
    problems = []
    for _, path in list_checkpoints(output_dir):
        try:
            validate_checkpoint(path)
        except (CheckpointCorruptedError, OSError) as err:
            problems.append(f"{path.name}: {err}")
            logger.warning("not resuming from %s: %s; trying the previous checkpoint", path, err)
            continue
        if problems:
            logger.warning("resuming from %s (newer checkpoint(s) are damaged: %s)", path, "; ".join(problems))
        return path
    if problems:
        raise CheckpointCorruptedError(what="no usable checkpoint to resume from", where=output_dir,
                                       found="; ".join(problems),
                                       hint="or remove the damaged directories to start over, or train without "
                                            "--resume")
    return None


def newest_valid_checkpoint(output_dir: str | Path) -> Path | None:
    """Like `find_resume_checkpoint` but quiet and never raising (for messages)."""
    for _, path in list_checkpoints(output_dir):
        try:
            validate_checkpoint(path)
            return path
        except (CheckpointCorruptedError, OSError):
            continue
    return None


def staging_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / STAGING_DIR / name


def publish(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint into place. An existing `final` (a damaged checkpoint a resumed
    run skipped, now written again) is moved aside first and deleted after the rename."""
    old = None
    if final.exists():
        old = final.with_name(f".replaced-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # only when no other save is staged


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _DISK_FULL_MARKERS)


def _free_space(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


@contextlib.contextmanager
def reported_save_errors(staged: Path, output_dir: Path) -> Iterator[None]:
    """Turn a failed write into CheckpointSaveError naming the path, the free space and the checkpoint
    that is still intact; the partial staging directory is removed."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any writer error; re-raised with context
        if isinstance(err, CheckpointSaveError):
            raise
        free = _free_space(staged)
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            staged.parent.rmdir()
        previous = newest_valid_checkpoint(output_dir)
        kept = f"the newest complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        if is_disk_full(err):
            # OSError(errno, message) keeps err.errno, so the message is composed rather than passed as what=
            raise CheckpointSaveError(errno.ENOSPC, CheckpointSaveError.compose(
                f"disk full while saving checkpoint to {staged}", found=f"{free} free there; writer said: {err}",
                hint=f"{kept}; then rerun with --resume")) from err
        raise CheckpointSaveError(what=f"saving checkpoint to {staged} failed: {type(err).__name__}: {err}",
                                  hint=kept) from err
