"""The train step: it learns, it is the same on 1 and 8 devices, accumulation is exact, Orbax resumes exactly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bird_jax import sharding as shd
from bird_jax.checkpoint import Checkpointer
from bird_jax.model import QwenVL, QwenVLConfig
from bird_jax.train import build_optimizer, create_state_shardings, make_train_step, to_global

CFG = QwenVLConfig.tiny()


def train_config(**overrides) -> ml_collections.ConfigDict:
  from configs import _base

  tc = _base.get_config().train
  tc.update({**dict(lr=3e-3, warmup_ratio=0.0, schedule="constant", train_vit=True), **overrides})
  return tc


def fixed_batch(batch: int = 8, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """Token rows with one `<img>` + n_queries slots + `</img>` each, random text around them."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 400, size=(batch, length)).astype(np.int32)
  ids[:, 2] = CFG.image_start_id
  ids[:, 3:3 + CFG.n_queries] = CFG.image_pad_id
  ids[:, 3 + CFG.n_queries] = CFG.image_end_id
  labels = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, 4 + CFG.n_queries:-1] = 1.0
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[1, -4:] = 0  # a padded row
  loss_mask[1, -5:] = 0.0
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  pixels = rng.normal(size=(batch, 1, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  return dict(input_ids=ids, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
              pixel_values=pixels)


def setup(mesh_shape, devices, tc, model_cfg=CFG):
  mesh = shd.make_mesh(mesh_shape, devices)
  tx, init_state, _, shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(tc, p, 100), mesh, shd.DEFAULT_RULES, seed=0)
  with jax.set_mesh(mesh):
    state = jax.jit(init_state, out_shardings=shardings)()
  step = jax.jit(make_train_step(QwenVL(model_cfg), tx, tc.grad_accum), donate_argnums=(0,),
                 out_shardings=(shardings, None))
  return mesh, state, step, shardings


def run_steps(mesh, state, step, batch, n):
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(n):
      state, metrics = step(state, to_global(batch, mesh))
      losses.append(float(metrics["loss"]))
  return state, losses


def test_train_step_lowers_loss_on_a_fixed_batch():
  mesh, state, step, _ = setup((1, 1, 1), jax.devices()[:1], train_config())
  _, losses = run_steps(mesh, state, step, fixed_batch(), 12)
  assert losses[-1] < 0.7 * losses[0], losses


def test_one_device_and_eight_devices_agree():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  tc = train_config()
  batch = fixed_batch()
  m1, s1, f1, _ = setup((1, 1, 1), jax.devices()[:1], tc)
  m8, s8, f8, sh8 = setup((2, 2, 2), jax.devices(), tc)
  # Weights really are split over the 8-device mesh.
  specs = {str(s.spec) for s in jax.tree.leaves(sh8["params"])}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  s1, l1 = run_steps(m1, s1, f1, batch, 3)
  s8, l8 = run_steps(m8, s8, f8, batch, 3)
  np.testing.assert_allclose(l1, l8, rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"]), strict=True):
    # Adam normalises tiny gradients, so reduction-order noise shows in the weights at ~lr scale, not 1e-7.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)


def test_gradient_accumulation_matches_the_big_batch():
  batch = fixed_batch(batch=8)
  devices = jax.devices()[:1]
  m, s_full, f_full, _ = setup((1, 1, 1), devices, train_config(grad_accum=1))
  _, s_acc, f_acc, _ = setup((1, 1, 1), devices, train_config(grad_accum=4))
  s_full, l_full = run_steps(m, s_full, f_full, batch, 2)
  s_acc, l_acc = run_steps(m, s_acc, f_acc, batch, 2)
  np.testing.assert_allclose(l_full, l_acc, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_full["params"]), jax.tree.leaves(s_acc["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)


def test_frozen_towers_do_not_move():
  tc = train_config(train_vit=False, train_resampler=True, train_llm=True)
  mesh, state, step, _ = setup((1, 1, 1), jax.devices()[:1], tc)
  before = jax.device_get(state["params"])
  state, _ = run_steps(mesh, state, step, fixed_batch(), 2)
  after = jax.device_get(state["params"])
  np.testing.assert_array_equal(before["visual"]["conv1"]["kernel"], after["visual"]["conv1"]["kernel"])
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["visual"]["attn_pool"], after["visual"]["attn_pool"])
  assert any(jax.tree.leaves(moved))
  assert np.any(before["llm"]["wte"]["embedding"] != after["llm"]["wte"]["embedding"])


def test_orbax_save_restore_continue_gives_identical_losses(tmp_path):
  tc = train_config()
  batches = [fixed_batch(seed=i) for i in range(4)]
  mesh, state, step, shardings = setup((1, -1, 1), jax.devices()[:4], tc)
  with jax.set_mesh(mesh):
    for b in batches[:2]:
      state, _ = step(state, to_global(b, mesh))
  ckpt = Checkpointer(tmp_path / "ckpt", async_save=True)
  ckpt.save(2, state, data_state={"position": 2}, meta={"scan_layers": False})
  ckpt.wait()
  _, expected = run_steps(mesh, state, step, batches[2], 1)
  # A fresh process would rebuild the abstract state and restore straight into the shardings.
  mesh2, fresh, step2, shardings2 = setup((1, -1, 1), jax.devices()[:4], tc)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fresh, shardings2)
  restored, data_state, meta = Checkpointer(tmp_path / "ckpt").restore(target, expect_meta={"scan_layers": False})
  assert data_state == {"position": 2} and meta["step"] == 2 and int(restored["step"]) == 2
  _, got = run_steps(mesh2, restored, step2, batches[2], 1)
  assert got == expected
  with pytest.raises(ValueError, match="scan_layers"):
    Checkpointer(tmp_path / "ckpt").restore(target, expect_meta={"scan_layers": True})


def test_scan_layers_and_remat_train_the_same_as_unrolled():
  tc = train_config()
  batch = fixed_batch()
  m, s_a, f_a, _ = setup((1, 1, 1), jax.devices()[:1], tc)
  scanned = dataclasses.replace(CFG, scan_layers=True, remat_policy="full")
  _, s_b, f_b, _ = setup((1, 1, 1), jax.devices()[:1], tc, model_cfg=scanned)
  _, l_a = run_steps(m, s_a, f_a, batch, 1)
  _, l_b = run_steps(m, s_b, f_b, batch, 1)
  # Different parameter layouts draw different random inits; both must at least be finite and learning-ready.
  assert np.isfinite(l_a[0]) and np.isfinite(l_b[0])
  assert jnp.abs(l_a[0] - l_b[0]) < 1.0


def test_init_from_a_hugging_face_checkpoint_starts_from_its_weights(fixtures_dir):
  from bird_jax.model.convert import load_pretrained
  from bird_jax.train import fresh_state, model_config_from
  from configs import _base

  config = _base.get_config()
  config.init_from = str(fixtures_dir / "qwen_vl_tiny_official" / "checkpoint")
  model_cfg = model_config_from(config, tokenizer=None)
  assert (model_cfg.hidden_size, model_cfg.num_layers, model_cfg.vocab_size) == (128, 2, 151936)
  mesh = shd.make_mesh((1, -1, 1), jax.devices()[:2])
  tx, init_state, _, shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(train_config(), p, 10), mesh, shd.DEFAULT_RULES, seed=0)
  with jax.set_mesh(mesh):
    state = fresh_state(config.init_from, model_cfg, tx, init_state, shardings)
  _, want = load_pretrained(config.init_from)
  assert int(state["step"]) == 0
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(float(jnp.abs(m).max()) == 0.0 for m in jax.tree.leaves(state["opt_state"]) if m.ndim >= 2)


def test_kept_first_stage_steps_are_evenly_spread_and_a_function_of_the_step():
  from bird_jax.train import reads_kept_set

  picks = [s for s in range(1000) if reads_kept_set(s, 0.25)]
  assert len(picks) == 250 and set(np.diff(picks)) == {4}
  assert sum(reads_kept_set(s, 0.1) for s in range(600, 1600)) == 100
  assert not any(reads_kept_set(s, 0.0) for s in range(1000))


def test_format_scores_names_each_reference_it_has():
  from bird_jax.train import format_scores

  summary = {"VG": {"model": {"recall@0.5": 0.31}, "baseline": {"recall@0.5": 0.004},
                    "class_prior": {"recall@0.5": 0.11}},
             "RO": {"model": {"accuracy": 0.5}, "baseline": None, "class_prior": {"accuracy": 0.25}}}
  assert format_scores(summary) == ("VG recall@0.5 0.310 (baseline 0.004, class prior 0.110), "
                                    "RO accuracy 0.500 (class prior 0.250)")
  assert format_scores({"VG": {"model": {"recall@0.5": 0.31}}}) == "VG recall@0.5 0.310"
