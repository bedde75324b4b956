"""Cheap integrity checks of checkpoint files, without loading a tensor.

Why: a run killed mid-write or a full disk leaves files that are cut short. Loading them fails deep
inside safetensors/torch/json with messages that name no file ("unexpected pos", "incomplete
metadata"); these checks read only headers and trailers, so resume can test every file of a
checkpoint in milliseconds and name the one that is broken.

* `.safetensors`: the 8-byte header length, the JSON header, and the file size it implies;
* torch `.pt/.pth/.bin` (zip archives since torch 1.6): the zip central directory at the end;
* `.json`: parses.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from ..errors import CheckpointCorruptedError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def check_safetensors(path: str | Path) -> None:
    """Raise CheckpointCorruptedError if `path` is not a complete safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointCorruptedError(what=f"{path} is truncated", found=f"{size} bytes",
                                           expected="at least the 8-byte safetensors header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointCorruptedError(what=f"{path} is truncated or not a safetensors file",
                                           found=f"{size} bytes", expected=f"a header of {header_len} bytes and more")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointCorruptedError(what=f"{path} has a damaged safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointCorruptedError(what=f"{path} has a damaged safetensors header (not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointCorruptedError(what=f"{path} is {what}", found=f"{size} bytes",
                                       expected=f"{expected} bytes, as its header describes ({len(ends)} tensors)")


def check_torch_file(path: str | Path) -> None:
    """Raise CheckpointCorruptedError if a torch.save file lacks its zip trailer (cut short)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointCorruptedError(what=f"{path} is truncated or damaged", found=f"{path.stat().st_size} bytes "
                                       f"that are not a complete torch.save archive ({err})") from err


def check_json(path: str | Path) -> object:
    """The parsed JSON of `path`; CheckpointCorruptedError naming the file if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        size = path.stat().st_size
        raise CheckpointCorruptedError(what=f"{path} is not valid JSON ({'empty file' if size == 0 else err})") from err


def check_file(path: str | Path) -> None:
    """Dispatch on the suffix; other files are not checked."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        check_torch_file(path)
    elif path.suffix == ".json":
        check_json(path)


def check_tree(directory: str | Path) -> None:
    """Check every file under `directory` (first problem raises)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            check_file(path)
