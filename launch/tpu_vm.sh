#!/usr/bin/env bash
# Cloud TPU VM / pod slice launcher: compile check, create (or reuse; optionally queued / spot), ship the code,
# install, train on all workers at once, collect per-worker logs, tear down.
#
#   launch/tpu_vm.sh [OPTIONS] [train|up|logs|teardown] [-- TRAINER_ARGS...]
#
#   launch/tpu_vm.sh --project=my-proj --zone=us-central2-b --name=bird-v4 --bucket=gs://my-bucket/bird \
#       train -- --config=tpu_v4 --config.init_from=/ckpt/Qwen-VL-Chat --config.data.tokenizer=/ckpt/Qwen-VL-Chat
#   launch/tpu_vm.sh --project=my-proj --zone=us-central2-b --name=bird-v4 --queued teardown
#
# Sub-commands: train (default: compile check, up, ship + install, train, logs), up (create only), logs
# (copy ~/bird-logs/train.log of every worker to --log-dir/worker-N.log), teardown (delete the slice and its
# queued resource). Options:
#   --project, --zone           GCP project and zone (default: $TPU_PROJECT, $TPU_ZONE)
#   --name                      TPU VM / queued-resource name
#   --accelerator-type          v4-16, v5e-16 (v5litepod-16), v5p-8, ...; default: the config's `topology`
#   --version                   TPU software version; default per generation
#   --spot                      spot capacity; with `train`, a preempted slice is recreated and the run resumes
#                               from its newest bucket checkpoint (at most --max-restarts times, default 3)
#   --queued                    create through a queued resource (waits until it is ACTIVE)
#   --ref=GIT_REF               ship `git archive GIT_REF` instead of the working tree (uncommitted files too)
#   --bucket=gs://B[/P]         checkpoints and TensorBoard on gs://B/P/runs/RUN/, dataset from the bucket's
#                               gcsfuse mount /mnt/gcs/B/P/tfds on every worker (see launch/_common.sh)
#   --run-name                  RUN above (default: --name)
#   --log-dir                   where `logs` puts worker-N.log (default: runs/launch/NAME)
#   --skip-compile              do not run `python -m bird_jax.compile` for the slice first
#   --dry-run                   print every command instead of running it (the compile check still runs: it
#                               creates nothing and says whether the config fits)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/_common.sh
source "$ROOT/launch/_common.sh"

PROJECT=${TPU_PROJECT:-}
ZONE=${TPU_ZONE:-}
NAME="" TYPE="" VERSION="" REF="" BUCKET="" RUN_NAME="" LOG_DIR="" CMD=""
SPOT=0 QUEUED=0 SKIP_COMPILE=0 MAX_RESTARTS=""
PY=${PYTHON:-python3}

while (($#)); do
  case $1 in
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --name=*) NAME=${1#*=} ;;
    --accelerator-type=*) TYPE=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --bucket=*) BUCKET=${1#*=} ;;
    --run-name=*) RUN_NAME=${1#*=} ;;
    --log-dir=*) LOG_DIR=${1#*=} ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --skip-compile) SKIP_COMPILE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    train | up | logs | teardown) CMD=$1 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help; trainer arguments go after --)" ;;
  esac
  shift
done
TRAIN_ARGS=("$@")
CMD=${CMD:-train}
[[ -n $PROJECT ]] || die "--project (or TPU_PROJECT) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ -n $NAME ]] || die "--name is required"
RUN_NAME=${RUN_NAME:-$NAME}
LOG_DIR=${LOG_DIR:-runs/launch/$NAME}
MAX_RESTARTS=${MAX_RESTARTS:-$((SPOT ? 3 : 0))}
CONFIG=$(config_name "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")

if [[ -z $TYPE && -n $CONFIG ]]; then
  TYPE=$(cd "$ROOT" && "$PY" -c "import sys; from bird_jax.config_util import get_config
print(get_config(sys.argv[1]).get('topology', ''))" "$CONFIG")
fi
if [[ $CMD == train || $CMD == up || $CMD == logs ]]; then
  [[ -n $TYPE ]] || die "--accelerator-type is required (config ${CONFIG:-<none>} names no topology)"
fi

# Slice name -> generation, chips and hosts. v4/v5p names count TensorCores (two per chip), v5e names chips;
# a host has 4 chips (a v5e slice of up to 8 chips is one host).
GEN="" CHIPS=0 WORKERS=0 GCLOUD_TYPE=$TYPE
if [[ -n $TYPE ]]; then
  [[ $TYPE =~ ^(v4|v5p|v5e|v5litepod)-([0-9]+)$ ]] || die "--accelerator-type=$TYPE: use e.g. v4-16, v5e-16, v5p-8"
  GEN=${BASH_REMATCH[1]} N=${BASH_REMATCH[2]}
  if [[ $GEN == v5e || $GEN == v5litepod ]]; then
    GEN=v5e CHIPS=$N GCLOUD_TYPE=v5litepod-$N
    WORKERS=$((N <= 8 ? 1 : N / 4))
  else
    CHIPS=$((N / 2))
    WORKERS=$(((CHIPS + 3) / 4))
  fi
  case $GEN in
    v4) VERSION=${VERSION:-tpu-ubuntu2204-base} ;;
    v5e) VERSION=${VERSION:-v2-alpha-tpuv5-lite} ;;
    v5p) VERSION=${VERSION:-v2-alpha-tpuv5} ;;
  esac
fi
G=(--project="$PROJECT" --zone="$ZONE")

compile_check() {
  [[ -n $CONFIG ]] || die "train needs --config=NAME among the trainer arguments (after --)"
  # The checkpoint and data paths name files on the workers, not here; shapes come from the config itself
  # (init_from would make the compile read the checkpoint's config.json, which lives on the workers).
  local args=(--config="$CONFIG" --topology="$TYPE") a
  for a in "${TRAIN_ARGS[@]}"; do
    case $a in
      --config=* | --config.init_from=* | --config.workdir=* | --config.data.raw_dir=* | --config.data.tokenizer=* \
        | --config.data.tfds_dir=* | --config.train.checkpoint_dir=* | --config.train.tensorboard_dir=*) ;;
      --config.*) args+=("$a") ;;
    esac
  done
  if [[ $SKIP_COMPILE == 1 ]]; then
    echo "# skipped (--skip-compile): $(show "$PY" -m bird_jax.compile "${args[@]}")"
    return 0
  fi
  show "$PY" -m bird_jax.compile "${args[@]}"
  if ! (cd "$ROOT" && "$PY" -m bird_jax.compile "${args[@]}"); then
    echo "refusing to launch: $CONFIG does not compile within $TYPE's memory (above); nothing was created" >&2
    exit 1
  fi
}

exists() {
  # Under --dry-run the slice is taken as missing, so the dry run shows the create commands.
  show gcloud compute tpus tpu-vm describe "$NAME" "${G[@]}" --format=value\(state\)
  [[ $DRY_RUN == 1 ]] && return 1
  gcloud compute tpus tpu-vm describe "$NAME" "${G[@]}" --format='value(state)' >/dev/null 2>&1
}

state() { gcloud compute tpus tpu-vm describe "$NAME" "${G[@]}" --format='value(state)' 2>/dev/null || true; }

up() {
  if exists; then
    echo "# $NAME exists: reusing it"
    return 0
  fi
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" "${G[@]}" --node-id="$NAME" \
      --accelerator-type="$GCLOUD_TYPE" --runtime-version="$VERSION" "${spot[@]+"${spot[@]}"}"
    show gcloud compute tpus queued-resources describe "$NAME" "${G[@]}" --format=value\(state.state\)
    if [[ $DRY_RUN == 0 ]]; then
      local s=""
      until [[ $s == ACTIVE ]]; do
        s=$(gcloud compute tpus queued-resources describe "$NAME" "${G[@]}" --format='value(state.state)')
        echo "# queued resource $NAME: $s"
        [[ $s == FAILED || $s == SUSPENDED ]] && die "queued resource $NAME is $s"
        [[ $s == ACTIVE ]] || sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${G[@]}" --accelerator-type="$GCLOUD_TYPE" --version="$VERSION" \
      "${spot[@]+"${spot[@]}"}"
  fi
}

ship_and_install() {
  local tgz=${TMPDIR:-/tmp}/bird_jax_src_$NAME.tgz
  if [[ -n $REF ]]; then
    run git -C "$ROOT" archive --format=tar.gz -o "$tgz" "$REF"
  else
    run tar czf "$tgz" -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git .
  fi
  run gcloud compute tpus tpu-vm scp "$tgz" "$NAME":bird_jax_src.tgz "${G[@]}" --worker=all
  # A fresh copy of the code each time; runs/ (a local workdir's checkpoints) and the venv are kept.
  local setup="mkdir -p ~/bird-jax && find ~/bird-jax -mindepth 1 -maxdepth 1 ! -name runs ! -name .venv -exec rm -rf {} +"
  setup+=" && tar xzf ~/bird_jax_src.tgz -C ~/bird-jax"
  setup+=" && bash ~/bird-jax/launch/tpu_worker.sh install"
  [[ -n $BUCKET ]] && setup+=" $(q "$(bucket_name "$BUCKET")")"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${G[@]}" --worker=all --command="$setup"
}

train_on_all_workers() {
  local args=("${TRAIN_ARGS[@]}") line cmd
  if [[ -n $BUCKET ]]; then
    while IFS= read -r line; do args+=("$line"); done < <(bucket_flags "$BUCKET" "$RUN_NAME" /mnt/gcs)
  fi
  cmd="bash ~/bird-jax/launch/tpu_worker.sh train"
  for line in "${args[@]}"; do cmd+=" $(q "$line")"; done
  run gcloud compute tpus tpu-vm ssh "$NAME" "${G[@]}" --worker=all --command="$cmd"
}

logs() {
  run mkdir -p "$LOG_DIR"
  local w
  for ((w = 0; w < WORKERS; w++)); do
    run gcloud compute tpus tpu-vm scp "$NAME":bird-logs/train.log "$LOG_DIR/worker-$w.log" "${G[@]}" --worker="$w" \
      || echo "# worker $w: no log" >&2
  done
}

teardown() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${G[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${G[@]}" --quiet
  fi
}

echo "# $CMD: project $PROJECT, zone $ZONE, $NAME: ${GCLOUD_TYPE:-?} ($CHIPS chips, $WORKERS workers)," \
  "config ${CONFIG:-<none>}, bucket ${BUCKET:-<none>}"
case $CMD in
  up) up ;;
  logs) logs ;;
  teardown) teardown ;;
  train)
    compile_check
    restarts=0
    while :; do
      up
      ship_and_install
      status=0
      train_on_all_workers || status=$?
      logs
      [[ $status == 0 ]] && break
      s=$(state)
      if [[ $SPOT == 1 && $restarts -lt $MAX_RESTARTS && ($s == PREEMPTED || $s == TERMINATED || -z $s) ]]; then
        restarts=$((restarts + 1))
        echo "# $NAME was preempted ($s): recreating it and resuming from the bucket ($restarts/$MAX_RESTARTS)"
        teardown
        continue
      fi
      exit "$status"
    done
    ;;
esac
