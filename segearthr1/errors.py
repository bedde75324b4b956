"""Exception types that word their own fix (torchgeo style).

Why: with empty classes every raise phrased "how to fix it" differently. Each class has one fixed
"how to fix" sentence (`FIXES`); a raise states the facts as keywords and the class assembles

    raise CheckpointNotFoundError(what="config.json is missing", where=model_dir)
    # -> "<model_dir>: config.json is missing; <the class's fix sentence>"

`found=` and `expected=` add "found X" / "expected Y" (shown with str(): pass `f"{x!r}"` to quote);
`hint=` adds one raise-specific detail before the fix. A plain message, `DatasetNotFoundError("...")`,
still works exactly as before, and every class keeps its builtin base, so `except FileNotFoundError`
and `pytest.raises(KeyError)` hold.
"""
from __future__ import annotations

from typing import Any

_UNSET: Any = object()


class _WordsItsFix:
    """Mixin: builds the message from structured arguments and appends the class's fix (`FIXES`)."""

    def __init__(self, *args: Any, what: str | None = None, where: Any = None, found: Any = _UNSET,
                 expected: Any = None, hint: str | None = None) -> None:
        if what is not None:
            if args:
                raise TypeError(f"{type(self).__name__}: pass either a message or what=..., not both")
            args = (self.compose(what, where=where, found=found, expected=expected, hint=hint),)
        super().__init__(*args)
        self.what, self.where, self.expected, self.hint = what, where, expected, hint
        self.found = None if found is _UNSET else found

    @classmethod
    def compose(cls, what: str, *, where: Any = None, found: Any = _UNSET, expected: Any = None,
                hint: str | None = None) -> str:
        """The message a structured raise gets (also usable for a warning worded the same way)."""
        parts = [f"{where}: {what}" if where is not None else what]
        if found is not _UNSET:
            parts.append(f"found {found}")
        if expected is not None:
            parts.append(f"expected {expected}")
        if hint:
            parts.append(hint)
        body = "; ".join(parts)
        if not cls.fix():
            return body
        return body + ("\n" if "\n" in body else "; ") + cls.fix()  # after a multi-line listing: its own line

    @classmethod
    def fix(cls) -> str:
        """The class's "how to fix" sentence (inherited by subclasses without their own)."""
        return next((FIXES[c] for c in cls.__mro__ if c in FIXES), "")


class DatasetNotFoundError(_WordsItsFix, FileNotFoundError):
    """A dataset root, split, listing or file is missing."""


class DatasetCorruptedError(_WordsItsFix, RuntimeError):
    """A sample exists but cannot be used (unreadable image, size mismatch, bad annotation)."""


class CheckpointKeyError(_WordsItsFix, KeyError):
    """A state dict does not match the model: missing, unexpected or mis-shaped keys."""

    def __str__(self) -> str:  # KeyError quotes its message; keep multi-line reports readable
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(_WordsItsFix, FileNotFoundError):
    """A weight/config/tokenizer file that a loader needs is not where it was told to look."""


class DependencyNotFoundError(_WordsItsFix, ImportError):
    """An optional dependency is missing; the message names the install command."""


class NonFiniteError(_WordsItsFix, FloatingPointError):
    """A loss, gradient, weight or logit is NaN/Inf; the message names the step or sample and what to do."""


class CheckpointCorruptedError(_WordsItsFix, RuntimeError):
    """A checkpoint file exists but is truncated or damaged (the message names the file)."""


class CheckpointSaveError(_WordsItsFix, OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous checkpoint is left intact."""


# One "how to fix" sentence per class: every structured raise of the class ends with it.
FIXES: dict[type, str] = {
    DatasetNotFoundError: "check data.data_path (--data_path) against the expected tree in datasets/README.md, "
                          "or generate a synthetic dataset with tools/make_synthetic_dataset.py",
    DatasetCorruptedError: "re-download or re-convert the dataset (datasets/README.md) and check it with "
                           "`segearthr1 check-data`",
    CheckpointKeyError: "build the model from the config the checkpoint was written for (its config.json, or a "
                        "reference release's mask-config YAML); extend the tables in "
                        "segearthr1/weights/key_maps.py only for new reference parameters",
    CheckpointNotFoundError: "point the path at a directory written by `segearthr1 train` / save_pretrained or at "
                             "a reference release; pretrained/README.md lists the files each one needs",
    DependencyNotFoundError: "install the optional dependency (pip install, see setup.py extras and "
                             "environment.yml)",
    NonFiniteError: "the model has probably diverged: use an earlier checkpoint, or resume from one with a lower "
                    "train.learning_rate",
    CheckpointCorruptedError: "the file was cut short or damaged (an interrupted save or a full disk): copy it "
                              "again or use an earlier checkpoint",
    CheckpointSaveError: "free disk space or choose another train.output_dir; the previous checkpoint is left intact",
}
