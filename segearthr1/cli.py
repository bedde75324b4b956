"""The `segearthr1` command: `segearthr1 predict|train|evaluate ...`.

Each subcommand lives in its own module, imported only when used, so `segearthr1 --help` is instant
and a missing optional part (e.g. training in an inference-only install) fails with a clear message.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys

logger = logging.getLogger(__name__)

COMMANDS = {
    "predict": ("segearthr1.inference.predict_cli", "masks for your own images: original resolution, CRS, polygons"),
    "train": ("segearthr1.train", "train or fine-tune a model from a YAML config"),
    "evaluate": ("segearthr1.evaluate", "benchmark metrics (gIoU/cIoU) on a dataset split"),
    "compare": ("segearthr1.evaluation.compare", "paired comparison of evaluation runs (bootstrap CIs)"),
    "benchmark": ("segearthr1.benchmark", "time, FLOPs, MFU and memory of a config's model (random init)"),
    "check-data": ("segearthr1.data.check", "verify a whole dataset in one pass and list every problem"),
    "demo": ("segearthr1.inference.demo", "web demo: upload an image, ask a question, see the mask"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segearthr1", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SegEarth-R1: language-guided segmentation of remote-sensing images.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\nRun `segearthr1 COMMAND --help` for a command's options.")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    return p


def _load_main(command: str):
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise SystemExit(f"segearthr1 {command}: {module_name} is not part of this installation; "
                         f"reinstall segearthr1 from a full checkout (pip install -e .)") from err
    return module.main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_main = _load_main(args.command)
    prog = f"segearthr1 {args.command}"
    if "prog" in inspect.signature(command_main).parameters:
        return int(command_main(args.args, prog=prog) or 0)
    saved = sys.argv
    sys.argv = [prog, *args.args]  # for entry points that parse sys.argv themselves
    try:
        params = inspect.signature(command_main).parameters
        return int((command_main(args.args) if params else command_main()) or 0)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    raise SystemExit(main())
