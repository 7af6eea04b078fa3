"""BiRD fine-tuning on TPU v5p-8 (4 chips × 95 GB): FSDP, lighter remat ("minimal"), fp32 Adam.

  python -m bird_jax.compile --config=tpu_v5p           # proves it fits v5p-8
  python -m bird_jax.train --config=tpu_v5p --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

Same recipe as tpu_v4 (global batch 256 × 2048), as 32 micro-batches of two rows per chip. Measured ahead of
time (2026-12-05), per chip of `v5:2x2x1` megacore: parameters 9.00 GiB, Adam state 14.53 GiB, batch 0.50 GiB,
temporaries 38.62 GiB: 62.84 GiB of 95.74 GiB, headroom 34.4 %; 7.77e15 model FLOPs per chip per step.
"""

from __future__ import annotations

from configs import tpu_v4


def get_config():
  c = tpu_v4.get_config()
  c.workdir = "runs/bird_tpu_v5p"
  c.topology = "v5p-8"
  c.train.batch_size = 256
  c.train.grad_accum = 32
  c.model.remat_policy = "minimal"
  return c
