#!/usr/bin/env bash
# Multi-node GPU training under SLURM: submits launch/slurm_gpu.sbatch with the given directives.
#
#   launch/slurm_gpu.sh [--dry-run] --nodes=4 [--gpus-per-node=8] [--partition=P] [--account=A] [--time=HH:MM:SS] \
#       [--bucket=gs://B[/P]] [--run-name=RUN] [--log-dir=DIR] -- --config=gpu_h100 --config.init_from=/ckpt/Qwen-VL-Chat
#
# One process per GPU (--ntasks-per-node = GPUs per node): that is JAX's own SLURM convention
# (jax.distributed pins each process to GPU SLURM_LOCALID), the same layout as the multi-host code path tested
# on CPU, and one GPU's failure is one task's. Data and checkpoints: the bucket convention of launch/_common.sh
# (or give --config.train.checkpoint_dir / --config.data.tfds_dir on a shared filesystem). The job is
# --requeue: a preempted job restarts with the same arguments and resumes from its newest checkpoint.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/_common.sh
source "$ROOT/launch/_common.sh"

NODES="" GPN=8 PARTITION="" ACCOUNT="" TIME="24:00:00" BUCKET="" RUN_NAME="" LOG_DIR="" PORT=${BIRD_PORT:-12355}
while (($#)); do
  case $1 in
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPN=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --bucket=*) BUCKET=${1#*=} ;;
    --run-name=*) RUN_NAME=${1#*=} ;;
    --log-dir=*) LOG_DIR=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (trainer arguments go after --)" ;;
  esac
  shift
done
ARGS=("$@")
finish_trainer_args
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes=N is required"
LOG_DIR=${LOG_DIR:-$ROOT/runs/launch/$RUN_NAME}

# shellcheck disable=SC2054  # the commas are inside --export=ALL,... , not between elements
SB=(sbatch --job-name="bird-$RUN_NAME" --nodes="$NODES" --ntasks-per-node="$GPN" --gpus-per-node="$GPN"
    --cpus-per-task=$((96 / GPN > 0 ? 96 / GPN : 1)) --time="$TIME" --requeue --chdir="$ROOT"
    --output="$LOG_DIR/%j.out" --export=ALL,BIRD_PORT="$PORT",BIRD_LOG_DIR="$LOG_DIR")
[[ -n $PARTITION ]] && SB+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SB+=(--account="$ACCOUNT")
echo "# $NODES nodes x $GPN GPUs = $((NODES * GPN)) processes (one per GPU); config $CONFIG, bucket ${BUCKET:-<none>}"
run mkdir -p "$LOG_DIR"
run "${SB[@]}" "$ROOT/launch/slurm_gpu.sbatch" "${ARGS[@]}"
