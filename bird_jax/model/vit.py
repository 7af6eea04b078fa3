"""Qwen-VL vision tower: ViT trunk (no class token) + resampler + ln_post + proj.

`VisionTower(cfg)(pixel_values [N, H, W, 3]) -> [N, n_queries, hidden]`; pixels float32 CLIP-normalised NHWC.

Param tree (Flax names; torch names of the HF checkpoint in brackets):
  conv1/kernel                 (p*p*3, W)   [visual.conv1.weight OIHW, flattened in (kh, kw, c) order]
  positional_embedding         (G*G, W)     [visual.positional_embedding], G = cfg.vision_pos_grid
  ln_pre/{scale,bias}
  resblocks_{i}/... or resblocks/... (scan_layers: leading layer axis)
      ln_1, ln_2 /{scale,bias}
      attn/{query,key,value}/{kernel (W, h, d), bias (h, d)}   [attn.in_proj, per-head interleaved in torch]
      attn/out/{kernel (h, d, W), bias (W,)}                     [attn.out_proj]
      mlp/c_fc/{kernel (W, M), bias}, mlp/c_proj/{kernel (M, W), bias}
  attn_pool/...                (see resampler.py)
  ln_post/{scale,bias}         (hidden,)
  proj                         (hidden, hidden) used as x @ proj   [visual.proj, already (in, out)]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bird_jax.model.attention_ops import fused_attention
from bird_jax.model.config import QwenVLConfig
from bird_jax.model.layers import (
  BLE,
  LayerNorm,
  constrain,
  dense_general,
  gelu_exact,
  interpolate_pos_table,
  partitioned,
  run_blocks,
  stack_blocks,
)
from bird_jax.model.resampler import Resampler

Array = jax.Array


class VisionAttention(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    h, d = cfg.vision_heads, cfg.vision_head_dim
    proj = lambda n: dense_general((h, d), ("vit_embed", "vit_heads", "vit_kv"), cfg, name=n)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    out = fused_attention(q, k, v, causal=False, impl=cfg.attention_impl, dtype=cfg.compute_dtype)
    return dense_general(
      cfg.vision_width, ("vit_heads", "vit_kv", "vit_embed"), cfg, axis=(-2, -1), name="out"
    )(out)


class VisionBlock(nn.Module):
  """Pre-LN residual block; MLP params grouped under `mlp` to mirror the checkpoint layout."""

  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, None]:
    cfg = self.cfg
    ln = lambda n: LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=n)
    x = x + VisionAttention(cfg, name="attn")(ln("ln_1")(x))
    x = x + VisionMLP(cfg, name="mlp")(ln("ln_2")(x))
    return constrain(x, BLE), None


class VisionMLP(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    y = dense_general(cfg.vision_mlp_dim, ("vit_embed", "vit_mlp"), cfg, name="c_fc")(x)
    y = gelu_exact(y)
    return dense_general(cfg.vision_width, ("vit_mlp", "vit_embed"), cfg, name="c_proj")(y)


def patchify(pixels: Array, patch: int) -> Array:
  """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C], patches row-major, each flattened in (kh, kw, c) order."""
  n, hh, ww, c = pixels.shape
  gh, gw = hh // patch, ww // patch
  x = pixels.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * gw, patch * patch * c)


class VisionTower(nn.Module):
  cfg: QwenVLConfig

  def setup(self) -> None:
    cfg = self.cfg
    w = cfg.vision_width
    self.conv1 = dense_general(w, ("vit_patch", "vit_embed"), cfg, use_bias=False, name="conv1")
    self.positional_embedding = self.param(
      "positional_embedding",
      partitioned(nn.initializers.normal(w**-0.5), (None, "vit_embed")),
      (cfg.vision_pos_grid**2, w),
      cfg.params_dtype,
    )
    self.ln_pre = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype)
    self.resblocks = stack_blocks(
      VisionBlock,
      cfg,
      cfg.vision_remat_policy or cfg.remat_policy,
      cfg.vision_layers,
      in_axes=(),
      name="resblocks",
      layer_axis="vit_layers",
    )
    # The resampler trains while everything after it (the whole decoder) runs: with remat on, its attention
    # probabilities (n_images x heads x queries x patches, float32) are recomputed in backward instead of
    # being held through the decoder's forward and backward; only the trunk's output is kept.
    remat = (cfg.vision_remat_policy or cfg.remat_policy) != "none"
    self.attn_pool = (nn.remat(Resampler) if remat else Resampler)(cfg)
    self.ln_post = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype)
    self.proj = self.param(
      "proj",
      partitioned(nn.initializers.normal(cfg.hidden_size**-0.5), ("resampler_embed", "embed")),
      (cfg.hidden_size, cfg.hidden_size),
      cfg.params_dtype,
    )

  def trunk(self, pixel_values: Array) -> Array:
    """[N, H, W, 3] -> ViT trunk output [N, (H/p)*(W/p), W] (no final LayerNorm: Qwen has none here)."""
    cfg = self.cfg
    if pixel_values.shape[1] != pixel_values.shape[2] or pixel_values.shape[1] % cfg.patch_size:
      raise ValueError(
        f"pixel_values {pixel_values.shape}: need square images, side a multiple of "
        f"patch_size {cfg.patch_size} (preprocess to {cfg.image_size}x{cfg.image_size})"
      )
    x = patchify(pixel_values.astype(cfg.compute_dtype), cfg.patch_size)
    x = self.conv1(x)
    grid = pixel_values.shape[1] // cfg.patch_size
    x = x + interpolate_pos_table(self.positional_embedding, grid).astype(x.dtype)
    x = self.ln_pre(x)
    x = constrain(x, BLE)
    x, _ = run_blocks(self.resblocks, cfg, x)
    return x

  def __call__(self, pixel_values: Array) -> Array:
    x = self.trunk(pixel_values)
    x = self.attn_pool(x)
    x = self.ln_post(x)
    return jnp.einsum("bqe,ef->bqf", x, self.proj.astype(x.dtype))
