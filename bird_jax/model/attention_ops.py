"""Self-attention with one switch for the kernel: XLA einsum, blocked (flash-style in XLA), TPU splash (Pallas) or
cuDNN flash.

`fused_attention(q, k, v, segment_ids=..., causal=..., impl=..., dtype=...)` is what the decoder (causal,
packed rows with segment ids) and the vision tower (full attention, no mask) call in training and prefill.
q, k, v are [B, L, H, D] (one L for queries and keys), the scale is 1/sqrt(D), the result is [B, L, H, D] in
`dtype`. Segment ids are [B, L] int32: equal ids attend to each other, 0 marks padding.

impl:
* "xla": the boolean mask of `qwen.causal_segment_mask` (causal & same segment & key segment != 0; no mask for
  causal=False without segment ids) and `layers.attention`. Bit-identical to the model's own path. A padding
  query row (segment 0) has no key to attend to and gets uniform weights (finite).
* "blocked": flash attention written in XLA ops, for backends without a kernel (CPU, and shapes the kernels
  cannot take): query blocks of at most BLOCKED_QUERY_BLOCK (the fewest, as even as possible: 1,025 -> 3 x 342,
  the tail padded and masked) loop (`fori_loop`) over their key blocks -- only those at or below the diagonal
  when causal -- with an online softmax; a custom VJP keeps only the output and the row log-sum-exp and
  recomputes each tile's probabilities in backward. Memory is O(L) (one [B, H, block, block] tile at a time;
  grad temporaries 18 MiB at L=1,024 and 20 MiB at 4,096 where "xla" needs 49 and 772 MiB, B=1, 4 heads), and
  on this 2-core CPU it is faster than "xla" (fwd+bwd, B=2, 8 heads: 1,025 full 295 -> 190 ms, 2,048 causal
  1,402 -> 734 ms). Same mask and fill as "xla"; agrees with it to float rounding on every query row that has a
  key (a padding row sees only its own block's keys, uniformly). An unrolled Python loop over blocks does not do
  this: XLA:CPU schedules every block's scores at once and the memory is quadratic again.
* "splash": `jax.experimental.pallas.ops.tpu.splash_attention`, block sizes 512 (the largest multiple of 128
  up to 512 that divides L), fused backward off, as MaxText. Needs L % 128 == 0. Segment ids go to the
  kernel as they are: padding tokens (id 0) attend to each other causally, so no row is empty and nothing is
  NaN; outputs differ from "xla" only on padding query rows, which the loss masks out. Under a mesh
  (`jax.set_mesh`) it runs inside `jax.shard_map`, batch over ('data', 'fsdp') and heads over 'tensor' (an
  axis that does not divide the dimension, or that the mesh lacks, is left replicated for that dimension);
  already-manual axes (called from inside a shard_map) make it call the kernel on the local block directly --
  that outer shard_map needs check_vma=False (pallas_call gives its outputs no varying-axes type).
  Off TPU (decided from the mesh's devices, else the default backend) the kernel runs in Pallas interpret
  mode (slow: about 1 s per call at L=256 on CPU; `FORCE_SPLASH_INTERPRET` overrides). No forward-mode
  (JVP) support; reverse mode (jax.grad) works.
* "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`, layout BTNH as ours. Needs a GPU,
  bf16/fp16 (q, k, v are cast to `dtype`), head_dim <= 256 and a multiple of 8. Causal without segment ids
  uses `is_causal=True`. There is no segment-id argument: packed rows pass a dense boolean mask [B, 1, L, L]
  with the full T and S dims (jax #28974: a mask with broadcast dims is not expanded) and is_causal=False.
  That mask is causal & same segment -- it drops `qwen.causal_segment_mask`'s "key segment != 0" term, which
  only changes padding query rows: they attend to the padding keys before them instead of to nothing, so no
  row is fully masked (cuDNN's output for a fully masked row is not specified and could be NaN, which a
  multiplicative loss mask would turn into NaN gradients). Non-padding rows are unchanged. Known issues to
  check on hardware: a dense mask costs B*L*L bytes and becomes a bias inside JAX (jax #30593: bias
  gradients only at batch 1 -- the mask is boolean, so no bias gradient is asked for; #34685); the real
  packed (THD / q_offsets) layout is private to JAX and not used. On CPU the same wiring runs with
  `_cudnn_attention(..., implementation="xla")` for tests.
* "auto": `resolve_impl` -- splash on TPU, cudnn on GPU when dtype is bf16/fp16 and head_dim <= 256 and a
  multiple of 8; otherwise, and for a shape the picked kernel cannot take (splash: L % 128; cudnn: dtype /
  head_dim; e.g. the ViT's 1,025 tokens), "xla" while L fits one block (L <= BLOCKED_QUERY_BLOCK: bit-identical
  to the model's path) and "blocked" beyond.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bird_jax.model.layers import attention

Array = jax.Array

ATTENTION_IMPLS = ("auto", "xla", "blocked", "splash", "cudnn")

# None: interpret mode exactly when the target platform is not TPU. True/False forces it (tests).
FORCE_SPLASH_INTERPRET: bool | None = None

SPLASH_BLOCK = 512
BLOCKED_QUERY_BLOCK = 512
_SPLASH_LANES = 128
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def _check_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; use one of {ATTENTION_IMPLS}")


def _context_mesh():
  """The abstract mesh of `jax.set_mesh` (works inside jit), or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def target_platform() -> str:
  """Platform of the mesh in context (its devices may be compile-only TPU ones), else the default device's."""
  mesh = _context_mesh()
  if mesh is not None:
    device = getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    if platform:
      return platform
  return jax.devices()[0].platform


def _cudnn_ok(dtype, head_dim: int | None) -> bool:
  if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  return head_dim is None or (head_dim <= 256 and head_dim % 8 == 0)


def resolve_impl(impl: str, *, dtype=None, head_dim: int | None = None, seq_len: int | None = None) -> str:
  """"auto" -> the implementation for the platform in context; others are returned as they are.

  Without dtype / head_dim / seq_len only the platform decides ("auto" on GPU gives "cudnn"); with them a
  shape the kernel cannot take gives "xla".
  """
  _check_impl(impl)
  if impl != "auto":
    return impl
  platform = target_platform()
  if platform == "tpu":
    return "splash" if seq_len is None or seq_len % _SPLASH_LANES == 0 else _einsum_impl(seq_len)
  if platform in ("gpu", "cuda", "rocm") and _cudnn_ok(dtype, head_dim):
    return "cudnn"
  return _einsum_impl(seq_len)


def _einsum_impl(seq_len: int | None) -> str:
  """Without a kernel: the exact einsum path while one query block covers the sequence, blocked beyond."""
  return "blocked" if seq_len is not None and seq_len > BLOCKED_QUERY_BLOCK else "xla"


def segment_mask(segment_ids: Array | None, batch: int, length: int, causal: bool) -> Array | None:
  """[B, 1, L, L] bool as the model builds it (`qwen.causal_segment_mask`, then [:, None]); None when no mask."""
  if not causal and segment_ids is None:
    return None
  if causal:
    base = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids is None:
      return jnp.broadcast_to(base, (batch, length, length))[:, None]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = same & (segment_ids[:, None, :] != 0)
  if causal:
    mask = base & mask
  return mask[:, None]


# ------------------------------------------------------------------------------------------------ cuDNN


def _cudnn_attention(
  q: Array, k: Array, v: Array, segment_ids: Array | None, causal: bool, dtype, implementation: str = "cudnn"
) -> Array:
  """jax.nn.dot_product_attention wiring; implementation="xla" runs the same call on any backend (tests)."""
  b, length, _, d = q.shape
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  mask = None
  is_causal = causal
  if segment_ids is not None:
    # Full [B, 1, T, S] (jax #28974); causal folded in; no "key segment != 0" term so that no row is empty.
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
      mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    mask = mask[:, None]
    is_causal = False
  out = jax.nn.dot_product_attention(
    q, k, v, mask=mask, scale=1.0 / math.sqrt(d), is_causal=is_causal, implementation=implementation
  )
  return out.astype(dtype)


# ----------------------------------------------------------------------------------------------- splash


def _splash_block(length: int) -> int:
  for block in range(min(SPLASH_BLOCK, length), 0, -_SPLASH_LANES):
    if length % block == 0:
      return block
  raise AssertionError(length)  # unreachable: length % 128 == 0 was checked


def _splash_interpret() -> bool:
  if FORCE_SPLASH_INTERPRET is not None:
    return FORCE_SPLASH_INTERPRET
  return target_platform() != "tpu"


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array | None, causal: bool, interpret: bool) -> Array:
  """Unsharded (or per-shard) splash: q/k/v [B, L, H, D] (q pre-scaled), segment_ids [B, L] or None."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  _, length, heads, _ = q.shape
  shape = (length, length)
  head_mask = sm.CausalMask(shape) if causal else sm.FullMask(shape)
  block = _splash_block(length)
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
    use_fused_bwd_kernel=False,
  )
  kernel = sk.make_splash_mha(
    sm.MultiHeadMask((head_mask,) * heads),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  to_bhld = lambda t: t.transpose(0, 2, 1, 3)
  q, k, v = map(to_bhld, (q, k, v))
  if segment_ids is None:
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))(q, k, v)
  else:
    seg = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(q, k, v, seg)
  return to_bhld(out)


def _axis_spec(mesh, names: tuple[str, ...], dim: int):
  """The mesh axes among `names` for a dim of size `dim`, or None when they are absent or do not divide it."""
  present = tuple(n for n in names if n in mesh.axis_names)
  size = int(np.prod([mesh.shape[n] for n in present])) if present else 1
  if not present or size == 1 or dim % size:
    return None
  return present if len(present) > 1 else present[0]


def _splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, causal: bool, dtype) -> Array:
  b, length, heads, d = q.shape
  if length % _SPLASH_LANES:
    raise ValueError(
      f"splash attention needs the sequence length to be a multiple of {_SPLASH_LANES} (L % 128 == 0); got L="
      f"{length}. Pad the sequence or use impl='xla'."
    )
  scale = 1.0 / math.sqrt(d)
  q = (q.astype(jnp.float32) * scale).astype(dtype)  # the kernel has no scale argument
  k, v = k.astype(dtype), v.astype(dtype)
  interpret = _splash_interpret()
  mesh = _context_mesh()
  if mesh is None or mesh.manual_axes:
    return _splash_local(q, k, v, segment_ids, causal, interpret).astype(dtype)
  batch_spec = _axis_spec(mesh, _BATCH_AXES, b)
  head_spec = _axis_spec(mesh, (_HEAD_AXIS,), heads)
  qkv_spec = P(batch_spec, None, head_spec, None)
  seg_spec = P(batch_spec, None)

  if segment_ids is None:
    fn = jax.shard_map(
      lambda q1, k1, v1: _splash_local(q1, k1, v1, None, causal, interpret),
      in_specs=(qkv_spec,) * 3,
      out_specs=qkv_spec,
      check_vma=False,
    )
    out = fn(q, k, v)
  else:
    fn = jax.shard_map(
      lambda q1, k1, v1, s1: _splash_local(q1, k1, v1, s1, causal, interpret),
      in_specs=(qkv_spec,) * 3 + (seg_spec,),
      out_specs=qkv_spec,
      check_vma=False,
    )
    out = fn(q, k, v, segment_ids.astype(jnp.int32))
  return out.astype(dtype)


# ---------------------------------------------------------------------------------------------- blocked


def _blocking(length: int) -> tuple[int, int]:
  """(block, n_blocks): the fewest blocks of at most BLOCKED_QUERY_BLOCK, as even as possible (1,025 -> 3 x 342)."""
  n = -(-length // BLOCKED_QUERY_BLOCK)
  return -(-length // n), n


def _pad_to(x: Array, length: int) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)


def _block_slice(x: Array, i, block: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _padded_blocks(q, k, v, segment_ids):
  """What forward and backward share: block size and count, the padded length, the scale, q/k/v padded to whole
  blocks, and a function giving query/key block i's segment ids (None without segments)."""
  length, d = q.shape[1], q.shape[3]
  block, n = _blocking(length)
  padded = block * n
  qp, kp, vp = (_pad_to(t, padded) for t in (q, k, v))
  segp = None if segment_ids is None else _pad_to(segment_ids, padded)
  seg_blk = lambda i: None if segp is None else jax.lax.dynamic_slice_in_dim(segp, i * block, block, axis=1)
  return block, n, padded, 1.0 / np.sqrt(d).astype(np.float32), qp, kp, vp, seg_blk


def _tile_scores(q_i, k_j, seg_i, seg_j, i, j, block: int, length: int, causal: bool, scale):
  """Masked float32 scores [B, H, bq, bk] of query block i against key block j, and the mask (None if none).

  The mask is the einsum path's: causal & same segment & key segment != 0, and keys past `length` (padding
  added to fill the last block) are never attended."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
  q_pos = i * block + jnp.arange(block)
  k_pos = j * block + jnp.arange(block)
  mask = jnp.broadcast_to(k_pos[None, :] < length, (block, block))
  if causal:
    mask = mask & (q_pos[:, None] >= k_pos[None, :])
  mask = mask[None, None]
  if seg_i is not None:
    mask = mask & ((seg_i[:, :, None] == seg_j[:, None, :]) & (seg_j[:, None, :] != 0))[:, None]
  return jnp.where(mask, scores, jnp.finfo(jnp.float32).min), mask


def _n_key_blocks(i, n: int, causal: bool):
  return i + 1 if causal else n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, segment_ids, causal: bool, dtype):
  return _blocked_fwd(q, k, v, segment_ids, causal, dtype)[0]


def _blocked_fwd(q, k, v, segment_ids, causal, dtype):
  """Flash-style forward: per query block an online softmax over its key blocks (those at or below the diagonal
  when causal); keeps only the output and the row log-sum-exp for backward."""
  b, length, h, d = q.shape
  block, n, padded, scale, qp, kp, vp, seg_blk = _padded_blocks(q, k, v, segment_ids)
  vp = vp.astype(dtype)

  def query_block(i, carry):
    out, lse = carry
    q_i = _block_slice(qp, i, block)

    def key_block(j, acc):
      top, total, weighted = acc
      scores, _ = _tile_scores(q_i, _block_slice(kp, j, block), seg_blk(i), seg_blk(j), i, j, block, length,
                               causal, scale)
      new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
      rescale = jnp.exp(top - new_top)
      probs = jnp.exp(scores - new_top[..., None])
      total = total * rescale + jnp.sum(probs, axis=-1)
      pv = jnp.einsum("bhqk,bkhd->bhqd", probs.astype(dtype), _block_slice(vp, j, block),
                      preferred_element_type=jnp.float32)
      return new_top, total, weighted * rescale[..., None] + pv

    init = (jnp.full((b, h, block), -jnp.inf, jnp.float32), jnp.zeros((b, h, block), jnp.float32),
            jnp.zeros((b, h, block, d), jnp.float32))
    top, total, weighted = jax.lax.fori_loop(0, _n_key_blocks(i, n, causal), key_block, init)
    out_i = (weighted / total[..., None]).transpose(0, 2, 1, 3).astype(dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, out_i, i * block, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, top + jnp.log(total), i * block, axis=2)
    return out, lse

  init = (jnp.zeros((b, padded, h, d), dtype), jnp.zeros((b, h, padded), jnp.float32))
  out, lse = jax.lax.fori_loop(0, n, query_block, init)
  out = out[:, :length]
  return out, (q, k, v, segment_ids, out, lse)


def _blocked_bwd(causal, dtype, res, d_out):
  """Per (query block, key block) tile: probabilities recomputed from the saved log-sum-exp; dk, dv and dq
  accumulated in float32 carries of [B, L, H, D], so no [L, L] array ever exists."""
  q, k, v, segment_ids, out, lse = res
  b, length, h, d = q.shape
  block, n, padded, scale, qp, kp, vp, seg_blk = _padded_blocks(q, k, v, segment_ids)
  dop = _pad_to(d_out.astype(dtype), padded)
  # delta_i = sum_d dO_i O_i: the softmax backward's row term, [B, H, L]
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, padded - length)))

  def query_block(i, carry):
    dq, dk, dv = carry
    q_i, do_i = _block_slice(qp, i, block), _block_slice(dop, i, block)
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=2)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=2)

    def key_block(j, acc):
      dq_i, dk, dv = acc
      k_j, v_j = _block_slice(kp, j, block), _block_slice(vp, j, block)
      scores, mask = _tile_scores(q_i, k_j, seg_blk(i), seg_blk(j), i, j, block, length, causal, scale)
      probs = jnp.exp(scores - lse_i[..., None])
      dv_j = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(dtype), do_i, preferred_element_type=jnp.float32)
      d_probs = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j.astype(dtype), preferred_element_type=jnp.float32)
      # the fill value is a constant: no gradient reaches a masked score
      d_scores = jnp.where(mask, probs * (d_probs - delta_i[..., None]), 0.0) * scale
      d_scores = d_scores.astype(q.dtype)
      dq_i = dq_i + jnp.einsum("bhqk,bkhd->bqhd", d_scores, k_j, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q_i, preferred_element_type=jnp.float32)
      add = lambda acc_, x: jax.lax.dynamic_update_slice_in_dim(acc_, _block_slice(acc_, j, block) + x, j * block, 1)
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    init = (jnp.zeros((b, block, h, d), jnp.float32), dk, dv)
    dq_i, dk, dv = jax.lax.fori_loop(0, _n_key_blocks(i, n, causal), key_block, init)
    return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, axis=1), dk, dv

  zeros = jnp.zeros((b, padded, h, d), jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, n, query_block, (zeros, zeros, zeros))
  cut = lambda g, like: g[:, :length].astype(like.dtype)
  return cut(dq, q), cut(dk, k), cut(dv, v), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ------------------------------------------------------------------------------------------------- entry


def fused_attention(
  q: Array, k: Array, v: Array, *, segment_ids: Array | None = None, causal: bool, impl: str, dtype
) -> Array:
  """Self-attention q/k/v [B, L, H, D] -> [B, L, H, D] in dtype, scale 1/sqrt(D); see the module docstring.

  segment_ids [B, L] int (0 = padding) or None. impl one of ATTENTION_IMPLS. Outputs agree across impls on
  non-padding query rows; padding rows (segment 0) are finite but implementation-specific.
  """
  _check_impl(impl)
  if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
    raise ValueError(f"fused_attention wants q, k, v of one shape [B, L, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, length, _, d = q.shape
  if segment_ids is not None and segment_ids.shape != (b, length):
    raise ValueError(f"segment_ids must be [B, L] = {(b, length)}; got {segment_ids.shape}")
  if impl == "auto":
    impl = resolve_impl(impl, dtype=dtype, head_dim=d, seq_len=length)
  if impl == "xla":
    return attention(q, k, v, segment_mask(segment_ids, b, length, causal), dtype)
  if impl == "blocked":
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _blocked(q, k, v, seg, causal, jnp.dtype(dtype))
  if impl == "splash":
    return _splash_attention(q, k, v, segment_ids, causal, dtype)
  return _cudnn_attention(q, k, v, segment_ids, causal, dtype)
