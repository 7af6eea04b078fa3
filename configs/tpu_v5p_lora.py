"""LoRA fine-tuning of Qwen-VL-Chat (9.6B) on ONE TPU v5p chip (95 GB HBM): adapters on the decoder, resampler trained.

  python -m bird_jax.compile --config=tpu_v5p_lora      # proves it fits one chip (v5p-2: one megacore chip)
  python -m bird_jax.train --config=tpu_v5p_lora --config.init_from=/ckpt/Qwen-VL-Chat \\
      --config.data.tokenizer=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit
  python -m bird_jax.export --config=tpu_v5p_lora --config.init_from=/ckpt/Qwen-VL-Chat --out=adapter --peft

Qwen-VL's own LoRA recipe (finetune_lora_single_gpu.sh: r 64, alpha 16, dropout 0.05, lr 1e-5 → here 1e-4,
the usual LoRA rate, cosine) on BiRD's data and global batch (256 packed 2048-token rows as 128 micro-batches of
two). The ViT and the decoder's base weights are frozen and kept in bf16 (19.3 GB); the adapters (rank 64 on
c_attn, attn.c_proj, w1, w2, mlp.c_proj: 140M) and the resampler (80M) train in fp32 with fp32 Adam.
Measured ahead of time: see docs/lora.md.
"""

from __future__ import annotations

from configs import tpu_v4


def get_config():
  c = tpu_v4.get_config()
  c.workdir = "runs/bird_tpu_v5p_lora"
  c.topology = "v5p-2"
  c.mesh.shape = (1, -1, 1)
  c.train.batch_size = 256
  c.train.grad_accum = 128
  c.train.lr = 1e-4
  c.model.remat_policy = "minimal"
  c.lora.rank = 64
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.base_dtype = "bfloat16"
  return c
