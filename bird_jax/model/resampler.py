"""Qwen-VL's resampler (`visual.attn_pool`): one cross-attention from learned queries to the ViT tokens.

`Resampler(cfg)(x [N, L, vision_width]) -> [N, n_queries, hidden]` (before ln_post / proj).

  kv = ln_kv(kv_proj(x));  Q-in = ln_q(query) + pos_embed;  K-in = kv + interp(pos_embed);  V-in = kv
  out = MHA(Q-in, K-in, V-in)   (torch.nn.MultiheadAttention, hidden // 128 heads, no mask, no residual)

`cfg.resampler_init="local"` only changes the random initialisation (see `local_attention_kernel`).

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
import numpy as np

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

# "local" init: logit contrast of the sharpest head (each further head halves it: sharp -> broad pooling),
# and the LayerNorm scale that keeps content small next to position in the keys and queries at step 0.
LOCAL_SHARPNESS = 40.0
LOCAL_CONTENT_SCALE = 0.03


def local_attention_kernel(embed_dim: int, heads: int, query_grid: int) -> np.ndarray:
  """[E, heads, head_dim] query/key kernel whose attention logits are a local kernel of the sin-cos positions.

  The resampler adds a frozen 2-D sin-cos table to its queries and keys. Copying, into each head, the sin and
  cos dims of the frequencies that resolve the query grid (omega * grid >= 1, x and y) makes
  q.k = sum_w cos(w dx) + cos(w dy): peaked where query and key positions coincide. With this kernel on both
  the query and the key projection (and content scaled down), query i starts as a pooling of the patches of its
  own grid cell (head 0, ~95 % of its weight) to a broad neighbourhood (last head), so position survives the
  resampler from the first step instead of being averaged away.
  """
  d = embed_dim // heads
  n_freq = embed_dim // 4  # per axis, per sin/cos (sincos_2d_table's layout: [sin x | cos x | sin y | cos y])
  if d // 4 < 1:
    raise ValueError(f"resampler head_dim {d} is too small for the local init; use fewer heads")
  omega = 1.0 / 10000 ** (np.arange(n_freq) / n_freq)
  resolving = np.flatnonzero(omega * query_grid >= 1.0)
  # More than fit in a head (big grids): spread the choice over the band, so low frequencies undo the
  # aliasing of the high ones (a peak every 2*pi/omega cells).
  picks = np.linspace(0, len(resolving) - 1, min(len(resolving), d // 4)).round().astype(int)
  freqs = sorted({int(resolving[i]) for i in picks})
  kernel = np.zeros((embed_dim, heads, d), np.float32)
  for h in range(heads):
    # Both projections carry the factor, so logits = sharpness/2^h * mean over freqs of the cosines.
    amp = np.sqrt(LOCAL_SHARPNESS / 2**h * np.sqrt(d) / len(freqs))
    for i, k in enumerate(freqs):
      for j in range(4):
        kernel[j * n_freq + k, h, 4 * i + j] = amp
  return kernel


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
    local = cfg.resampler_init == "local"
    content = LOCAL_CONTENT_SCALE if local else 1.0
    ln = lambda n: LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype, scale_init=content, name=n)

    kv = dense_general(e, ("vit_embed", "resampler_embed"), cfg, use_bias=False, name="kv_proj")(x)
    kv = ln("ln_kv")(kv)
    kv_grid = int(round(x.shape[1] ** 0.5))
    if kv_grid * kv_grid != x.shape[1]:
      raise ValueError(f"resampler input has {x.shape[1]} tokens, not a square patch grid")
    k_in = kv + interpolate_pos_table(pos_embed, kv_grid).astype(kv.dtype)
    q_in = ln("ln_q")(query) + pos_embed.astype(cfg.compute_dtype)
    q_in = jnp.broadcast_to(q_in[None], (x.shape[0], nq, e))
    q_in = constrain(q_in, ("activation_batch", None, "activation_embed"))

    return CrossAttention(cfg, heads, local_grid=qgrid if local else 0, name="attn")(q_in, k_in, kv)


class CrossAttention(nn.Module):
  """torch.nn.MultiheadAttention with separate q/k/v projections (checkpoint packs them as [q; k; v])."""

  cfg: QwenVLConfig
  heads: int
  local_grid: int = 0  # >0: query/key kernels start as local_attention_kernel for this query grid

  @nn.compact
  def __call__(self, q_in: Array, k_in: Array, v_in: Array) -> Array:
    cfg = self.cfg
    e = cfg.hidden_size
    d = e // self.heads
    names = ("resampler_embed", "heads", "kv")
    fixed = None
    if self.local_grid:
      grid = self.local_grid
      fixed = lambda _key, shape, dtype: jnp.asarray(local_attention_kernel(e, self.heads, grid), dtype).reshape(shape)
    proj = lambda n, t, init=None: dense_general((self.heads, d), names, cfg, kernel_init=init, name=n)(t)
    q, k = proj("query", q_in, fixed), proj("key", k_in, fixed)
    out = attention(q, k, proj("value", v_in), None, cfg.compute_dtype)
    return dense_general(e, ("heads", "kv", "resampler_embed"), cfg, axis=(-2, -1), name="out")(out)
