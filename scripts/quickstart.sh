#!/usr/bin/env bash
# The embedded default, end to end on CPU: generate a synthetic EarthReason-format dataset, train the
# tiny model (configs/tiny.yaml) with the real DeepSpeed launcher (one process using every core by default;
# NPROC=2 for two gloo data-parallel processes, scripts/zero0.json), evaluate on the generated validation split,
# and compare with two trivial baselines.
#
#   bash scripts/quickstart.sh
#
# Environment (all optional):
#   QUICKSTART_DIR    where everything goes (default outputs/quickstart)
#   NPROC             training processes (default 1: on 2 cores one process with 2 threads ran 25-33 % more
#                     steps per second than 2 processes with 1 thread each, for the same global batch)
#   QUICKSTART_BATCH  global batch (default 8, split evenly over the NPROC processes)
#   QUICKSTART_TRAIN  generated training images (default 4000)
#   QUICKSTART_VAL    generated validation images (default 400)
#   QUICKSTART_EPOCHS training epochs (default: configs/tiny.yaml)
# Exit status: 0 when the model learned (see tools/quickstart_report.py), 1 when it did not.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_DIR:-outputs/quickstart}
DATA=$OUT/data
NPROC=${NPROC:-1}
BATCH=${QUICKSTART_BATCH:-8}
N_TRAIN=${QUICKSTART_TRAIN:-4000}
N_VAL=${QUICKSTART_VAL:-400}
if [ $((BATCH % NPROC)) -ne 0 ]; then
  echo "[quickstart] QUICKSTART_BATCH=$BATCH is not divisible by NPROC=$NPROC" >&2; exit 2
fi
# the cores this process may use (not `nproc`: GNU nproc also obeys OMP_NUM_THREADS)
CORES=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
# the cores are shared out between the training processes (at least one thread each)
THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS} PYTHONUNBUFFERED=1
start=$(date +%s)

echo "[quickstart] 1/4 generating synthetic EarthReason data in $DATA"
rm -rf "$DATA"
python3 tools/make_synthetic_dataset.py --out "$DATA" --datasets EarthReason --n-train "$N_TRAIN" \
  --n-val "$N_VAL" --n-test 0 --seed 0 --min-size 192 --max-size 256 --num-colors 4 --object-scale 1.8 \
  --color-distractor-prob 0.5 --workers "$CORES"
t_data=$(date +%s)

echo "[quickstart] 2/4 training configs/tiny.yaml with deepspeed ($NPROC CPU process(es) x $OMP_NUM_THREADS thread(s), global batch $BATCH)"
rm -rf "$OUT/train"
EXTRA=(--set "train.per_device_train_batch_size=$((BATCH / NPROC))")
if [ -n "${QUICKSTART_EPOCHS:-}" ]; then EXTRA+=(--set "train.num_train_epochs=$QUICKSTART_EPOCHS"); fi
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29511}" --module segearthr1.train \
  --config configs/tiny.yaml --set "data.data_path=$DATA" --set "train.output_dir=$OUT/train" "${EXTRA[@]}"

t_train=$(date +%s)
echo "[quickstart] 3/4 evaluating on the generated validation split"
python3 -m segearthr1.evaluate --model_path "$OUT/train/final" --data_path "$DATA" --data_split val \
  --dataset_type EarthReason --output_dir "$OUT/eval" --vis_path "$OUT/eval/overlays" --num_vis 12 \
  --batch_size 8 --num_workers 0

t_eval=$(date +%s)
echo "[quickstart] 4/4 comparing with trivial baselines"
status=0
python3 tools/quickstart_report.py --data_path "$DATA" --data_split val --metrics "$OUT/eval/metrics.json" \
  --report "$OUT/report.json" || status=$?
python3 - "$OUT" "$(( $(date +%s) - start ))" "$(( t_data - start ))" "$(( t_train - t_data ))" \
  "$(( t_eval - t_train ))" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
data_s, train_s, eval_s = (int(v) for v in sys.argv[3:6])
m = json.load(open(f"{out}/eval/metrics.json"))
print(f"\n[quickstart] validation gIoU {m['giou']:.4f}  cIoU {m['ciou']:.4f}  ({m['num_samples']} samples, {seconds // 60} min {seconds % 60} s)")
print(f"[quickstart] time: data {data_s} s, training {train_s} s (launcher start-up included), evaluation {eval_s} s")
print(f"[quickstart] metrics:     {out}/eval/metrics.json  (per sample: {out}/eval/per_sample.csv)")
print(f"[quickstart] predictions: {out}/eval/predictions/   overlays: {out}/eval/overlays/")
print(f"[quickstart] model:       {out}/train/final   baselines: {out}/report.json")
PY
exit $status
