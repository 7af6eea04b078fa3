"""The resampler's "local" initialisation: queries start as poolings of their own grid cell, so position survives."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bird_jax.model import QwenVLConfig
from bird_jax.model.layers import interpolate_pos_table, sincos_2d_table
from bird_jax.model.resampler import Resampler, local_attention_kernel

# 8x8 patches (64 ViT tokens) pooled into a 4x4 query grid: each query's own cell is 2x2 patches.
CFG = QwenVLConfig.tiny(hidden_size=128, resampler_heads=4, n_queries=16, image_size=64, patch_size=8)


def _patch_sensitivity(init: str, seed: int = 0) -> np.ndarray:
  """[queries, patches]: how much each query's output moves when one ViT patch token is replaced."""
  cfg = dataclasses.replace(CFG, resampler_init=init)
  model = Resampler(cfg)
  x = jax.random.normal(jax.random.key(seed), (1, 64, cfg.vision_width))
  params = model.init(jax.random.key(1), x)
  base = model.apply(params, x)[0]
  bumps = jax.random.normal(jax.random.key(seed + 7), (64, cfg.vision_width)) * 3.0
  moved = jax.vmap(lambda p: model.apply(params, x.at[0, p].set(bumps[p]))[0])(jnp.arange(64))
  return np.asarray(jnp.linalg.norm(moved - base[None], axis=-1)).T  # [queries, patches]


def _own_cell(query: int) -> np.ndarray:
  qy, qx = divmod(query, 4)
  py, px = np.divmod(np.arange(64), 8)
  return (py // 2 == qy) & (px // 2 == qx)


def test_local_init_makes_each_query_see_its_own_cell():
  sens = _patch_sensitivity("local")
  for q in range(16):
    own = _own_cell(q)
    # the patches of its cell move query q far more than the patches elsewhere do
    assert sens[q, own].mean() > 5 * sens[q, ~own].mean(), q
  # and the query most sensitive to each patch is the one whose cell holds it
  owners = sens.argmax(0)
  assert all(_own_cell(int(owners[p]))[p] for p in range(64))


def test_qwen_init_pools_without_position():
  sens = _patch_sensitivity("qwen")
  ratios = [sens[q, _own_cell(q)].mean() / sens[q, ~_own_cell(q)].mean() for q in range(16)]
  assert max(ratios) < 2.0  # near-uniform cross-attention: no query prefers its own cell


def _positional_qk(e: int, heads: int, grid: int, kv_grid: int) -> tuple[np.ndarray, np.ndarray]:
  """The local kernel applied to the resampler's sin-cos positions: q [grid², heads, d], k [kv_grid², heads, d]."""
  kernel = local_attention_kernel(e, heads, grid)
  pq = sincos_2d_table(e, grid)
  pk = np.asarray(interpolate_pos_table(jnp.asarray(pq), kv_grid))
  return np.einsum("qe,ehd->qhd", pq, kernel), np.einsum("ke,ehd->khd", pk, kernel)


def test_kernel_logits_peak_at_the_query_position_from_sharp_to_broad_heads():
  e, heads, grid = 128, 4, 4
  q, k = _positional_qk(e, heads, grid, 8)
  probs = jax.nn.softmax(np.einsum("qhd,khd->hqk", q, k) / np.sqrt(e // heads), axis=-1)
  own = np.stack([_own_cell(i) for i in range(16)])  # [q, k]
  mass = np.asarray((probs * own[None]).sum(-1).mean(-1))  # per head: weight on the own cell
  assert mass[0] > 0.9
  assert all(mass[h] > mass[h + 1] for h in range(heads - 1))  # each head broader than the last
  assert mass[-1] > own.mean()  # even the broadest head prefers its cell over uniform pooling


def test_big_grids_keep_one_peak_per_query():
  # Qwen-VL's own sizes: 16x16 queries over a 32x32 patch grid. Only the highest frequencies would alias.
  grid = 16
  q, k = _positional_qk(1024, 8, grid, 32)
  logits = np.einsum("qd,kd->qk", q[:, 0], k[:, 0])  # the sharpest head
  ky, kx = np.divmod(logits.argmax(-1), 32)
  qy, qx = np.divmod(np.arange(grid * grid), grid)
  assert np.array_equal(ky // 2, qy) and np.array_equal(kx // 2, qx)  # every query peaks inside its own cell


def test_unknown_resampler_init_is_a_one_line_error():
  with pytest.raises(ValueError, match="resampler_init='lokal'.*qwen.*local"):
    QwenVLConfig.tiny(resampler_init="lokal")


def test_head_dim_too_small_for_the_local_kernel():
  with pytest.raises(ValueError, match="too small for the local init"):
    local_attention_kernel(8, 4, 4)
