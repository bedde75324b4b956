#!/usr/bin/env bash
# One-command set-up: installs segearthr1 and everything it needs into the active Python.
#
# The order matters:
#   1. torch + torchvision first (timm imports torchvision; pinned to the builds this project is tested with),
#   2. DeepSpeed with --no-build-isolation, so pip does not build it in an isolated env that
#      downloads a second torch, and with DS_BUILD_OPS=0 (ops are JIT-built on first use on GPU),
#   3. the package itself (editable) with its test extras,
#   4. on a machine without CUDA, DeepSpeed's CPU shared-memory comm op, which DeepSpeed otherwise
#      JIT-compiles at the first launch on every new machine (~40 s of the quickstart's start-up);
#      the build lands in torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
# Usage: bash scripts/setup.sh            (use a fresh venv/conda env; see environment.yml)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
echo "[setup] python: $($PY --version 2>&1) at $(command -v $PY)"
echo "[setup] 1/4 installing ${TORCH_SPEC}"
$PY -m pip install -q ${TORCH_SPEC}
echo "[setup] 2/4 installing DeepSpeed (no build isolation, no prebuilt ops)"
DS_BUILD_OPS=0 $PY -m pip install -q --no-build-isolation "deepspeed>=0.14"
echo "[setup] 3/4 installing segearthr1[test] (editable)"
$PY -m pip install -q --no-build-isolation -e ".[test]"
echo "[setup] 4/4 building DeepSpeed's CPU comm op (skipped where CUDA is available)"
$PY - <<'PY'
import torch

if torch.cuda.is_available():
    raise SystemExit(0)
from deepspeed.accelerator import get_accelerator
from deepspeed.ops import __compatible_ops__ as compatible

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None or not compatible.get(builder.NAME, False):
    print("[setup] DeepSpeed has no CPU comm op for this platform: nothing to build")
else:
    try:
        builder.load(verbose=False)
        print(f"\n[setup] {builder.absolute_name()} is built (torch extension cache)")
    except Exception as err:  # a launch will try (and report) the same build again
        print(f"[setup] warning: could not pre-build {builder.absolute_name()} ({err}); the first deepspeed "
              "launch on this machine will try again")
PY
$PY -c "import torch, transformers, timm, deepspeed, segearthr1; print(f'[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, deepspeed {deepspeed.__version__}')"
