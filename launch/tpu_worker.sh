#!/usr/bin/env bash
# Runs on every TPU VM worker (tpu_vm.sh ships the code to ~/bird-jax and calls this through ssh --worker=all).
#   bash ~/bird-jax/launch/tpu_worker.sh install [BUCKET]     # venv + .[tpu,gcs]; gcsfuse mount of BUCKET
#   bash ~/bird-jax/launch/tpu_worker.sh train TRAINER_ARGS   # log: ~/bird-logs/train.log (per worker)
set -euo pipefail
cd "$(dirname "$0")/.."
MOUNT=/mnt/gcs
case ${1:-} in
  install)
    python3 -m venv .venv
    .venv/bin/pip install -q -e ".[tpu,gcs]"
    if [[ -n ${2:-} ]]; then
      if ! command -v gcsfuse >/dev/null; then
        # Google's apt repository for gcsfuse (cloud.google.com/storage/docs/gcsfuse-install)
        echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" \
          | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null
        sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
      fi
      sudo mkdir -p "$MOUNT/$2" && sudo chown "$USER" "$MOUNT/$2"
      mountpoint -q "$MOUNT/$2" || gcsfuse --implicit-dirs -o ro "$2" "$MOUNT/$2"
    fi
    ;;
  train)
    shift
    mkdir -p ~/bird-logs
    # BIRD_DISTRIBUTED=auto: jax.distributed.initialize() finds the slice's other workers itself.
    BIRD_DISTRIBUTED=auto .venv/bin/python -m bird_jax.train "$@" 2>&1 | tee ~/bird-logs/train.log
    ;;
  *)
    echo "usage: $0 install [BUCKET] | train TRAINER_ARGS..." >&2
    exit 2
    ;;
esac
