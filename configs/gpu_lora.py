"""LoRA fine-tuning of Qwen-VL-Chat (9.6B) on ONE 80 GB GPU (H100/A100-80GB): tpu_v5p_lora's recipe.

  python -m bird_jax.train --config=gpu_lora --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

No GPU compiles here; the same step compiled for one TPU v5p chip (`python -m bird_jax.compile
--config=gpu_lora --topology=v5p-2`, one device, XLA's SPMD partitioning the same, fusion and buffers differ)
needs 51.91 GiB (bf16 base 18.66 GiB, Adam 1.63 GiB, batch 2.02 GiB, temporaries 29.61 GiB), within an H100's
74.5 GiB. Full fine-tuning cannot fit one GPU: its fp32 weights + Adam state alone are 94 GiB. docs/lora.md.
"""

from __future__ import annotations

from configs import tpu_v5p_lora


def get_config():
  c = tpu_v5p_lora.get_config()
  c.workdir = "runs/bird_gpu_lora"
  c.topology = ""  # a GPU: no TPU slice to compile for (the docstring's proxy: --topology=v5p-2)
  c.data.worker_count = 16
  return c
