"""Error classes word their own fix; a plain message and the builtin bases behave exactly as before."""
import errno
import pickle

import pytest

from segearthr1 import errors
from segearthr1.config_io import check_known_keys

CLASSES = [(errors.DatasetNotFoundError, FileNotFoundError), (errors.DatasetCorruptedError, RuntimeError),
           (errors.CheckpointKeyError, KeyError), (errors.CheckpointNotFoundError, FileNotFoundError),
           (errors.DependencyNotFoundError, ImportError), (errors.NonFiniteError, FloatingPointError),
           (errors.CheckpointCorruptedError, RuntimeError), (errors.CheckpointSaveError, OSError)]


@pytest.mark.parametrize("cls, base", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_structured_message_ends_with_the_class_fix(cls, base):
    err = cls(what="weights are missing", where="ckpt/", found="2 files", expected="3 files", hint="see the log")
    assert isinstance(err, base)
    assert str(err) == f"ckpt/: weights are missing; found 2 files; expected 3 files; see the log; {cls.fix()}"
    assert cls.fix() and (err.what, err.where, err.found, err.expected) == ("weights are missing", "ckpt/", "2 files",
                                                                          "3 files")
    again = pickle.loads(pickle.dumps(err))  # DataLoader workers and ranks ship errors pickled
    assert type(again) is cls and str(again) == str(err)


@pytest.mark.parametrize("cls, base", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_plain_message_is_unchanged(cls, base):
    err = cls("something failed; do this")
    assert str(err) == "something failed; do this" and err.args == ("something failed; do this",)
    with pytest.raises(base, match="^something failed; do this$"):
        raise err


def test_fix_goes_on_its_own_line_after_a_listing_and_oserror_form_still_works():
    err = errors.CheckpointKeyError(what="missing keys (2):\n  a\n  b")
    assert str(err) == f"missing keys (2):\n  a\n  b\n{errors.CheckpointKeyError.fix()}"
    full = errors.CheckpointSaveError(errno.ENOSPC, "disk full")
    assert full.errno == errno.ENOSPC and str(full) == "[Errno 28] disk full"
    with pytest.raises(TypeError, match="either a message or what"):
        errors.DatasetNotFoundError("message", what="what")


def test_unknown_keys_suggest_the_closest_spelling():
    check_known_keys({"kind": 1}, ["kind", "stride"], "connector.")
    with pytest.raises(ValueError, match=r"unknown config key\(s\): connector\.knd \(did you mean kind\?\), "
                                         r"connector\.zzz; valid keys in connector: \['kind', 'stride'\]"):
        check_known_keys({"knd": 1, "zzz": 2}, ["kind", "stride"], "connector.")
    with pytest.raises(ValueError, match=r"train\.lr \(did you mean lr_x\?\); see the docs$"):
        check_known_keys(["lr"], ["lr_x"], "train.", valid_note="see the docs")
