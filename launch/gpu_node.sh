#!/usr/bin/env bash
# One GPU node (e.g. 8 x H100): one process drives all of the node's GPUs (single-controller JAX, no
# jax.distributed), so the mesh spans the local devices and the input pipeline runs once.
#
#   launch/gpu_node.sh [--dry-run] [--bucket=gs://B[/P]] [--run-name=RUN] [--log-dir=DIR] [--gpus=N] \
#       -- --config=gpu_h100 --config.init_from=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
#
#   --bucket     checkpoints and TensorBoard on gs://B/P/runs/RUN/, dataset from /mnt/gcs/B/P/tfds (a gcsfuse
#                mount of the bucket; pip install -e ".[gcs]"), as on TPU (launch/_common.sh); rerunning the
#                same command resumes from the bucket's newest checkpoint
#   --gpus       how many GPUs of the node to use (default: all, from nvidia-smi)
#   --log-dir    the run's log: DIR/train.log (default: runs/launch/RUN)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/_common.sh
source "$ROOT/launch/_common.sh"

BUCKET="" RUN_NAME="" LOG_DIR="" GPUS=""
PY=${PYTHON:-python3}
while (($#)); do
  case $1 in
    --bucket=*) BUCKET=${1#*=} ;;
    --run-name=*) RUN_NAME=${1#*=} ;;
    --log-dir=*) LOG_DIR=${1#*=} ;;
    --gpus=*) GPUS=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (trainer arguments go after --)" ;;
  esac
  shift
done
ARGS=("$@")
finish_trainer_args
LOG_DIR=${LOG_DIR:-runs/launch/$RUN_NAME}
if [[ -z $GPUS ]]; then
  if [[ $DRY_RUN == 1 ]] && ! command -v nvidia-smi >/dev/null; then GPUS=8; else GPUS=$(nvidia-smi -L | wc -l); fi
fi
DEVICES=$(seq -s, 0 $((GPUS - 1)))

echo "# one node, $GPUS GPUs ($DEVICES) in one process; config $CONFIG, bucket ${BUCKET:-<none>}, log $LOG_DIR/train.log"
run mkdir -p "$LOG_DIR"
show env CUDA_VISIBLE_DEVICES="$DEVICES" XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 "$PY" -m bird_jax.train "${ARGS[@]}"
[[ $DRY_RUN == 1 ]] && exit 0
cd "$ROOT"
env CUDA_VISIBLE_DEVICES="$DEVICES" XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 "$PY" -m bird_jax.train "${ARGS[@]}" 2>&1 \
  | tee "$LOG_DIR/train.log"
