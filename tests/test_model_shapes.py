"""Tiny QwenVL: shapes/dtypes, scan == unrolled, remat == plain, image-feature placement, and it trains."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bird_jax.model import QwenVL, QwenVLConfig, init_params, param_count, trainable_mask
from bird_jax.model.qwen import merge_image_features


def _batch(cfg: QwenVLConfig, seed: int = 0) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Two rows: row 0 has two images, row 1 one image and right padding."""
  rng = np.random.default_rng(seed)
  nq, s = cfg.n_queries, cfg.image_start_id
  span = [s] + [s + 2] * nq + [s + 1]
  row0 = [1, 2] + span + [3, 4] + span + [5, 6, 7]
  row1 = [8] + span + list(rng.integers(0, 400, 6))
  length = len(row0)
  row1 = row1 + [0] * (length - len(row1))
  ids = jnp.asarray([row0, row1], jnp.int32)
  seg = jnp.asarray(np.stack([np.ones(length), np.arange(length) < 1 + len(span) + 6]).astype(np.int32))
  px = jnp.asarray(rng.standard_normal((2, 2, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  return ids, px, seg


@functools.cache
def _init_fn(cfg: QwenVLConfig):
  return jax.jit(lambda k: init_params(cfg, k))


@functools.cache
def _apply_fn(cfg: QwenVLConfig):
  return jax.jit(lambda p, i, x, s: QwenVL(cfg).apply({"params": p}, i, x, segment_ids=s))


def _init(cfg: QwenVLConfig, seed: int) -> dict:
  return _init_fn(cfg)(jax.random.key(seed))


def _apply(cfg: QwenVLConfig, params, ids, px, seg):
  """Compiled once per config (tests share the tiny model's program)."""
  return _apply_fn(cfg)(params, ids, px, seg)


def _unrolled(params: dict) -> dict:
  """Scanned param tree -> unrolled names (h/x -> h_i/x), to compare scan with the Python loop."""
  params = nn.unbox(params)
  out = {"visual": dict(params["visual"]), "llm": dict(params["llm"])}
  for tower, key in (("visual", "resblocks"), ("llm", "h")):
    stacked = out[tower].pop(key)
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      out[tower][f"{key}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out


def test_shapes_dtypes_and_param_tree():
  cfg = QwenVLConfig.tiny()
  params = _init(cfg, 0)
  assert set(params) == {"visual", "llm"}
  assert {"attn_pool", "ln_post", "proj", "conv1", "positional_embedding"} <= set(params["visual"])
  ids, px, seg = _batch(cfg)
  logits = _apply(cfg, params, ids, px, seg)
  assert logits.shape == (2, ids.shape[1], cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # every leaf is annotated with logical axis names of the right rank
  boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxed)
  assert param_count(params) > 0


def test_bf16_compute_keeps_float32_logits_and_params():
  cfg = QwenVLConfig.tiny(dtype="bfloat16", param_dtype="float32")
  params = _init(cfg, 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(params)))
  ids, px, seg = _batch(cfg)
  logits = _apply(cfg, params, ids, px, seg)
  assert logits.dtype == jnp.float32
  ref = _apply(QwenVLConfig.tiny(), params, ids, px, seg)
  err = float(jnp.max(jnp.abs(logits - ref)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref))), err


def test_scan_and_remat_match_unrolled():
  cfg_scan = QwenVLConfig.tiny(scan_layers=True, remat_policy="full", vision_remat_policy="minimal")
  cfg_loop = dataclasses.replace(cfg_scan, scan_layers=False, remat_policy="none", vision_remat_policy="")
  params = _init(cfg_scan, 1)
  assert params["llm"]["h"]["ln_1"]["scale"].names == ("layers", "norm")
  assert params["visual"]["resblocks"]["ln_1"]["scale"].names == ("vit_layers", "norm")
  ids, px, seg = _batch(cfg_scan)

  # one program per variant: outputs (via has_aux) and gradients (remat changes recomputation, not values)
  def loss(p, c):
    logits = QwenVL(c).apply({"params": p}, ids, px, segment_ids=seg)
    return jnp.mean(logits**2), logits

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  ga, a = grad_fn(nn.unbox(params), cfg_scan)
  gb, b = grad_fn(_unrolled(params), cfg_loop)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(_unrolled(ga)), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_image_features_land_after_each_img_token():
  nq, start = 3, 50
  ids = jnp.asarray(
    [
      [1, start, 9, 9, 9, start + 1, 2, start, 9, 9, 9, start + 1],
      [start, 9, 9, 9, start + 1, 3, 4, 5, 6, 7, 8, start],
    ],
    jnp.int32,
  )
  hidden = jnp.zeros((2, 12, 1))
  feats = jnp.arange(1, 2 * 2 * nq + 1, dtype=jnp.float32).reshape(2, 2 * nq, 1)
  out = np.asarray(merge_image_features(hidden, ids, feats, 2, start, nq))[..., 0]
  np.testing.assert_array_equal(out[0], [0, 0, 1, 2, 3, 0, 0, 0, 4, 5, 6, 0])
  # row 1: first image placed; the second <img> at the very end has no room, nothing overwritten
  np.testing.assert_array_equal(out[1], [0, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0])


def test_pixels_change_only_image_and_later_positions():
  cfg = QwenVLConfig.tiny()
  params = _init(cfg, 2)
  ids, px, seg = _batch(cfg)
  a = _apply(cfg, params, ids, px, seg)
  b = _apply(cfg, params, ids, px.at[0, 1].set(0.0), seg)  # 2nd image of row 0
  second_img = int(np.flatnonzero(np.asarray(ids[0]) == cfg.image_start_id)[1])
  diff = np.abs(np.asarray(a - b)).max(-1)
  assert diff[0, : second_img + 1].max() == 0  # causal: nothing before the features changes
  assert diff[0, second_img + 1 :].min() > 0
  assert diff[1].max() == 0  # other row untouched


def test_tiny_model_trains():
  cfg = QwenVLConfig.tiny(scan_layers=True, remat_policy="minimal")
  params = nn.unbox(_init(cfg, 3))
  ids, px, seg = _batch(cfg)
  model = QwenVL(cfg)
  mask = trainable_mask(params)
  assert not mask["visual"]["conv1"]["kernel"] and not mask["visual"]["attn_pool"]["pos_embed"]
  assert mask["visual"]["attn_pool"]["query"] and mask["llm"]["lm_head"]
  tx = optax.masked(optax.adam(3e-3), mask)

  def loss_fn(p):
    logits = model.apply({"params": p}, ids, px, segment_ids=seg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = (seg[:, 1:] > 0).astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.sum(w)

  @jax.jit
  def step(p, opt):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(g, opt, p)
    # masked-out leaves pass their raw gradient through; zero them (frozen params)
    updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, mask)
    return optax.apply_updates(p, updates), opt, loss

  opt = tx.init(params)
  losses = []
  p = params
  for _ in range(8):
    p, opt, loss = step(p, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.5, losses
  np.testing.assert_array_equal(
    np.asarray(p["visual"]["conv1"]["kernel"]), np.asarray(params["visual"]["conv1"]["kernel"])
  )


REFERENCE_NOTE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen_vl.md"


def _checkpoint_table_counts() -> tuple[int, dict[str, int]]:
  """(tensor count, parameters per tower) of the released checkpoint, summed from the shapes in the reference
  note's §3 table (names and shapes of the torch checkpoint): independent of bird_jax's model code."""
  import re

  assert REFERENCE_NOTE.is_file(), f"missing {REFERENCE_NOTE} (../shared must sit next to the repo; CI has it)"
  text = REFERENCE_NOTE.read_text()
  table = text[text.index("## 3. Checkpoint parameter names"):text.index("## 4. Tokenizer")]
  rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
  ranges = {m.group(1): int(m.group(3)) - int(m.group(2)) + 1
            for m in re.finditer(r"(transformer\.h|resblocks)\.\{(\d+)\.\.(\d+)\}", table)}
  assert ranges == {"transformer.h": 32, "resblocks": 48}, ranges
  n_tensors, towers = 0, {"vit_trunk": 0, "resampler": 0, "ln_post_proj": 0, "llm_total": 0}
  for name_cell, shape_cell in rows:
    name = name_cell.strip().strip("`").replace("…resblocks", "transformer.visual.transformer.resblocks")
    shapes = [tuple(int(d) for d in m.split(",") if d.strip()) for m in re.findall(r"\(([\d, ]+)\)", shape_cell)]
    alt = re.search(r"\{(weight,bias)\}", name)
    names = [name.replace(alt.group(0), v) for v in alt.group(1).split(",")] if alt else [name]
    shapes = shapes * len(names) if len(shapes) == 1 else shapes
    assert len(shapes) == len(names), (name, shape_cell)
    repeat = next((n for key, n in ranges.items() if key + "." in name), 1)
    size = repeat * sum(int(np.prod(shape)) for shape in shapes)
    n_tensors += repeat * len(names)
    if "visual." not in name:
      towers["llm_total"] += size
    elif "attn_pool" in name:
      towers["resampler"] += size
    elif "visual.ln_post" in name or name.endswith("visual.proj"):
      towers["ln_post_proj"] += size
    else:
      towers["vit_trunk"] += size
  return n_tensors, towers


def test_qwen_vl_chat_7b_param_counts():
  """Shapes only (eval_shape): per-tower counts of the released model equal the checkpoint's (the reference
  note's tensor table, summed here), so the Flax model holds exactly the released tensors' parameters."""
  from bird_jax.benchmarks.model_memory import breakdown

  n_tensors, want = _checkpoint_table_counts()
  assert n_tensors == 853  # the note's own count check: the table was read completely
  counts = breakdown(QwenVLConfig.qwen_vl_chat_7b())
  got = {k: counts[k] for k in want}
  assert got == want
  assert counts["visual_total"] == want["vit_trunk"] + want["resampler"] + want["ln_post_proj"]
  assert counts["total"] == sum(want.values())


def test_config_constructors_round_trip():
  import json
  from pathlib import Path

  cfg = QwenVLConfig.qwen_vl_chat_7b()
  assert (cfg.mlp_dim, cfg.vision_mlp_dim, cfg.num_resampler_heads, cfg.grid_size) == (11008, 8192, 32, 32)
  assert QwenVLConfig.from_hf_config(cfg.to_hf_config()) == cfg
  # a from-scratch model with non-Qwen sizes (the cpu_demo's) survives export -> --config.init_from
  demo = QwenVLConfig.tiny(vision_pos_grid=8, n_queries=16, image_size=64, patch_size=8)
  back = QwenVLConfig.from_hf_config(demo.to_hf_config())
  assert (back.vision_pos_grid, back.num_resampler_heads) == (8, demo.num_resampler_heads) == (8, 2)
  assert back == dataclasses.replace(demo, resampler_heads=demo.num_resampler_heads)
  assert QwenVLConfig(**dataclasses.asdict(cfg)) == cfg  # what an ml_collections config dict feeds in
  fixture = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official" / "checkpoint"
  assert fixture.is_dir(), f"fixture missing: {fixture} (../shared must sit next to the repo; CI always has it)"
  small = QwenVLConfig.from_hf_config(json.loads((fixture / "config.json").read_text()))
  assert (small.hidden_size, small.num_resampler_heads, small.n_queries, small.vision_mlp_dim) == (128, 1, 256, 315)
  with pytest.raises(ValueError, match="remat_policy"):
    QwenVLConfig.tiny(remat_policy="sometimes")
  with pytest.raises(ValueError, match="lacks key"):
    QwenVLConfig.from_hf_config({"hidden_size": 8})


def test_long_packed_rows_take_the_blocked_attention_path_and_match_the_einsum_one(monkeypatch):
  # rows longer than one attention block: "auto" on CPU resolves to "blocked"; logits and grads must equal the
  # einsum ("xla") path's on every non-padding token
  from bird_jax.model import attention_ops

  monkeypatch.setattr(attention_ops, "BLOCKED_QUERY_BLOCK", 16)
  cfg_auto = QwenVLConfig.tiny()
  cfg_xla = dataclasses.replace(cfg_auto, attention_impl="xla")
  ids, px, seg = _batch(cfg_auto)
  assert attention_ops.resolve_impl("auto", dtype=jnp.float32, head_dim=cfg_auto.head_dim,
                                    seq_len=ids.shape[1]) == "blocked"
  params = _init(cfg_auto, 0)
  valid = np.asarray(seg) != 0

  def loss(p, cfg):
    logits = QwenVL(cfg).apply({"params": p}, ids, px, segment_ids=seg)
    return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :7]), logits

  (l_auto, lg_auto), g_auto = jax.value_and_grad(loss, has_aux=True)(params, cfg_auto)
  (l_xla, lg_xla), g_xla = jax.value_and_grad(loss, has_aux=True)(params, cfg_xla)
  np.testing.assert_allclose(np.asarray(lg_auto)[valid], np.asarray(lg_xla)[valid], atol=2e-5, rtol=0)
  np.testing.assert_allclose(float(l_auto), float(l_xla), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_xla), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
