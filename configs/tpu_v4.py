"""BiRD stage-2 fine-tuning of Qwen-VL-Chat (9.6B) on Med-GRIT, TPU v4 (v4-16 or larger: 8+ chips).

  python -m bird_jax.train --config=tpu_v4 \\
      --config.init_from=/ckpt/Qwen-VL-Chat --config.data.tokenizer=/ckpt/Qwen-VL-Chat \\
      --config.data.raw_dir=/data/med_grit --config.workdir=gs://bucket/runs/bird_v4

The BiRD recipe (bird_paper.md §2): AdamW lr 2e-5 cosine, warmup 1 %, weight decay 0.1, β2 0.95, global
batch 32 × n_gpus packed 2048-token rows, 2 epochs, ViT frozen, resampler + LLM trained, bf16 compute with
fp32 master weights. Full fp32 Adam state of 9.6B does not fit a v4-8 (see jax_style_and_perf.md §3.4):
FSDP over every chip of a v4-16+ slice.
"""

from __future__ import annotations

from bird_jax.model.config import QwenVLConfig
from configs import _base


def get_config():
  c = _base.get_config()
  c.workdir = "runs/bird_tpu_v4"
  c.topology = "v4-16"
  c.data.builder_config = "official"
  c.data.seq_len = 2048
  c.data.packing = True
  c.data.worker_count = 8
  c.model = _base.model_config(QwenVLConfig.qwen_vl_chat_7b(
    dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full", vision_remat_policy="full"))
  c.mesh.shape = (1, -1, 1)  # pure FSDP inside the slice
  c.train.batch_size = 256
  c.train.grad_accum = 32
  c.train.steps = 1900  # ≈ 2 epochs of 240k QA pairs packed ~8 per 2048-token row at batch 256 (adjust to your data)
  c.train.lr = 2e-5
  c.train.checkpoint_every = 200
  c.eval.batch_size = 64
  return c
