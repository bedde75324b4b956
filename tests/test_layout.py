"""The package layout: no module imports from a layer above its own (read from the source with ast).

Layers, low to high (a module may import its own layer and the ones below):
  0 errors, config_io, runtime, processing, visualization, perf, _lazy   (no model or data knowledge)
  1 configuration                                                        (every default and rule)
  2 modeling, losses                                                     (the network)
  3 weights                                                              (names, files, load/save)
  4 data                                                                 (datasets, registry, generator)
  5 training, evaluation, inference                                      (the jobs; not each other)
  6 train, evaluate, benchmark, cli, the package __init__                (entry points)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "segearthr1"
LAYERS = {
    "errors": 0, "config_io": 0, "runtime": 0, "processing": 0, "visualization": 0, "perf": 0, "_lazy": 0,
    "configuration": 1, "modeling": 2, "losses": 2, "weights": 3, "data": 4,
    "training": 5, "evaluation": 5, "inference": 5,
    "train": 6, "evaluate": 6, "benchmark": 6, "cli": 6, "": 6,
}
JOBS = {"training", "evaluation", "inference"}
# The one sideways import between jobs: the run-config schema (model:/data:/train:/eval: sections) lives in
# training/args.py and evaluation reads a run config's eval:/data: values through it.
SHARED_BETWEEN_JOBS = {"segearthr1.training.args"}


def _part(module: str) -> str:
    """'segearthr1.weights.files' -> 'weights'; the package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _submodule_or_package(package: str, name: str) -> str:
    """`from . import x`: x is a submodule when a file or folder of that name exists, else a package attribute."""
    folder = PACKAGE.parent.joinpath(*package.split("."))
    return f"{package}.{name}" if (folder / f"{name}.py").is_file() or (folder / name).is_dir() else package


def _imports(path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [_submodule_or_package(target, a.name) for a in node.names]
            if target == "segearthr1" and all(a.name == "__version__" for a in node.names):
                continue  # a constant of the (lazy) package __init__, not its exports
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "segearthr1" or name.startswith("segearthr1.")]
    return found


def test_every_top_level_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert parts <= set(LAYERS), f"give {sorted(parts - set(LAYERS))} a layer in this test (and the README layout)"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)
        own = _part(module)
        for line, target in _imports(path):
            other = _part(target)
            if other == own:
                continue
            if LAYERS[other] > LAYERS[own] or (own in JOBS and other in JOBS and target not in SHARED_BETWEEN_JOBS):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own or 'segearthr1'}, layer {LAYERS[own]}) "
                              f"imports {target} ({other or 'segearthr1'}, layer {LAYERS[other]})")
    assert not upward, "imports from above:\n" + "\n".join(upward)
