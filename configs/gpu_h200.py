"""BiRD fine-tuning on one 8×H200 (141 GB) node: FSDP, bf16 compute, fp32 master weights, lighter remat.

  python -m bird_jax.train --config=gpu_h200 --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

The gpu_h100 shapes (37.25 GiB per device on the v5p-16 proxy compile, see gpu_h100) on 131 GiB GPUs: room to
raise rows per micro-batch (`--config.train.grad_accum=8`, not yet measured) once a GPU confirms the proxy.
"""

from __future__ import annotations

from configs import gpu_h100


def get_config():
  c = gpu_h100.get_config()
  c.workdir = "runs/bird_gpu_h200"
  c.train.grad_accum = 16  # two rows per GPU per micro-batch
  return c
