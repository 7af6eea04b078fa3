"""Qwen(-7B) decoder as used inside Qwen-VL: RMSNorm pre-norm blocks, RoPE, MHA with q/k/v bias, SwiGLU.

`QwenLM(cfg)(input_ids [B, L], ...) -> logits [B, L, V] float32` (KV-cache modes: see `QwenLM.__call__`).

Param tree (torch names of the checkpoint in brackets):
  wte/embedding (V, E)                                  [transformer.wte.weight]
  h_{i}/... or h/... (scan_layers: leading layer axis)   [transformer.h.{i}.*]
      ln_1/scale, ln_2/scale                            [ln_1.weight, ln_2.weight]
      attn/{query,key,value}/{kernel (E, H, D), bias (H, D)}   [attn.c_attn: contiguous [q | k | v] rows]
      attn/c_proj/kernel (H, D, E)                      [attn.c_proj.weight], no bias
      mlp/w1/kernel (E, F)   up branch                  [mlp.w1.weight]
      mlp/w2/kernel (E, F)   gate branch (SiLU)         [mlp.w2.weight]
      mlp/c_proj/kernel (F, E)                          [mlp.c_proj.weight]
  ln_f/scale                                            [transformer.ln_f.weight]
  lm_head (E, V)                                        [lm_head.weight, transposed]
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.layers import (
  BLE,
  BLHD,
  RMSNorm,
  apply_rope,
  attention,
  constrain,
  dense_general,
  partitioned,
  rope_inv_freq,
  run_blocks,
  stack_blocks,
)

Array = jax.Array
KVCache = tuple[Array, Array]  # k, v: [layers, B, S, H, D]


class QwenAttention(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(
    self,
    x: Array,
    positions: Array,
    mask: Array,
    inv_freq: Array,
    logn: Array | None,
    cache: KVCache | None,
    cache_index: Array | None,
  ) -> tuple[Array, KVCache]:
    cfg = self.cfg
    names = ("embed", "heads", "kv")
    proj = lambda n: dense_general((cfg.num_heads, cfg.head_dim), names, cfg, name=n)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if logn is not None:  # inference-only query scaling beyond seq_length (Qwen v1); cached k/v unscaled
      q = q * logn[:, :, None, None].astype(q.dtype)
    q, k, v = (constrain(t, BLHD) for t in (q, k, v))
    if cache is None:
      new_kv = (k, v)
    else:  # decode: write this step's k/v at cache_index and attend over the whole cache
      ck, cv = cache
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
      new_kv = (ck, cv)
      k, v = ck.astype(cfg.compute_dtype), cv.astype(cfg.compute_dtype)
    out = attention(q, k, v, mask[:, None], cfg.compute_dtype)
    out = dense_general(
      cfg.hidden_size, ("heads", "kv", "embed"), cfg, axis=(-2, -1), use_bias=False, name="c_proj"
    )(out)
    return out, new_kv


class QwenMLP(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    up = dense_general(cfg.mlp_dim, ("embed", "mlp"), cfg, use_bias=False, name="w1")(x)
    gate = dense_general(cfg.mlp_dim, ("embed", "mlp"), cfg, use_bias=False, name="w2")(x)
    y = up * jax.nn.silu(gate)
    return dense_general(cfg.hidden_size, ("mlp", "embed"), cfg, use_bias=False, name="c_proj")(y)


class QwenBlock(nn.Module):
  cfg: QwenVLConfig
  # Static: prefill/training return this layer's k/v only when asked, so training does not keep them alive.
  return_kv: bool = False

  @nn.compact
  def __call__(
    self,
    x: Array,
    positions: Array,
    mask: Array,
    inv_freq: Array,
    logn: Array | None,
    cache: KVCache | None,
    cache_index: Array | None,
  ) -> tuple[Array, KVCache | None]:
    cfg = self.cfg
    norm = lambda n: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=n)
    h, kv = QwenAttention(cfg, name="attn")(
      norm("ln_1")(x), positions, mask, inv_freq, logn, cache, cache_index
    )
    x = x + h
    x = x + QwenMLP(cfg, name="mlp")(norm("ln_2")(x))
    x = constrain(x, BLE)
    return x, (kv if (self.return_kv or cache is not None) else None)


def ntk_alpha(lengths: Array, seq_length: int) -> Array:
  """Qwen's dynamic-NTK alpha for a prefill of `lengths` tokens: max(2^ceil(log2(L/seq_len) + 1) - 1, 1)."""
  ctx = jnp.log2(jnp.maximum(lengths.astype(jnp.float32), 1.0) / seq_length) + 1.0
  return jnp.maximum(2.0 ** jnp.ceil(ctx) - 1.0, 1.0)


def merge_image_features(
  hidden: Array, input_ids: Array, features: Array, n_images: int, image_start_id: int, n_queries: int
) -> Array:
  """Overwrite rows a+1..a+n_queries after the k-th `<img>` (id image_start_id) of row b with features[b, k].

  hidden [B, L, E]; features [B, n_images * n_queries, E]. Static shapes, no Python loop over tokens.
  `<img>` tokens beyond n_images, and slots cut off by the sequence end, keep their embeddings.
  """
  _, length = input_ids.shape
  is_start = input_ids == image_start_id
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  last_start = jax.lax.cummax(jnp.where(is_start, idx, -1), axis=1)
  image_k = jnp.cumsum(is_start, axis=1, dtype=jnp.int32) - 1
  offset = idx - last_start - 1
  inside = (last_start >= 0) & (offset >= 0) & (offset < n_queries) & (image_k < n_images)
  flat = jnp.clip(image_k, 0, n_images - 1) * n_queries + jnp.clip(offset, 0, n_queries - 1)
  gathered = jnp.take_along_axis(features, flat[..., None], axis=1)
  return jnp.where(inside[..., None], gathered.astype(hidden.dtype), hidden)


def causal_segment_mask(segment_ids: Array | None, batch: int, length: int) -> Array:
  """[B, L, L] bool: causal and (when given) same non-zero segment."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  if segment_ids is None:
    return jnp.broadcast_to(causal, (batch, length, length))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal & same & (segment_ids[:, None, :] != 0)


class QwenLM(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    image_features: Array | None = None,
    n_images: int = 0,
    cache: KVCache | None = None,
    cache_index: Array | None = None,
    kv_mask: Array | None = None,
    return_kv: bool = False,
    inference: bool = False,
    rope_alpha: Array | None = None,
    return_hidden: bool = False,
  ) -> Array | tuple[Array, KVCache]:
    """Modes:
      * training / plain forward: cache=None, return_kv=False -> logits [B, L, V] float32.
      * prefill: return_kv=True -> (logits, (k, v)) with k/v [layers, B, L, H, D] (pad them into a cache).
      * decode: cache=(k, v) [layers, B, S, H, D], cache_index (scalar int: slot of input_ids[:, 0]),
        kv_mask [B, S] bool (valid cache slots, must include the slots written now) -> (logits, new cache).
    positions default to arange(L) (+ cache_index). segment_ids [B, L]: 0 = padding, equal ids attend
    causally; ignored in decode mode (kv_mask decides). inference=True enables Qwen's logn scaling (and,
    with rope_alpha [B] from `ntk_alpha`, dynamic NTK); both are no-ops up to cfg.seq_length tokens.
    return_hidden=True returns the ln_f output [B, L, E] instead of logits (for a chunked loss).
    """
    cfg = self.cfg
    batch, length = input_ids.shape
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      embedding_init=partitioned(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
      name="wte",
    )
    x = embed(input_ids)
    if image_features is not None:
      x = merge_image_features(x, input_ids, image_features, n_images, cfg.image_start_id, cfg.n_queries)
    x = constrain(x, BLE)

    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
      if cache_index is not None:
        positions = positions + cache_index
    if cache is None:
      mask = causal_segment_mask(segment_ids, batch, length)
    else:
      if kv_mask is None or cache_index is None:
        raise ValueError("QwenLM decode mode needs cache_index and kv_mask")
      slots = jnp.arange(cache[0].shape[2], dtype=jnp.int32)
      q_slots = cache_index + jnp.arange(length, dtype=jnp.int32)
      mask = (slots[None, None, :] <= q_slots[None, :, None]) & kv_mask[:, None, :]

    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base)
    if inference and cfg.use_dynamic_ntk and rope_alpha is not None:
      base = cfg.rope_base * rope_alpha.astype(jnp.float32) ** (cfg.head_dim / (cfg.head_dim - 2))
      dyn = jax.vmap(lambda b: rope_inv_freq(cfg.head_dim, b))(base)
      inv_freq = jnp.where((rope_alpha == 1.0)[:, None], inv_freq[None], dyn)
    logn = None
    if inference and cfg.use_logn_attn:
      p1 = (positions + 1).astype(jnp.float32)
      logn = jnp.where(p1 > cfg.seq_length, jnp.log(p1) / math.log(cfg.seq_length), 1.0)

    blocks = stack_blocks(
      QwenBlock,
      cfg,
      cfg.remat_policy,
      cfg.num_layers,
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
      name="h",
      return_kv=return_kv,
    )
    x, kv = run_blocks(
      blocks,
      cfg,
      x,
      positions,
      mask,
      inv_freq,
      logn,
      cache,
      cache_index,
      per_layer=(False, False, False, False, True, False),
    )

    x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="ln_f")(x)
    if return_hidden:
      out = x
    else:
      head = self.param(
        "lm_head",
        partitioned(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
        (cfg.hidden_size, cfg.vocab_size),
        cfg.params_dtype,
      )
      out = jnp.einsum("ble,ev->blv", x, head.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
      out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
    if return_kv or cache is not None:
      return out, kv
    return out
