"""BiRD fine-tuning on TPU v5e (16 GB per chip: needs ≥ 16 chips, e.g. v5e-16/32, FSDP + full remat).

  python -m bird_jax.train --config=tpu_v5e --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
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
