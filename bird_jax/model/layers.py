"""Building blocks shared by the vision tower, the resampler and the Qwen decoder.

Numerics follow the original PyTorch code (see ../shared/reference/qwen_vl.md §6):
* RMSNorm: statistics in float32, cast back to the activation dtype, then times the weight.
* LayerNorm (vision): eps 1e-6, two-pass variance in float32.
* GELU: exact erf form (torch `nn.GELU()` default), not Flax's tanh default.
* RoPE: rotate-half on [0:d/2] / [d/2:d], computed in float32.
* Positional-table interpolation: torch `F.interpolate(mode="bicubic", align_corners=False)`, i.e. cubic
  coefficient A=-0.75 with border replication, built here as two small float32 matrices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bird_jax.model.config import QwenVLConfig

Array = jax.Array
Initializer = Callable[..., Array]


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Every parameter goes through this so the lead's logical axis rules can shard it."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  return nn.with_logical_constraint(x, tuple(names))


BLE = ("activation_batch", "activation_length", "activation_embed")
BLHD = ("activation_batch", "activation_length", "activation_heads", None)


def remat_policy(name: str) -> Callable[..., bool] | None | str:
  """Config string -> jax.checkpoint policy. Returns "none" when no remat should be applied."""
  policies = jax.checkpoint_policies
  table: dict[str, Callable[..., bool] | None | str] = {
    "none": "none",
    "full": policies.nothing_saveable,
    "minimal": policies.checkpoint_dots_with_no_batch_dims,
    "dots_with_no_batch_dims": policies.dots_with_no_batch_dims_saveable,
    "dots": policies.dots_saveable,
  }
  if name not in table:
    raise ValueError(f"unknown remat policy {name!r}; use one of {sorted(table)}")
  return table[name]


def stack_blocks(
  block_cls: type[nn.Module],
  cfg: QwenVLConfig,
  policy_name: str,
  num: int,
  in_axes: tuple,
  name: str,
  layer_axis: str = "layers",
  **block_kwargs,
) -> nn.Module | list[nn.Module]:
  """Scanned (params get a leading `layer_axis` axis) or unrolled list of blocks, with optional remat.

  Blocks are called as block(carry, *args) -> (carry, per_layer_output). in_axes describes args
  (nn.broadcast or 0 for per-layer inputs, e.g. a KV cache stacked over layers).
  """
  policy = remat_policy(policy_name)
  cls = block_cls
  if policy != "none":
    cls = nn.remat(block_cls, policy=policy, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(
      cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=in_axes,
      length=num,
      metadata_params={nn.PARTITION_NAME: layer_axis},
    )
    return scanned(cfg, name=name, **block_kwargs)
  return [cls(cfg, name=f"{name}_{i}", **block_kwargs) for i in range(num)]


def run_blocks(
  blocks: nn.Module | Sequence[nn.Module], cfg: QwenVLConfig, x: Array, *args, per_layer: Sequence[bool] = ()
) -> tuple[Array, object]:
  """Runs stack_blocks' output -> (x, per-layer outputs).

  Scanned: args go to the scan as they are (per-layer ones stacked on a leading axis, in_axes=0); the
  outputs come back stacked. Unrolled: per_layer[i] says args[i] holds one entry per block (a sequence, e.g.
  a KV cache kept as a tuple of per-layer (k, v)), or is None; the outputs come back as a tuple with one
  entry per block (None when no block returns anything). Nothing is sliced out of or stacked into big arrays,
  so a decode step that threads per-layer caches through here copies no cache.
  """
  if not isinstance(blocks, (list, tuple)):
    return blocks(x, *args)
  outs = []
  for i, blk in enumerate(blocks):
    layer_args = [
      arg[i] if (j < len(per_layer) and per_layer[j] and arg is not None) else arg for j, arg in enumerate(args)
    ]
    x, out = blk(x, *layer_args)
    outs.append(out)
  return x, (None if all(o is None for o in outs) else tuple(outs))


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      "scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"
  scale_init: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale_init = nn.initializers.constant(self.scale_init)
    scale = self.param("scale", partitioned(scale_init, (self.axis_name,)), (d,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def gelu_exact(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)


class DenseGeneral(nn.Module):
  """y = x . kernel over the trailing `n_in` dims of x; kernel shape = those dims + features.

  Our own (not nn.DenseGeneral): Flax's version creates multi-dim kernels flat and reshapes them, which
  applies the rank-3 logical constraint to a rank-2 value under a mesh context and fails.
  """

  features: tuple[int, ...]
  n_in: int
  names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...]
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  init_std: float
  kernel_init: Initializer | None = None  # None -> normal(init_std)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.n_in :]
    kernel = self.param(
      "kernel",
      partitioned(self.kernel_init or nn.initializers.normal(self.init_std), self.names),
      tuple(in_shape) + tuple(self.features),
      self.param_dtype,
    )
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias", partitioned(nn.initializers.zeros, self.bias_names), tuple(self.features), self.param_dtype
      )
      y = y + bias.astype(self.dtype)
    return y


def dense_general(
  features: int | tuple[int, ...],
  names: Sequence[str | None],
  cfg: QwenVLConfig,
  *,
  axis: int | tuple[int, ...] = -1,
  use_bias: bool = True,
  name: str | None = None,
  bias_names: Sequence[str | None] | None = None,
  kernel_init: Initializer | None = None,
) -> DenseGeneral:
  """Dense layer whose kernel has logical axis names `names` (input dims then output dims).

  axis: the trailing input dims contracted (-1, or (-2, -1) for a heads x head_dim input).
  """
  feats = features if isinstance(features, tuple) else (features,)
  n_in = 1 if isinstance(axis, int) else len(axis)
  if (axis if isinstance(axis, int) else axis[-1]) != -1:
    raise ValueError("dense_general contracts trailing dims only")
  if bias_names is None:
    bias_names = tuple(names)[-len(feats) :]
  return DenseGeneral(
    features=feats,
    n_in=n_in,
    names=tuple(names),
    bias_names=tuple(bias_names),
    use_bias=use_bias,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    init_std=cfg.initializer_range,
    kernel_init=kernel_init,
    name=name,
  )


# ---------------------------------------------------------------------------------------- attention


def attention(q: Array, k: Array, v: Array, mask: Array | None, dtype: jnp.dtype) -> Array:
  """q [B,Lq,H,D], k/v [B,Lk,H,D], mask broadcastable to [B,H,Lq,Lk] (True = attend) -> [B,Lq,H,D].

  Scores and softmax in float32 (for float32 compute this is exactly the reference math; for bf16 it is
  the numerically safer choice). A fully masked row (padding query) gets uniform weights, never NaN.
  """
  scale = 1.0 / np.sqrt(q.shape[-1]).astype(np.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))


def cache_attention(q: Array, k: Array, v: Array, mask: Array, dtype: jnp.dtype) -> Array:
  """`attention` against a KV cache in its stored layout: q [B,Lq,H,D], k [B*H,D,S], v [B*H,S,D], mask
  broadcastable to [B,H,Lq,S] -> [B,Lq,H,D]. Same math; both products read the cache as stored (one batch
  axis, the contracted axis where a plain matmul wants it), so only the small q and output are transposed."""
  b, lq, h, d = q.shape
  scale = 1.0 / np.sqrt(d).astype(np.float32)
  qn = q.transpose(0, 2, 1, 3).reshape(b * h, lq, d)
  scores = jnp.einsum("nqd,ndk->nqk", qn, k.astype(dtype), preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores.reshape(b, h, lq, -1), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b * h, lq, -1)
  out = jnp.einsum("nqk,nkd->nqd", probs, v.astype(dtype))
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, base: float | Array) -> Array:
  """inv_freq_i = 1 / base^(2i/d), float32 (Qwen's RotaryEmbedding)."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.asarray(base, jnp.float32) ** exponent)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """x [B,L,H,D], positions [B,L] (int) -> rotated x in x.dtype; rotate-half form, float32 math.

  inv_freq is [D/2] or per-row [B, D/2] (dynamic NTK picks a base per sequence).
  """
  pos = positions.astype(jnp.float32)
  if inv_freq.ndim == 1:
    freqs = pos[..., None] * inv_freq
  else:
    freqs = pos[..., None] * inv_freq[:, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,L,1,D]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------- position tables


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (torch's upsample_bicubic2d)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  one = np.float32(1)
  return np.stack([far(t + one), near(t), near(one - t), far(np.float32(2) - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 matrix equal to torch bicubic (A=-0.75, align_corners=False, clamped borders) in 1D."""
  m = np.zeros((out_size, in_size), np.float32)
  if in_size == out_size:
    np.fill_diagonal(m, 1.0)
    return m
  # torch computes the source coordinate in float32: scale * (dst + 0.5) - 0.5 (no clamp for cubic).
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(src)
  t = (src - base).astype(np.float32)
  w = _cubic_weights(t, -0.75).astype(np.float32)
  for o in range(out_size):
    for tap in range(4):
      idx = min(max(int(base[o]) - 1 + tap, 0), in_size - 1)
      m[o, idx] += w[o, tap]
  return m


def interpolate_pos_table(table: Array, out_grid: int) -> Array:
  """Qwen's get_abs_pos: [S*S, C] square table -> [T*T, C] (row-major grid), float32 math, original dtype."""
  rows, c = table.shape
  src = int(round(rows**0.5))
  if src * src != rows:
    raise ValueError(f"positional table has {rows} rows, not a square grid")
  if src == out_grid:
    return table
  m = jnp.asarray(bicubic_matrix(src, out_grid))
  grid = table.astype(jnp.float32).reshape(src, src, c)
  out = jnp.einsum("ys,xt,stc->yxc", m, m, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(out_grid * out_grid, c).astype(table.dtype)


def sincos_2d_table(embed_dim: int, grid: int) -> np.ndarray:
  """MAE 2D sin-cos table [grid*grid, embed_dim]: first half encodes the column (x), second the row (y)."""

  def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
  return emb.astype(np.float32)
