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

from bird_jax.model.attention_ops import fused_attention, resolve_impl
from bird_jax.model.config import QwenVLConfig
from bird_jax.model.layers import (
  BLE,
  BLHD,
  RMSNorm,
  apply_rope,
  attention,
  cache_attention,
  constrain,
  dense_general,
  partitioned,
  rope_inv_freq,
  run_blocks,
  stack_blocks,
)
from bird_jax.model.lora import adapter

Array = jax.Array
# A layer's cache in the layouts decode attention reads without a transpose: k [B*H, D, S], v [B*H, S, D]
# (row b*H + h; slot s = token s). Batch and heads are one axis so that no size-1 axis (batch 1) sits between
# the cache and the attention matmuls: XLA would then duplicate the in-place update into a reshaped copy.
# The model's cache: a tuple of per-layer (k, v) (unrolled layers), or one (k, v) stacked on a leading layer
# axis (scan_layers).
LayerKV = tuple[Array, Array]
KVCache = tuple[LayerKV, ...] | LayerKV


def _stacked(cache: KVCache) -> bool:
  return not isinstance(cache[0], (tuple, list))


def cache_slots(cache: KVCache) -> int:
  """Number of slots S of a cache in either form."""
  return (cache if _stacked(cache) else cache[0])[1].shape[-2]


def pad_cache(cache: KVCache, extra: int, dtype: jnp.dtype | None = None) -> KVCache:
  """Append `extra` empty slots to a prefill's k/v (return_kv=True), optionally casting, giving a cache."""

  def pad(a: Array, axis: int) -> Array:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a if dtype is None else a.astype(dtype), widths)

  pair = lambda kv: (pad(kv[0], -1), pad(kv[1], -2))
  return pair(cache) if _stacked(cache) else tuple(pair(kv) for kv in cache)


class QwenAttention(nn.Module):
  cfg: QwenVLConfig
  # Static: "" -> `mask` is the dense [B, Lq, S] boolean mask (XLA attention, and every decode step); else the
  # fused kernel of that name (attention_ops) and `mask` holds the [B, L] segment ids of a training/prefill row.
  fused: str = ""

  @nn.compact
  def __call__(
    self,
    x: Array,
    positions: Array,
    mask: Array,
    inv_freq: Array,
    logn: Array | None,
    cache: LayerKV | None,
    cache_index: Array | None,
    layer: Array | None = None,
  ) -> tuple[Array, LayerKV]:
    """cache None: k/v of x come back in cache layout (k [B*H, D, L], v [B*H, L, D]). Else decode: this
    step's k/v are written at slot cache_index of cache (one layer's, or stacked over layers with `layer` the
    index into it), in place, and attention runs over the whole cache; the updated cache comes back."""
    cfg = self.cfg
    names = ("embed", "heads", "kv")
    proj = lambda n: dense_general((cfg.num_heads, cfg.head_dim), names, cfg, name=n)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    qkv_lora = adapter(cfg, "c_attn", ("embed",), (3, cfg.num_heads, cfg.head_dim), (None, "heads", "kv"))
    if qkv_lora is not None:
      d = qkv_lora(x)
      q, k, v = q + d[..., 0, :, :], k + d[..., 1, :, :], v + d[..., 2, :, :]
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if logn is not None:  # inference-only query scaling beyond seq_length (Qwen v1); cached k/v unscaled
      q = q * logn[:, :, None, None].astype(q.dtype)
    q, k, v = (constrain(t, BLHD) for t in (q, k, v))
    # [B, L, H, D] -> cache layout; only the new tokens are transposed, never the cache
    bh = x.shape[0] * cfg.num_heads
    k_layout = lambda t: t.transpose(0, 2, 3, 1).reshape(bh, cfg.head_dim, -1)
    v_layout = lambda t: t.transpose(0, 2, 1, 3).reshape(bh, -1, cfg.head_dim)
    if cache is None:
      new_kv = (k_layout(k), v_layout(v))
      if self.fused:
        out = fused_attention(q, k, v, segment_ids=mask, causal=True, impl=self.fused, dtype=cfg.compute_dtype)
      else:
        out = attention(q, k, v, mask[:, None], cfg.compute_dtype)
    else:
      ck, cv = cache
      zero = jnp.zeros((), jnp.int32)
      idx = jnp.asarray(cache_index, jnp.int32)
      k_start, v_start = (zero, zero, idx), (zero, idx, zero)
      lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
      upd = lambda t, c: t.reshape((1,) * len(lead) + t.shape).astype(c.dtype)
      ck = jax.lax.dynamic_update_slice(ck, upd(k_layout(k), ck), lead + k_start)
      cv = jax.lax.dynamic_update_slice(cv, upd(v_layout(v), cv), lead + v_start)
      new_kv = (ck, cv)
      if layer is not None:  # this layer's slice of the stacked cache (XLA on CPU copies it for the matmuls)
        ck = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
        cv = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
      out = cache_attention(q, ck, cv, mask[:, None], cfg.compute_dtype)
    y = dense_general(cfg.hidden_size, ("heads", "kv", "embed"), cfg, axis=(-2, -1), use_bias=False,
                      name="c_proj")(out)
    out_lora = adapter(cfg, "attn.c_proj", ("heads", "kv"), (cfg.hidden_size,), ("embed",))
    return (y if out_lora is None else y + out_lora(out)), new_kv


class QwenMLP(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg

    def project(target: str, name: str, h: Array, features: int, names: tuple[str, str]) -> Array:
      y = dense_general(features, names, cfg, use_bias=False, name=name)(h)
      lora = adapter(cfg, target, names[:1], (features,), names[1:])
      return y if lora is None else y + lora(h)

    up = project("w1", "w1", x, cfg.mlp_dim, ("embed", "mlp"))
    gate = project("w2", "w2", x, cfg.mlp_dim, ("embed", "mlp"))
    return project("mlp.c_proj", "c_proj", up * jax.nn.silu(gate), cfg.hidden_size, ("mlp", "embed"))


class QwenBlock(nn.Module):
  cfg: QwenVLConfig
  # Static: prefill/training return this layer's k/v only when asked, so training does not keep them alive.
  return_kv: bool = False
  # Static, scanned decode: the carry is (x, stacked cache, layer index); the block updates its layer's
  # slice of the stacked cache in place and passes the cache on, so the scan neither slices the cache into
  # per-layer inputs nor stacks per-layer outputs back (each a full copy of the cache per token).
  carry_cache: bool = False
  fused: str = ""  # QwenAttention.fused

  @nn.compact
  def __call__(
    self,
    x: Array | tuple[Array, LayerKV, Array],
    positions: Array,
    mask: Array,
    inv_freq: Array,
    logn: Array | None,
    cache: LayerKV | None,
    cache_index: Array | None,
  ) -> tuple[Array | tuple[Array, LayerKV, Array], LayerKV | None]:
    cfg = self.cfg
    layer = None
    if self.carry_cache:
      x, cache, layer = x
    norm = lambda n: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=n)
    attn = QwenAttention(cfg, self.fused, name="attn")
    h, kv = attn(norm("ln_1")(x), positions, mask, inv_freq, logn, cache, cache_index, layer)
    x = x + h
    x = x + QwenMLP(cfg, name="mlp")(norm("ln_2")(x))
    x = constrain(x, BLE)
    if self.carry_cache:
      return (x, kv, layer + 1), None
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
      * prefill: return_kv=True -> (logits, kv): kv = tuple of per-layer (k [B*H, D, L], v [B*H, L, D])
        (unrolled layers) or that pair stacked on a leading layer axis (scan_layers). `pad_cache` makes a
        cache of it.
      * decode: cache = that structure with S slots, cache_index (scalar int: slot of input_ids[:, 0]),
        kv_mask [B, S] bool (valid cache slots, must include the slots written now) -> (logits, new cache).
        Only this step's slots are written (in place under jit / in a while_loop carry).
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
    fused = ""
    if cache is None:
      impl = resolve_impl(cfg.attention_impl, dtype=cfg.compute_dtype, head_dim=cfg.head_dim, seq_len=length)
      if impl == "xla":
        mask = causal_segment_mask(segment_ids, batch, length)
      else:  # the kernel takes the segment ids themselves; no [B, L, L] mask is built
        fused = impl
        mask = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    else:
      if kv_mask is None or cache_index is None:
        raise ValueError("QwenLM decode mode needs cache_index and kv_mask")
      slots = jnp.arange(cache_slots(cache), dtype=jnp.int32)
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

    carry_cache = cfg.scan_layers and cache is not None
    blocks = stack_blocks(
      QwenBlock,
      cfg,
      cfg.remat_policy,
      cfg.num_layers,
      in_axes=(nn.broadcast,) * 4 + ((nn.broadcast if carry_cache else 0), nn.broadcast),
      name="h",
      return_kv=return_kv,
      carry_cache=carry_cache,
      fused=fused,
    )
    if carry_cache:
      (x, kv, _), _ = blocks(
        (x, cache, jnp.zeros((), jnp.int32)), positions, mask, inv_freq, logn, None, cache_index
      )
    else:
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
