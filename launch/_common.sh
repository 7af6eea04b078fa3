# shellcheck shell=bash
# Helpers the launchers source: dry-run aware command runner, quoting, trainer-argument and bucket conventions.

DRY_RUN=${DRY_RUN:-0}

# One shell word, quoted only when it needs to be (readable dry runs that shlex / a shell parse back exactly).
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# The command line as it would be typed, prefixed with "+ " (like `set -x`): what --dry-run prints.
show() {
  local out="+" a
  for a in "$@"; do out+=" $(q "$a")"; done
  printf '%s\n' "$out"
}

# Runs a command, or only prints it under --dry-run.
run() {
  show "$@"
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  "$@"
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# The value of --config=NAME among trainer arguments ("" when absent).
config_name() {
  local a
  for a in "$@"; do
    if [[ $a == --config=* ]]; then printf '%s' "${a#--config=}"; return 0; fi
  done
}

# After a GPU launcher has read its own flags, with the trainer's arguments in ARGS: sets CONFIG (required),
# RUN_NAME (default: the config) and, with --bucket (BUCKET), appends the bucket convention's flags to ARGS.
finish_trainer_args() {
  CONFIG=$(config_name "${ARGS[@]+"${ARGS[@]}"}")
  [[ -n $CONFIG ]] || die "pass the trainer's --config=NAME after --"
  RUN_NAME=${RUN_NAME:-$CONFIG}
  if [[ -n $BUCKET ]]; then
    local line
    while IFS= read -r line; do ARGS+=("$line"); done < <(bucket_flags "$BUCKET" "$RUN_NAME" /mnt/gcs)
  fi
}

# gs://bucket/prefix -> the trainer flags of the bucket convention (one per line):
#   checkpoints  gs://bucket/prefix/runs/RUN/checkpoints   (Orbax, through etils epath + gcsfs / tensorstore)
#   TensorBoard  gs://bucket/prefix/runs/RUN/tensorboard   (tensorboardX's GCS writer, google-cloud-storage)
#   dataset      MOUNT/prefix/tfds                         (TFDS data_dir on the gcsfuse mount of the bucket:
#                ArrayRecord's reader opens POSIX files only, google/array_record#120)
# A spot slice or a requeued job that restarts with the same flags resumes from the newest bucket checkpoint.
bucket_flags() {
  local bucket=$1 run_name=$2 mount=$3
  [[ $bucket == gs://* ]] || die "--bucket=$bucket: use gs://BUCKET[/PREFIX]"
  local path=${bucket#gs://}
  path=${path%/}
  local name=${path%%/*} prefix=""
  [[ $path == */* ]] && prefix=/${path#*/}
  printf '%s\n' "--config.train.checkpoint_dir=gs://$name$prefix/runs/$run_name/checkpoints" \
    "--config.train.tensorboard_dir=gs://$name$prefix/runs/$run_name/tensorboard" \
    "--config.data.tfds_dir=$mount/$name$prefix/tfds"
}

bucket_name() {
  local path=${1#gs://}
  printf '%s' "${path%%/*}"
}
