#!/usr/bin/env bash
# Train SegEarth-R1 with the DeepSpeed launcher.
#
#   bash scripts/train.sh CONFIG [extra flags...]
#   bash scripts/train.sh configs/earthreason.yaml --set train.num_train_epochs=3
#   NGPUS=8 bash scripts/train.sh configs/rrsisd.yaml                      # one node, 8 GPUs
#   HOSTFILE=hostfile NGPUS=8 bash scripts/train.sh configs/rrsisd.yaml     # several nodes (see below)
#   bash scripts/train.sh configs/earthreason.yaml --resume                # continue the last run
#
# Environment:
#   NGPUS               processes (GPUs) per node (default: all visible GPUs, or 2 CPU processes without CUDA)
#   HOSTFILE            DeepSpeed hostfile for multi-node runs ("host1 slots=8" per line; passwordless ssh)
#   MASTER_PORT         rendezvous port (default 29500)
#   SEGEARTH_DATA       dataset root (default ./datasets), read by the configs
#   SEGEARTH_PRETRAINED pretrained-weights root (default ./pretrained), read by the configs
# Any flag after CONFIG goes to `python -m segearthr1.train` (see its --help): --set KEY=VALUE overrides,
# --resume, and the reference's own train.sh flags (--data_path, --model_name_or_path, --bf16 True, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,20p' "$0"; exit 2
fi
CONFIG=$1; shift
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")
fi
LAUNCH=(deepspeed --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  LAUNCH+=(--hostfile "$HOSTFILE" --num_gpus "$NGPUS")
else
  LAUNCH+=(--num_gpus "$NGPUS")
fi
exec "${LAUNCH[@]}" --module segearthr1.train --config "$CONFIG" "$@"
