#!/usr/bin/env bash
# Evaluate a SegEarth-R1 checkpoint: gIoU, cIoU, P@0.5-0.9 (thin wrapper of `python -m segearthr1.evaluate`).
#
# Usage:
#   scripts/eval.sh --model_path CKPT --dataset_type EarthReason|RRSIS-D|RefSegRS [--data_split val] \
#                   [--output_dir DIR] [--vis_path DIR] [--mask_config YAML] [...]
#   NGPUS=4 scripts/eval.sh --model_path CKPT --dataset_type RRSIS-D     # 4 processes via torchrun
# All arguments are passed through; `python -m segearthr1.evaluate --help` lists them.
#
# Environment:
#   SEGEARTH_DATA  data root (default ./datasets, relative to the current directory); used when
#                  --data_path / --base_data_path is not given
#   NGPUS          processes on this node (default 1: plain python; >1: torchrun --standalone
#                  --nproc_per_node NGPUS, one GPU per process, or gloo on CPU with --device cpu)
#   PYTHON         interpreter (default python3)
# Results: OUTPUT_DIR/metrics.json, per_sample.csv, predictions/ (default outputs/eval/<dataset>_<split>).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
export SEGEARTH_DATA="${SEGEARTH_DATA:-./datasets}"
PY="${PYTHON:-python3}"
NGPUS="${NGPUS:-1}"

if ! [[ "${NGPUS}" =~ ^[1-9][0-9]*$ ]]; then
    echo "scripts/eval.sh: NGPUS=${NGPUS} is not a positive integer; set NGPUS=1 for one process" >&2
    exit 2
fi

if [[ "${NGPUS}" -gt 1 ]]; then
    exec "${PY}" -m torch.distributed.run --standalone --nproc_per_node "${NGPUS}" -m segearthr1.evaluate "$@"
else
    exec "${PY}" -m segearthr1.evaluate "$@"
fi
