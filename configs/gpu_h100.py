"""BiRD fine-tuning on one 8×H100 (80 GB) node: FSDP over the 8 GPUs, bf16 compute, fp32 master weights.

  python -m bird_jax.train --config=gpu_h100 --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
  bash launch/gpu_check.sh                               # step time, tokens/s and MFU on one GPU

Global batch 256 × 2048 (BiRD's 32 rows per GPU) as 16 micro-batches of two rows per GPU, remat "minimal".
No GPU compiles here; memory is checked on a TPU of the same device count and more HBM (XLA's SPMD
partitioning is the same; fusion and buffer assignment differ): `python -m bird_jax.compile --config=gpu_h100
--topology=v5p-16` (8 devices) gives 37.25 GiB per device (parameters 4.50, Adam 7.27, batch 0.25,
temporaries 25.13), half of an H100's 74.5 GiB; the state alone is (4 B × 9.66B + 8 B × 7.80B trained) / 8 =
11.77 GiB per GPU. On GPU the attention is cuDNN's (packed rows through a dense [B, 1, L, L] mask), see
docs/scale.md.
"""

from __future__ import annotations

from configs import tpu_v4


def get_config():
  c = tpu_v4.get_config()
  c.workdir = "runs/bird_gpu_h100"
  c.train.batch_size = 256  # BiRD's 32 packed rows per GPU x 8 GPUs
  c.train.grad_accum = 16  # two rows per GPU per micro-batch
  c.model.remat_policy = "minimal"
  c.topology = ""  # GPUs: no TPU slice to compile for (see the docstring for the TPU proxy)
  c.data.worker_count = 16
  return c
