"""BiRD fine-tuning on TPU v5e-16 (16 chips × 16 GB): FSDP over the 16 chips, full remat, fp32 Adam.

  python -m bird_jax.compile --config=tpu_v5e           # proves it fits v5e-16
  python -m bird_jax.train --config=tpu_v5e --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

Same recipe as tpu_v4 (global batch 256 × 2048), as 16 micro-batches of one row per chip. Measured ahead of time
(2026-12-05), per chip of `v5e:4x4`: parameters 2.25 GiB, Adam state 3.64 GiB, batch 0.13 GiB, temporaries
7.51 GiB: 13.57 GiB of 15.75 GiB, headroom 13.8 %; 1.94e15 model FLOPs per chip per step. Smaller v5e slices
(v5e-8) cannot hold the fp32 state of 9.6B: use v5e-16 or larger (or LoRA, once it lands).
"""

from __future__ import annotations

from configs import tpu_v4


def get_config():
  c = tpu_v4.get_config()
  c.workdir = "runs/bird_tpu_v5e"
  c.topology = "v5e-16"
  c.train.batch_size = 256
  c.train.grad_accum = 16
  c.model.remat_policy = "full"
  return c
