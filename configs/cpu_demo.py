"""The whole BiRD slice on a laptop CPU, with no downloads.

  python -m bird_jax.train --config=cpu_demo
  python -m bird_jax.train --config=cpu_demo --config.train.steps=20 --config.workdir=/tmp/demo   # smoke run

Generates the phantom Med-GRIT set with data_gen, builds it with the med_grit TFDS builder, trains a tiny
Qwen-VL-architecture model from scratch (ViT + cross-attention resampler + Qwen decoder, all trained) for 15
minutes and evaluates VG recall@0.5 / ROC accuracy on held-out cases against the mean-box / majority / class-
prior baselines.

The set is the one a 15-minute CPU run can learn: one structure per image, each class in a colour of its own,
a box side of 0.25-0.5 of the image, VG and ROC turns only. The harder set — 2-4 grey structures per image, all
four tasks — is `--config=cpu_crowded`, which this budget does not learn. Why each choice, with the runs that
measured it: docs/demo_findings.md.
"""

from __future__ import annotations

from bird_jax.model.config import QwenVLConfig
from bird_jax.prepare import phantom_config
from configs import _base


def get_config():
  c = _base.get_config()
  c.workdir = "runs/cpu_demo"
  c.data.source = "phantom"
  c.data.phantom = phantom_config()
  c.data.phantom.cases = 300
  # One structure per image, so neither task needs binding a name to one of several; each class its own hue,
  # because a grey level is only a vector's length, which the LayerNorm after the patch embedding removes.
  c.data.phantom.objects = "1,1"
  c.data.phantom.palette = "hue"
  # At 64 px and a 6 x 6 query grid a structure narrower than 1/6 of the side fits inside one query cell.
  c.data.phantom.size = "0.25,0.5"
  # Half the turns ROC: naming from colour is what first makes the decoder read the image.
  c.data.phantom.task_weights = "VG=0.5,RO=0.5"
  c.data.phantom.max_turns = 1
  c.data.phantom.balance_modalities = True  # else X-ray is 240 of the 3,120 training images
  c.data.seq_len = 96
  # A from-scratch model gains nothing from Qwen's system turn; dropping it saves ~25 tokens per row.
  c.data.system_prompt = ""
  c.data.curriculum.steps = 0
  c.data.packing = False
  c.model = _base.model_config(QwenVLConfig.tiny(
    vocab_size=1024,  # the demo BPE's size; checked against the tokenizer at start-up
    hidden_size=128, num_layers=4, num_heads=4, head_dim=32, intermediate_size=512,
    vision_width=96, vision_layers=4, vision_heads=4, vision_mlp_ratio=4.0,
    patch_size=8, image_size=64, vision_pos_grid=8, n_queries=36, resampler_heads=4,
    # From scratch, Qwen's init makes the resampler a position-blind pooling; "local" starts each query on
    # its own image cell.
    resampler_init="local",
  ))
  c.mesh.shape = (1, -1, 1)
  c.train.steps = 4000
  c.train.batch_size = 24
  c.train.lr = 1e-3
  c.train.warmup_ratio = 0.03
  c.train.weight_decay = 0.01
  c.train.b2 = 0.98
  # Trained from scratch: every tower learns.
  c.train.train_vit = True
  c.train.log_every = 25
  c.train.checkpoint_every = 500
  c.train.max_minutes = 15.0
  c.eval.max_new_tokens = 40
  c.eval.batch_size = 64
  return c
