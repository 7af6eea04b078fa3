#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE [trainer args...]
#   launch/tpu_vm.sh bird-v4 us-central2-b v4-16 --config=tpu_v4 --config.init_from=/ckpt/Qwen-VL-Chat
# Creates the TPU VM if needed, copies this checkout to every worker, installs it, runs the trainer on all
# workers together. Requires gcloud with a project configured.
set -euo pipefail
NAME=$1; ZONE=$2; TYPE=$3; shift 3
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
tar czf /tmp/bird_jax_src.tgz -C "$ROOT" --exclude .venv --exclude runs --exclude .git .
gcloud compute tpus tpu-vm scp /tmp/bird_jax_src.tgz "$NAME":~/ --zone "$ZONE" --worker=all
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/bird-jax && tar xzf ~/bird_jax_src.tgz -C ~/bird-jax && cd ~/bird-jax
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'
  BIRD_DISTRIBUTED=auto .venv/bin/python -m bird_jax.train $ARGS"
