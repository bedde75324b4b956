"""README.md documents every command-line flag and every environment variable the shell scripts read.

Each entry point's real `--help` output is parsed for its flags, and each script for its `${VAR:-default}`s, so
a flag or variable added without a word in the README fails here (the README is the one place a newcomer reads;
`--help` alone is not enough).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

MODULE_ENTRY_POINTS = {  # name as a user types it -> module whose main(argv) parses the flags
    "segearthr1 predict": "segearthr1.inference.predict_cli",
    "segearthr1 demo": "segearthr1.inference.demo",
    "segearthr1 train": "segearthr1.train",
    "segearthr1 evaluate": "segearthr1.evaluate",
    "segearthr1 compare": "segearthr1.evaluation.compare",
    "segearthr1 benchmark": "segearthr1.benchmark",
    "segearthr1 check-data": "segearthr1.data.check",
}
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _main_of(entry: str):
    if entry in MODULE_ENTRY_POINTS:
        return importlib.import_module(MODULE_ENTRY_POINTS[entry]).main
    spec = importlib.util.spec_from_file_location(f"tool_{Path(entry).stem}", REPO / "tools" / entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _flags_in_help(entry: str, capsys) -> set[str]:
    with pytest.raises(SystemExit) as exit_info:
        _main_of(entry)(["--help"])
    assert exit_info.value.code in (0, None), f"{entry} --help exited with {exit_info.value.code}"
    text = capsys.readouterr().out
    assert "options:" in text, f"{entry} --help printed no options section:\n{text[:500]}"
    options = text[text.index("options:"):]  # not the description, which may quote other tools' flags
    return set(FLAG.findall(options)) - {"--help"}


def _in_readme(flag: str) -> bool:
    forms = [flag, "--no-" + flag[2:]] if not flag.startswith("--no-") else [flag, "--" + flag[5:]]
    return any(re.search(re.escape(form) + r"(?![\w-])", README) for form in forms)


@pytest.mark.parametrize("entry", [*MODULE_ENTRY_POINTS, *TOOLS])
def test_every_flag_of_every_entry_point_is_in_the_readme(entry, capsys):
    flags = _flags_in_help(entry, capsys)
    assert flags, f"found no flags in {entry} --help"
    missing = sorted(f for f in flags if not _in_readme(f))
    assert not missing, f"{entry}: README.md does not mention {missing}"


def test_the_flag_check_catches_an_undocumented_flag():
    """The check itself can fail: a made-up flag is not in the README, a real one is."""
    assert not _in_readme("--no_such_flag_anywhere")
    assert _in_readme("--tile_size") and _in_readme("--pin_memory")


@pytest.mark.parametrize("entry", ["segearthr1 train", "segearthr1 evaluate"])
def test_subcommand_help_names_the_subcommand(entry, capsys):
    """`segearthr1 train --help` says `usage: segearthr1 train`, not the module path."""
    from segearthr1.cli import main

    with pytest.raises(SystemExit):
        main([entry.split()[1], "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {entry}")


SHELL_SCRIPTS = sorted([*(REPO / "scripts").glob("*.sh"), *(REPO / "tools").glob("*.sh")])
ENV_DEFAULT = re.compile(r"\$\{([A-Z][A-Z0-9_]*):-")  # ${VAR:-default}: a variable the user may set


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_environment_variable_of_the_shell_scripts_is_in_the_readme(script):
    names = set(ENV_DEFAULT.findall(script.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"{script.relative_to(REPO)} reads {missing}; README.md does not mention them"
