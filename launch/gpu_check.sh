#!/usr/bin/env bash
# One-call GPU check (bird-jax issue 16 §5): the real train step, bf16, fused (cuDNN) attention, on one GPU.
#   bash launch/gpu_check.sh [OUT_DIR]        # e.g. through the device tool: OUT=$OUT bash launch/gpu_check.sh
# 1. a ~3.7B Qwen-VL shape (ViT-bigG frozen, 1.2B-layer decoder of width 2048, real vocabulary), 8 x 2048-token
#    packed rows per step, 20 timed steps: step time, tokens/s, MFU (analytic FLOPs / H100-H200 bf16 peak).
# 2. the same with XLA attention, for the fused kernel's gain.
# 3. the real 9.6B Qwen-VL-Chat step on this one GPU at one row per step (memory; fp32 Adam does not fit one
#    GPU's HBM: the bf16-weights run is the honest one-GPU figure until LoRA lands).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${1:-${OUT:-/tmp/bird_gpu_check}}"
mkdir -p "$OUT"
if [ ! -d .venv ]; then
  python3 -m venv .venv && .venv/bin/pip install -q uv==0.13.9
  .venv/bin/uv pip install --python .venv/bin/python -e ".[dev]" "jax[cuda12]==0.10.2" >"$OUT/install.log" 2>&1
fi
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
MID=(--config=gpu_h200 --config.mesh.shape="(1,-1,1)" --config.train.batch_size=8 --config.train.grad_accum=1
     --config.model.hidden_size=2048 --config.model.num_layers=24 --config.model.num_heads=16
     --config.model.intermediate_size=11008 --config.model.remat_policy=full)
timeout 300 $PY -m bird_jax.benchmarks.train_step_speed "${MID[@]}" --config.model.attention_impl=cudnn \
  --steps=20 --json="$OUT/mid_cudnn.json" 2>&1 | tail -5 | tee "$OUT/mid_cudnn.txt"
timeout 200 $PY -m bird_jax.benchmarks.train_step_speed "${MID[@]}" --config.model.attention_impl=xla \
  --steps=10 --json="$OUT/mid_xla.json" 2>&1 | tail -5 | tee "$OUT/mid_xla.txt"
timeout 300 $PY -m bird_jax.benchmarks.train_step_speed --config=gpu_h200 --config.mesh.shape="(1,-1,1)" \
  --config.train.batch_size=1 --config.train.grad_accum=1 --config.model.param_dtype=bfloat16 \
  --config.model.remat_policy=full --steps=5 --json="$OUT/full_9b_bf16.json" 2>&1 | tail -5 | tee "$OUT/full_9b.txt"
