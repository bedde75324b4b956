"""Strict YAML run configs: `base:` inheritance, dotted overrides, `${VAR:-default}` expansion.

A run config has top-level sections `model:` (SegEarthR1Config fields), `init:` (where weights come
from), `data:`, `train:` (HF TrainingArguments + ours) and `eval:`. An ablation file holds only the
keys it changes and names its parent with `base: ../X.yaml`. Unknown keys anywhere are errors.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("model", "init", "data", "train", "eval")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `3E+5` as floats (YAML 1.1 needs a dot: `1.0e-4`), so a
    learning rate written the usual way is not silently a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# YAML 1.1 also reads yes/no/on/off (any case) as booleans, so `--set train.save_strategy=no` became
# False. Only true/false are booleans here (YAML 1.2); a bool option given `no` is then a type error
# that names the key, not a silent string-to-bool change.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


_ENV = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def check_known_keys(keys, valid, where: str = "", valid_note: str | None = None) -> None:
    """Raise ValueError naming every unknown key with its closest valid spelling.

    The one "did you mean" check for every strict mapping (run-config sections, sub-configs):
    `where` is the dotted prefix shown before each key (`"model.connector."`); `valid_note` replaces
    the list of valid keys when that list is too long to be useful (HF TrainingArguments)."""
    valid = list(valid)
    unknown = [k for k in keys if k not in valid]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
        hints.append(f"{where}{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    section = where.rstrip(".")
    note = valid_note or f"valid keys{' in ' + section if section else ''}: {valid}"
    raise ValueError(f"unknown config key(s): {', '.join(hints)}; {note}")


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive merge; `override` wins. Lists and scalars are replaced, dicts merged."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_env(value: Any) -> Any:
    """Expand `${VAR}` / `${VAR:-default}` in every string (so scripts and configs carry no absolute paths)."""
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            env = os.environ.get(m["name"])
            if env is None and m["default"] is None:
                raise ValueError(f"config refers to ${{{m['name']}}} but the environment variable is not set; set it "
                                 f"or write ${{{m['name']}:-default}}")
            return env if env is not None else m["default"]
        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def load_yaml_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a run config, resolving `base:` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (configs live in configs/, e.g. configs/tiny.yaml)")
    resolved = path.resolve()
    if resolved in _chain:
        raise ValueError(f"config inheritance cycle: {' -> '.join(str(p) for p in _chain + (resolved,))}")
    with open(path, encoding="utf-8") as f:
        data = _load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping with sections {list(SECTIONS)}")
    unknown = [k for k in data if k not in SECTIONS + ("base",)]
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; allowed: base, {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if section in data and data[section] is not None and not isinstance(data[section], dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping, found {type(data[section]).__name__}")
    base = data.pop("base", None)
    data = {k: (v or {}) for k, v in data.items()}
    if base is None:
        return data
    return deep_merge(load_yaml_config(path.parent / base, _chain + (resolved,)), data)


def parse_value(text: str) -> Any:
    """A command-line value with YAML typing (`1e-4` -> float, `true` -> bool, `[a, b]` -> list)."""
    try:
        return _load(text)
    except yaml.YAMLError:
        return text


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    """`config["train"]["learning_rate"] = value` for `dotted="train.learning_rate"`."""
    parts = dotted.split(".")
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise ValueError(f"override {dotted!r} must start with a section ({', '.join(SECTIONS)}) and name a key, "
                         "e.g. train.learning_rate=1e-4")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (`--set` on the command line)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, _, value = item.partition("=")
        set_dotted(config, key.strip(), parse_value(value))
    return config


def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
