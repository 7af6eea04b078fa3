"""Batched KV-cache decoding for QwenVL (greedy or temperature / top-k / top-p sampling), fully jitted.

  new_tokens = generate(QwenVL(cfg), params, [ids_a, ids_b], pixel_values,     # [B, N, S, S, 3] or None
                        max_new_tokens=50, stop_ids=[151643, 151645], pad_id=151643)

* Prompts of different lengths are left-padded to a length bucket (`length_buckets`); the batch is padded to
  a power of two and max_new_tokens rounded up to a bucket, so a stream of requests compiles a handful of
  programs, not one per request. Positions are computed from the padding mask (a row's first real token is
  position 0) and padding slots are masked out of attention, so a row's output does not depend on the rows
  batched with it.
* Prefill runs the whole (image-bearing) prompt once and fills a KV cache of prompt_bucket + new-token
  bucket slots; then one token per step in a `lax.while_loop` that exits as soon as every row has stopped.
* Returns, per row, the new tokens only, up to and EXCLUDING the first stop id (include_stop=True keeps it).
* Qwen's inference-only extras are on (logn query scaling, dynamic NTK from the longest prompt); both are
  exact no-ops up to cfg.seq_length (2048) tokens. Beyond it, Qwen indexes positions by slot including left
  padding, we by real tokens: batched long prompts can differ slightly from the original there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.qwen import ntk_alpha, pad_cache
from bird_jax.model.qwen_vl import QwenVL

DEFAULT_LENGTH_BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
DEFAULT_NEW_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return n


def _filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """HF order: temperature, top-k, top-p. Returns logits with filtered entries at -inf."""
  logits = logits / temperature
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold is kept)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = cum_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _pick(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, _filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(
    jnp.int32
  )


@functools.partial(jax.jit, static_argnames=("cfg", "new_bucket", "temperature", "top_k", "top_p"))
def _generate_jit(
  params: Any,
  ids: jax.Array,
  mask: jax.Array,
  pixel_values: jax.Array | None,
  stop_ids: jax.Array,
  max_new: jax.Array,
  pad_id: jax.Array,
  rng: jax.Array,
  *,
  cfg: QwenVLConfig,
  new_bucket: int,
  temperature: float,
  top_k: int,
  top_p: float,
) -> jax.Array:
  model = QwenVL(cfg)
  batch, prompt_len = ids.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
  lengths = mask.sum(axis=1)
  alpha = jnp.broadcast_to(ntk_alpha(jnp.max(lengths), cfg.seq_length), (batch,))
  hidden, kv = model.apply(
    {"params": params},
    ids,
    pixel_values,
    positions=positions,
    segment_ids=mask.astype(jnp.int32),
    return_kv=True,
    return_hidden=True,
    inference=True,
    rope_alpha=alpha,
  )
  head = nn.unbox(params["llm"]["lm_head"]).astype(cfg.compute_dtype)
  logits = jnp.einsum("be,ev->bv", hidden[:, -1], head, preferred_element_type=jnp.float32)

  # per-layer (or layer-stacked) k/v with new_bucket empty slots; each step writes its slot in place
  cache = pad_cache(kv, new_bucket, cfg.compute_dtype)
  kv_mask = jnp.concatenate([mask, jnp.zeros((batch, new_bucket), bool)], axis=1)
  rng, sub = jax.random.split(rng)
  token = _pick(logits, sub, temperature, top_k, top_p)
  out = jnp.full((batch, new_bucket), pad_id, jnp.int32)
  done = ~mask.any(axis=1)  # all-padding rows (batch bucket filler) are done from the start
  next_pos = lengths.astype(jnp.int32)

  def cond(state):
    i, _, _, _, done, _, _, _ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, cache, kv_mask, out, done, token, pos, rng = state
    out = out.at[:, i].set(jnp.where(done, pad_id, token))
    done = done | jnp.isin(token, stop_ids)
    slot = prompt_len + i
    kv_mask = kv_mask.at[:, slot].set(True)
    logits, cache = model.apply(
      {"params": params},
      token[:, None],
      None,
      positions=pos[:, None],
      cache=cache,
      cache_index=slot,
      kv_mask=kv_mask,
      inference=True,
      rope_alpha=alpha,
    )
    rng, sub = jax.random.split(rng)
    token = _pick(logits[:, -1], sub, temperature, top_k, top_p)
    return i + 1, cache, kv_mask, out, done, token, pos + 1, rng

  state = (jnp.int32(0), cache, kv_mask, out, done, token, next_pos, rng)
  return jax.lax.while_loop(cond, body, state)[3]


def generate(
  model: QwenVL,
  params: Any,
  input_ids: Sequence[Sequence[int]] | np.ndarray,
  pixel_values: np.ndarray | None = None,
  *,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (),
  pad_id: int = 0,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] | None = None,
  attention_mask: np.ndarray | None = None,
  include_stop: bool = False,
  length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
  new_token_buckets: Sequence[int] = DEFAULT_NEW_TOKEN_BUCKETS,
) -> list[list[int]]:
  """Decode up to max_new_tokens per row. input_ids: list of id lists (any lengths) or an int array [B, L]
  (rows taken whole unless attention_mask [B, L] marks padding). pixel_values [B, N, S, S, 3] (image k of row
  b goes after its k-th <img>). temperature 0 = greedy. mesh (+ logical rules): run under that mesh so the
  model's logical constraints apply; params should already be placed (e.g. by load_pretrained(mesh=...))."""
  cfg = model.config
  if isinstance(input_ids, np.ndarray) or (len(input_ids) and isinstance(input_ids[0], np.ndarray)):
    arr = np.asarray(input_ids)
    if arr.ndim != 2:
      raise ValueError(f"input_ids array must be [B, L], got shape {arr.shape}")
    m = np.ones(arr.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    rows = [
      [int(t) for t, keep in zip(r, mm, strict=True) if keep] for r, mm in zip(arr.tolist(), m, strict=True)
    ]
  else:
    rows = [[int(t) for t in r] for r in input_ids]
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError("generate: every prompt needs at least one token")
  if max_new_tokens <= 0:
    return [[] for _ in rows]
  b = len(rows)
  b_pad = 1 << (b - 1).bit_length()
  length = _bucket(max(len(r) for r in rows), length_buckets)
  ids = np.full((b_pad, length), pad_id, np.int32)
  mask = np.zeros((b_pad, length), bool)
  for i, r in enumerate(rows):
    ids[i, length - len(r) :] = r
    mask[i, length - len(r) :] = True
  px = None
  if pixel_values is not None:
    pixel_values = np.asarray(pixel_values, np.float32)
    if pixel_values.ndim != 5 or pixel_values.shape[0] != b:
      raise ValueError(f"pixel_values must be [B={b}, N, S, S, 3], got {pixel_values.shape}")
    px = np.zeros((b_pad,) + pixel_values.shape[1:], np.float32)
    px[:b] = pixel_values
  new_bucket = _bucket(max_new_tokens, new_token_buckets)
  rng = jax.random.key(0) if rng is None else rng
  stops = np.asarray(list(stop_ids) or [-1], np.int32)
  call = functools.partial(
    _generate_jit,
    params,
    jnp.asarray(ids),
    jnp.asarray(mask),
    None if px is None else jnp.asarray(px),
    jnp.asarray(stops),
    jnp.int32(max_new_tokens),
    jnp.int32(pad_id),
    rng,
    cfg=cfg,
    new_bucket=new_bucket,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )
  if mesh is not None:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules or ()):
      out = call()
  else:
    out = call()
  out = np.asarray(out)[:b, :max_new_tokens]
  stop_set = set(int(s) for s in stop_ids)
  results = []
  for row in out.tolist():
    kept = []
    for t in row:
      if t in stop_set:
        if include_stop:
          kept.append(t)
        break
      kept.append(t)
    results.append(kept)
  return results
