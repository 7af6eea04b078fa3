"""fused_attention: every implementation against the model's einsum path (splash in Pallas interpret mode on CPU,
the cuDNN wiring through jax.nn.dot_product_attention's XLA implementation), plus a TPU ahead-of-time compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bird_jax.model import attention_ops
from bird_jax.model.attention_ops import ATTENTION_IMPLS, fused_attention, resolve_impl
from bird_jax.model.layers import attention
from bird_jax.model.qwen import causal_segment_mask
from bird_jax.sharding import make_mesh

B, L, H = 2, 256, 2
QKV_SPEC = P(("data", "fsdp"), None, "tensor", None)
SEG_SPEC = P(("data", "fsdp"), None)


def _qkv(d: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (B, L, H, d), jnp.float32) for k in ks)


def _segments() -> jax.Array:
  """Row 0: segments 1 (100 tokens), 2 (100), padding (56). Row 1: one segment of 180, padding after."""
  seg = np.zeros((B, L), np.int32)
  seg[0, :100], seg[0, 100:200] = 1, 2
  seg[1, :180] = 3
  return jnp.asarray(seg)


def _valid(seg) -> np.ndarray:
  return np.asarray(seg) != 0


def _packed_splash(dtype):
  return lambda q, k, v, s: fused_attention(q, k, v, segment_ids=s, causal=True, impl="splash", dtype=dtype)


def _close_on(valid: np.ndarray, a, b, atol: float):
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=atol, rtol=0)


def test_xla_impl_is_the_model_path_bit_for_bit():
  q, k, v = _qkv(32)
  seg = _segments()
  cases = [
    (seg, True, causal_segment_mask(seg, B, L)[:, None]),
    (None, True, causal_segment_mask(None, B, L)[:, None]),
    (None, False, None),
  ]
  for seg_ids, causal, mask in cases:
    want = attention(q, k, v, mask, jnp.float32)
    got = fused_attention(q, k, v, segment_ids=seg_ids, causal=causal, impl="xla", dtype=jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # bf16 as the model runs it
  qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
  want = attention(qb, kb, vb, causal_segment_mask(seg, B, L)[:, None], jnp.bfloat16)
  got = fused_attention(qb, kb, vb, segment_ids=seg, causal=True, impl="xla", dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _loss(impl: str, seg, valid, w, causal: bool = True):
  def loss(q, k, v):
    out = fused_attention(q, k, v, segment_ids=seg, causal=causal, impl=impl, dtype=jnp.float32)
    return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0))

  return loss


def test_splash_packed_causal_matches_xla_forward_and_grads():
  q, k, v = _qkv(32)
  seg = _segments()
  valid = _valid(seg)
  ref = fused_attention(q, k, v, segment_ids=seg, causal=True, impl="xla", dtype=jnp.float32)
  out = fused_attention(q, k, v, segment_ids=seg, causal=True, impl="splash", dtype=jnp.float32)
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert not np.isnan(np.asarray(out)).any()  # padding rows attend to padding: finite too
  _close_on(valid, out, ref, 1e-5)

  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  g_ref = jax.grad(_loss("xla", seg, valid, w), argnums=(0, 1, 2))(q, k, v)
  g_spl = jax.grad(_loss("splash", seg, valid, w), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip(("dq", "dk", "dv"), g_spl, g_ref, strict=True):
    assert not np.isnan(np.asarray(a)).any(), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0, err_msg=name)


def test_splash_full_attention_without_mask_matches_xla():
  q, k, v = _qkv(64, seed=1)
  ref = fused_attention(q, k, v, causal=False, impl="xla", dtype=jnp.float32)
  out = fused_attention(q, k, v, causal=False, impl="splash", dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_splash_under_mesh_shard_map_matches_unsharded():
  q, k, v = _qkv(32, seed=2)
  seg = _segments()
  want = fused_attention(q, k, v, segment_ids=seg, causal=True, impl="splash", dtype=jnp.float32)
  mesh = make_mesh((1, 2, 2), jax.devices()[:4])
  fn = jax.jit(_packed_splash(jnp.float32))
  with jax.set_mesh(mesh):
    qkv = [jax.device_put(t, NamedSharding(mesh, QKV_SPEC)) for t in (q, k, v)]
    s = jax.device_put(seg, NamedSharding(mesh, SEG_SPEC))
    assert "sdy.manual_computation" in fn.lower(*qkv, s).as_text()  # the kernel runs per shard
    got = fn(*qkv, s)
  assert got.sharding.spec == QKV_SPEC
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
  "use_seg,causal",
  [(True, True), (False, True), (False, False), (True, False)],
  ids=["packed", "causal", "full", "segments_only"],
)
def test_cudnn_wiring_matches_xla_on_valid_rows(use_seg, causal):
  q, k, v = _qkv(32, seed=3)
  seg = _segments() if use_seg else None
  valid = _valid(seg) if use_seg else np.ones((B, L), bool)
  ref = fused_attention(q, k, v, segment_ids=seg, causal=causal, impl="xla", dtype=jnp.float32)
  out = attention_ops._cudnn_attention(q, k, v, seg, causal, jnp.float32, implementation="xla")
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert not np.isnan(np.asarray(out)).any()
  _close_on(valid, out, ref, 1e-5)
  if use_seg and causal:
    w = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)

    def loss(q, k, v):
      out = attention_ops._cudnn_attention(q, k, v, seg, True, jnp.float32, implementation="xla")
      return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0))

    g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss("xla", seg, valid, w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_resolve_impl_and_errors():
  assert ATTENTION_IMPLS == ("auto", "xla", "blocked", "splash", "cudnn")
  assert resolve_impl("auto") == "xla"  # CPU
  assert resolve_impl("auto", dtype=jnp.bfloat16, head_dim=128, seq_len=512) == "xla"
  # beyond one query block the CPU path is the blocked one (linear memory)
  longer = attention_ops.BLOCKED_QUERY_BLOCK + 1
  assert resolve_impl("auto", dtype=jnp.float32, head_dim=64, seq_len=longer) == "blocked"
  for impl in ("xla", "blocked", "splash", "cudnn"):
    assert resolve_impl(impl) == impl
  with pytest.raises(ValueError, match="auto.*xla.*blocked.*splash.*cudnn"):
    resolve_impl("flash")
  q, k, v = _qkv(32)
  with pytest.raises(ValueError, match="auto.*xla.*blocked.*splash.*cudnn"):
    fused_attention(q, k, v, causal=True, impl="flash", dtype=jnp.float32)
  short = q[:, :200]
  with pytest.raises(ValueError, match="L % 128 == 0"):
    fused_attention(short, short, short, causal=True, impl="splash", dtype=jnp.float32)
  # auto on CPU is the xla path exactly
  seg = _segments()
  np.testing.assert_array_equal(
    np.asarray(fused_attention(q, k, v, segment_ids=seg, causal=True, impl="auto", dtype=jnp.float32)),
    np.asarray(fused_attention(q, k, v, segment_ids=seg, causal=True, impl="xla", dtype=jnp.float32)),
  )


def test_splash_compiles_ahead_of_time_for_tpu(monkeypatch):
  pytest.importorskip("libtpu")
  from jax.experimental import topologies

  # compile-only: do not fail on /tmp/libtpu_lockfile when another process (a parallel test run) holds libtpu
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

  topo = topologies.get_topology_desc("v5e:2x2", platform="tpu")
  mesh = Mesh(np.asarray(topo.devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
  x = jax.ShapeDtypeStruct((4, 512, 4, 128), jnp.bfloat16, sharding=NamedSharding(mesh, QKV_SPEC))
  s = jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=NamedSharding(mesh, SEG_SPEC))
  fn = jax.jit(_packed_splash(jnp.bfloat16))
  with jax.set_mesh(mesh):
    assert resolve_impl("auto") == "splash"
    compiled = fn.lower(x, x, x, s).compile()
  # a Mosaic kernel, not the interpret-mode loop
  assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("use_seg, causal", [(True, True), (False, True), (False, False), (True, False)])
def test_blocked_matches_xla_forward_and_grads(monkeypatch, use_seg, causal):
  # blocks of 64 over L = 200: four query blocks, the last one short; causal blocks see only their key prefix
  monkeypatch.setattr(attention_ops, "BLOCKED_QUERY_BLOCK", 64)
  length = 200
  q, k, v = (t[:, :length] for t in _qkv(32, seed=3))
  seg = _segments()[:, :length] if use_seg else None
  valid = _valid(seg) if use_seg else np.ones((B, length), bool)
  w = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)
  ref = fused_attention(q, k, v, segment_ids=seg, causal=causal, impl="xla", dtype=jnp.float32)
  out = fused_attention(q, k, v, segment_ids=seg, causal=causal, impl="blocked", dtype=jnp.float32)
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()  # padding rows too
  _close_on(valid, out, ref, 2e-6)
  g_ref = jax.grad(_loss("xla", seg, valid, w, causal), argnums=(0, 1, 2))(q, k, v)
  g_blk = jax.grad(_loss("blocked", seg, valid, w, causal), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip(("dq", "dk", "dv"), g_blk, g_ref, strict=True):
    assert np.isfinite(np.asarray(a)).all(), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=name)
  # bf16 as the model runs it: same result as the einsum path up to bf16 rounding
  qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
  ref_b = fused_attention(qb, kb, vb, segment_ids=seg, causal=causal, impl="xla", dtype=jnp.bfloat16)
  out_b = fused_attention(qb, kb, vb, segment_ids=seg, causal=causal, impl="blocked", dtype=jnp.bfloat16)
  assert out_b.dtype == jnp.bfloat16
  _close_on(valid, np.asarray(out_b, np.float32), np.asarray(ref_b, np.float32), 3e-2)


def _grad_temp_bytes(impl: str, length: int) -> int:
  x = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
  s = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(q, k, v, seg):
    return jnp.sum(fused_attention(q, k, v, segment_ids=seg, causal=True, impl=impl, dtype=jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, s).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blocked_backward_memory_grows_linearly_where_xla_grows_quadratically():
  # the einsum path keeps [B, H, L, L] float32 scores for backward; the blocked one keeps O(L) residuals and
  # one query block's [B, H, block, L] at a time
  blocked = [_grad_temp_bytes("blocked", n) for n in (1024, 2048)]
  xla = [_grad_temp_bytes("xla", n) for n in (1024, 2048)]
  assert blocked[1] / blocked[0] < 2.5, blocked
  assert xla[1] / xla[0] > 3.0, xla
  assert blocked[1] * 3 < xla[1], (blocked, xla)
