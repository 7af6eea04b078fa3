"""BiRD stage-2 fine-tuning of Qwen-VL-Chat (9.6B) on Med-GRIT, TPU v4-16 (8 chips, 32 GB HBM each).

  python -m bird_jax.compile --config=tpu_v4            # proves it fits v4-16 (libtpu: pip install -e ".[tpu]")
  python -m bird_jax.train --config=tpu_v4 \\
      --config.init_from=/ckpt/Qwen-VL-Chat --config.data.tokenizer=/ckpt/Qwen-VL-Chat \\
      --config.data.raw_dir=/data/med_grit --config.train.checkpoint_dir=gs://bucket/runs/bird_v4/checkpoints

The BiRD recipe (bird_paper.md §2): AdamW lr 2e-5 cosine, warmup 1 %, weight decay 0.1, β2 0.95, global batch
256 packed 2048-token rows (32 per GPU × 8 in the paper) as 32 micro-batches of one row per chip, ViT frozen
(forward only), resampler + LLM trained, bf16 compute with fp32 master weights and fp32 Adam moments.

Measured ahead of time (`python -m bird_jax.compile --config=tpu_v4`, libtpu 0.0.42.1, 2026-12-05), per chip
of `v4:2x2x2` megacore: parameters 4.50 GiB, Adam state 7.27 GiB, batch 0.25 GiB, temporaries 11.45 GiB:
23.56 GiB of 30.75 GiB, headroom 23.4 % (fused LM loss; 23.91 GiB before it).
Analytic model FLOPs 3.89e15 per chip per step (about 28 s per step at
50 % MFU). remat "full": "minimal" keeps every projection's output (38.4 GiB per chip before the later memory
work; see docs/scale.md). A v4-8 (4 chips) cannot hold the fp32 weights + Adam state + gradients of 9.6B with
room for activations: use v4-16 or larger.
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
