#!/usr/bin/env bash
# One-command set-up: installs segearthr1 and everything it needs into the active Python.
#
# The order matters:
#   1. torch + torchvision first (timm imports torchvision; pinned to the builds this project is tested with),
#   2. DeepSpeed with --no-build-isolation, so pip does not build it in an isolated env that
#      downloads a second torch, and with DS_BUILD_OPS=0 (ops are JIT-built on first use on GPU),
#   3. the package itself (editable) with its test extras.
# Usage: bash scripts/setup.sh            (use a fresh venv/conda env; see environment.yml)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
echo "[setup] python: $($PY --version 2>&1) at $(command -v $PY)"
echo "[setup] 1/3 installing ${TORCH_SPEC}"
$PY -m pip install -q ${TORCH_SPEC}
echo "[setup] 2/3 installing DeepSpeed (no build isolation, no prebuilt ops)"
DS_BUILD_OPS=0 $PY -m pip install -q --no-build-isolation "deepspeed>=0.14"
echo "[setup] 3/3 installing segearthr1[test] (editable)"
$PY -m pip install -q --no-build-isolation -e ".[test]"
$PY -c "import torch, transformers, timm, deepspeed, segearthr1; print(f'[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, deepspeed {deepspeed.__version__}')"
