#!/usr/bin/env bash
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [trainer args...]
#   launch/local_multiprocess.sh 2 4 --config=cpu_demo --config.train.steps=20 --config.mesh.shape="(2,-1,1)"
# The multi-host path (jax.distributed over gloo, per-process data shards, one global mesh) on one CPU machine.
set -euo pipefail
N=$1; D=$2; shift 2
PORT=${BIRD_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" BIRD_COORDINATOR="127.0.0.1:$PORT" \
    BIRD_NUM_PROCESSES=$N BIRD_PROCESS_ID=$i python -m bird_jax.train "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
