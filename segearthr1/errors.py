"""Exception types. Each message says what failed, the offending value, what was expected and how to fix it."""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root, split, listing or file is missing."""


class DatasetCorruptedError(RuntimeError):
    """A sample exists but cannot be used (unreadable image, size mismatch, bad annotation)."""


class CheckpointKeyError(KeyError):
    """A state dict does not match the model: missing, unexpected or mis-shaped keys."""

    def __str__(self) -> str:  # KeyError quotes its message; keep multi-line reports readable
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(FileNotFoundError):
    """A weight/config/tokenizer file that a loader needs is not where it was told to look."""


class DependencyNotFoundError(ImportError):
    """An optional dependency is missing; the message names the install command."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight or logit is NaN/Inf; the message names the step or sample and what to do."""


class CheckpointCorruptedError(RuntimeError):
    """A checkpoint file exists but is truncated or damaged (the message names the file)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous checkpoint is left intact."""
