"""BiRD fine-tuning on TPU v5p (v5p-8 = 4 chips × 95 GB holds the fp32 Adam state with FSDP).

  python -m bird_jax.train --config=tpu_v5p --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
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
