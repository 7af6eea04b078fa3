"""BiRD fine-tuning on one 8×H100 (80 GB) node: FSDP over the 8 GPUs, bf16 compute, fp32 master weights.

  python -m bird_jax.train --config=gpu_h100 --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
"""

from __future__ import annotations

from configs import tpu_v4


def get_config():
  c = tpu_v4.get_config()
  c.workdir = "runs/bird_gpu_h100"
  c.train.batch_size = 32  # the paper's per-device 4 × accumulation 8, on 8 GPUs: 4 × 8 × 8 / 8
  c.train.grad_accum = 4
  c.model.remat_policy = "full"
  c.data.worker_count = 16
  return c
