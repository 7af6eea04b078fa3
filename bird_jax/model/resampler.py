"""Qwen-VL's resampler (`visual.attn_pool`): one cross-attention from learned queries to the ViT tokens.

`Resampler(cfg)(x [N, L, vision_width]) -> [N, n_queries, hidden]` (before ln_post / proj).

  kv = ln_kv(kv_proj(x));  Q-in = ln_q(query) + pos_embed;  K-in = kv + interp(pos_embed);  V-in = kv
  out = MHA(Q-in, K-in, V-in)   (torch.nn.MultiheadAttention, hidden // 128 heads, no mask, no residual)

Param tree (torch names of the checkpoint in brackets):
  query (Q, E)                 [attn_pool.query]
  pos_embed (Q, E)             [attn_pool.pos_embed]  frozen 2D sin-cos; stop_gradient here. Exclude it
                               from the optimizer too (weight decay would still move it).
  kv_proj/kernel (W, E)        [attn_pool.kv_proj.weight], no bias
  ln_q, ln_kv /{scale,bias}
  attn/{query,key,value}/{kernel (E, h, d), bias (h, d)}   [attn.in_proj_weight/bias: [q; k; v] blocks]
  attn/out/{kernel (h, d, E), bias (E,)}                     [attn.out_proj]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.layers import (
  LayerNorm,
  attention,
  constrain,
  dense_general,
  interpolate_pos_table,
  partitioned,
  sincos_2d_table,
)

Array = jax.Array


class Resampler(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    e, nq = cfg.hidden_size, cfg.n_queries
    heads = cfg.num_resampler_heads
    qgrid = int(round(nq**0.5))
    query = self.param(
      "query",
      partitioned(nn.initializers.truncated_normal(0.02), ("resampler_queries", "resampler_embed")),
      (nq, e),
      cfg.params_dtype,
    )
    pos_init = lambda *_: jnp.asarray(sincos_2d_table(e, qgrid), cfg.params_dtype)
    pos_embed = self.param(
      "pos_embed", partitioned(pos_init, ("resampler_queries", "resampler_embed")), (nq, e), cfg.params_dtype
    )
    pos_embed = jax.lax.stop_gradient(pos_embed)
    ln = lambda n: LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=n)

    kv = dense_general(e, ("vit_embed", "resampler_embed"), cfg, use_bias=False, name="kv_proj")(x)
    kv = ln("ln_kv")(kv)
    kv_grid = int(round(x.shape[1] ** 0.5))
    if kv_grid * kv_grid != x.shape[1]:
      raise ValueError(f"resampler input has {x.shape[1]} tokens, not a square patch grid")
    k_in = kv + interpolate_pos_table(pos_embed, kv_grid).astype(kv.dtype)
    q_in = ln("ln_q")(query) + pos_embed.astype(cfg.compute_dtype)
    q_in = jnp.broadcast_to(q_in[None], (x.shape[0], nq, e))
    q_in = constrain(q_in, ("activation_batch", None, "activation_embed"))

    return CrossAttention(cfg, heads, name="attn")(q_in, k_in, kv)


class CrossAttention(nn.Module):
  """torch.nn.MultiheadAttention with separate q/k/v projections (checkpoint packs them as [q; k; v])."""

  cfg: QwenVLConfig
  heads: int

  @nn.compact
  def __call__(self, q_in: Array, k_in: Array, v_in: Array) -> Array:
    cfg = self.cfg
    e = cfg.hidden_size
    d = e // self.heads
    names = ("resampler_embed", "heads", "kv")
    proj = lambda n, t: dense_general((self.heads, d), names, cfg, name=n)(t)
    out = attention(proj("query", q_in), proj("key", k_in), proj("value", v_in), None, cfg.compute_dtype)
    return dense_general(e, ("heads", "kv", "resampler_embed"), cfg, axis=(-2, -1), name="out")(out)
