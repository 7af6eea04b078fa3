"""Qwen-VL in Flax Linen (see qwen_vl.py for how to call it and the param layout)."""

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.qwen_vl import (
  QwenVL,
  abstract_params,
  encode_images,
  init_params,
  param_count,
  trainable_mask,
)

__all__ = [
  "QwenVL",
  "QwenVLConfig",
  "abstract_params",
  "encode_images",
  "init_params",
  "param_count",
  "trainable_mask",
]
