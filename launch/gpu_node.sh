#!/usr/bin/env bash
# Usage (on each node): launch/gpu_node.sh COORDINATOR_HOST NUM_NODES NODE_RANK [trainer args...]
#   launch/gpu_node.sh 10.0.0.1 1 0 --config=gpu_h100 --config.init_from=/ckpt/Qwen-VL-Chat
# Starts one process per local GPU; process ids are NODE_RANK * GPUS_PER_NODE + local rank.
set -euo pipefail
COORD=$1; NODES=$2; RANK=$3; shift 3
GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
PORT=${BIRD_PORT:-12355}
pids=()
for ((i = 0; i < GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i BIRD_COORDINATOR="$COORD:$PORT" BIRD_NUM_PROCESSES=$((NODES * GPUS)) \
    BIRD_PROCESS_ID=$((RANK * GPUS + i)) python -m bird_jax.train "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
