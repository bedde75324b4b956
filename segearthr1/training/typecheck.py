"""Type-check config values against dataclass annotations before anything loads.

Why: `--set train.learning_rate=abc` used to pass validation (the key exists) and fail minutes later,
after data and model loading, inside HF with "'<=' not supported between 'str' and 'int'". Checking
every value against the field's annotation up front turns that into one line naming the key, the
value and the expected type.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any


def _describe(annotation) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def matches(value: Any, annotation) -> bool:
    """Does `value` (as YAML parsed it) fit `annotation`? Unknown annotations accept anything."""
    if annotation is Any or annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_section(section: str, values: dict, hints: dict[str, Any]) -> None:
    """Raise TypeError for the first `values` entry whose value does not fit `hints[key]`."""
    for key, value in values.items():
        if key in hints and not matches(value, hints[key]):
            raise TypeError(f"{section}.{key}={value!r} is a {type(value).__name__}; expected "
                            f"{_describe(hints[key])}")


def dataclass_hints(cls) -> dict[str, Any]:
    """Resolved annotations of a dataclass' init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}
