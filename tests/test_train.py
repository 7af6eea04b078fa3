"""The train step: it learns; 1 device, 8 devices and every mesh layout give the same steps; gradient
accumulation, the chunked loss, scanned layers and remat are exact; frozen towers never move; Orbax resumes
exactly. Steps run with plain SGD where weights are compared, so a wrong gradient scale shows in the weights
(Adam would normalise it away)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bird_jax import sharding as shd
from bird_jax.checkpoint import Checkpointer
from bird_jax.model import QwenVL, QwenVLConfig
from bird_jax.train_step import (
  build_optimizer,
  create_state_shardings,
  make_train_step,
  to_global,
  token_nll,
  trainable_of,
)

CFG = QwenVLConfig.tiny()


def train_config(**overrides) -> ml_collections.ConfigDict:
  from configs import _base

  tc = _base.get_config().train
  tc.update({**dict(lr=3e-3, warmup_ratio=0.0, schedule="constant", train_vit=True), **overrides})
  return tc


def fixed_batch(batch: int = 8, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """Token rows with one `<img>` + n_queries slots + `</img>` each, random text around them; row 1 is padded
  at the end and row 2 packs two segments."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 400, size=(batch, length)).astype(np.int32)
  ids[:, 2] = CFG.image_start_id
  ids[:, 3:3 + CFG.n_queries] = CFG.image_pad_id
  ids[:, 3 + CFG.n_queries] = CFG.image_end_id
  labels = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, 4 + CFG.n_queries:-1] = 1.0
  loss_mask[:, 4 + CFG.n_queries + 3] = 0.0  # an unsupervised token inside the answer
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[1, -4:] = 0  # a padded row
  loss_mask[1, -5:] = 0.0
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  segment_ids[2, 20:] = 2  # two packed segments; the second restarts its positions
  positions[2, 20:] = np.arange(length - 20)
  pixels = rng.normal(size=(batch, 1, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  return dict(input_ids=ids, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
              pixel_values=pixels)


def setup(mesh_shape, devices, tc, model_cfg=CFG, *, sgd: float = 0.0, loss_chunk: int = 0):
  """(mesh, state, jitted step, state shardings). sgd > 0: plain SGD at that rate instead of the AdamW recipe."""
  mesh = shd.make_mesh(mesh_shape, devices)
  make_tx = (lambda p: optax.sgd(sgd)) if sgd else (lambda p: build_optimizer(tc, p, 100))
  tx, init_state, abstract, shardings = create_state_shardings(model_cfg, make_tx, mesh, shd.DEFAULT_RULES, seed=0)
  with jax.set_mesh(mesh):
    state = jax.jit(init_state, out_shardings=shardings)()
  fn = make_train_step(QwenVL(model_cfg), tx, trainable=trainable_of(tc, abstract["params"]),
                       grad_accum=tc.grad_accum, loss_chunk=loss_chunk, param_shardings=shardings["params"])
  step = jax.jit(fn, donate_argnums=(0,), out_shardings=(shardings, None))
  return mesh, state, step, shardings


def run_steps(mesh, state, step, batch, n, *, key="loss"):
  values = []
  with jax.set_mesh(mesh):
    for _ in range(n):
      state, metrics = step(state, to_global(batch, mesh))
      values.append({k: float(v) for k, v in metrics.items()})
  return state, [v[key] for v in values] if key else values


def assert_same_params(a, b, rtol=1e-5, atol=1e-7):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_train_step_lowers_loss_on_a_fixed_batch():
  mesh, state, step, _ = setup((1, 1, 1), jax.devices()[:1], train_config())
  _, losses = run_steps(mesh, state, step, fixed_batch(), 12)
  assert losses[-1] < 0.7 * losses[0], losses


def test_learning_rate_starts_at_the_peak_without_warmup():
  from bird_jax.train_step import learning_rate

  assert float(learning_rate(train_config(), 100)(0)) == pytest.approx(3e-3)
  assert float(learning_rate(train_config(schedule="cosine"), 100)(0)) == pytest.approx(3e-3)
  assert float(learning_rate(train_config(warmup_ratio=0.1), 100)(0)) == 0.0
  assert float(learning_rate(train_config(warmup_ratio=0.1), 100)(10)) == pytest.approx(3e-3)


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 8, 1), (8, 1, 1), (1, 4, 2)])
def test_one_device_and_eight_device_layouts_take_the_same_steps(layout):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  tc = train_config()
  batch = fixed_batch()
  m1, s1, f1, _ = setup((1, 1, 1), jax.devices()[:1], tc, sgd=0.5)
  m8, s8, f8, sh8 = setup(layout, jax.devices(), tc, sgd=0.5)
  specs = {str(s.spec) for s in jax.tree.leaves(sh8["params"])}
  for axis, size in zip(("data", "fsdp", "tensor"), layout, strict=True):
    if axis != "data" and size > 1:  # weights really are split over the mesh
      assert any(axis in s for s in specs), (axis, specs)
  s1, r1 = run_steps(m1, s1, f1, batch, 3, key=None)
  s8, r8 = run_steps(m8, s8, f8, batch, 3, key=None)
  for a, b in zip(r1, r8, strict=True):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=2e-5)
  assert_same_params(s1["params"], s8["params"], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_the_big_batch():
  batch = fixed_batch(batch=8)
  devices = jax.devices()[:1]
  m, s_full, f_full, _ = setup((1, 1, 1), devices, train_config(grad_accum=1), sgd=0.5)
  _, s_acc, f_acc, _ = setup((1, 1, 1), devices, train_config(grad_accum=4), sgd=0.5)
  s_full, r_full = run_steps(m, s_full, f_full, batch, 3, key=None)
  s_acc, r_acc = run_steps(m, s_acc, f_acc, batch, 3, key=None)
  for a, b in zip(r_full, r_acc, strict=True):
    np.testing.assert_allclose([a["loss"], a["grad_norm"], a["tokens"]], [b["loss"], b["grad_norm"], b["tokens"]],
                               rtol=1e-5)
  assert r_full[0]["loss"] - r_full[-1]["loss"] > 1e-3  # the steps really moved the weights
  assert_same_params(s_full["params"], s_acc["params"])


def test_gradient_accumulation_on_eight_devices_with_the_recipe_optimizer():
  """Micro-batches are strided over the sharded batch; with AdamW (no warm-up) the steps still agree."""
  batch = fixed_batch(batch=16)
  m1, s1, f1, _ = setup((1, 1, 1), jax.devices()[:1], train_config(grad_accum=1))
  m8, s8, f8, _ = setup((1, 4, 2), jax.devices(), train_config(grad_accum=2))
  _, r1 = run_steps(m1, s1, f1, batch, 3, key=None)
  _, r8 = run_steps(m8, s8, f8, batch, 3, key=None)
  for a, b in zip(r1, r8, strict=True):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-4)
  assert r1[-1]["loss"] < r1[0]["loss"]


def test_chunked_loss_equals_the_full_logits_loss():
  """Loss and gradients of the chunked LM loss (chunks that divide the row and one that leaves a remainder)
  equal those of the full [B, L, V] logits."""
  model = QwenVL(CFG)
  from bird_jax.model import init_params

  params = jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(init_params(CFG, jax.random.key(1))))
  batch = {k: jnp.asarray(v) for k, v in fixed_batch().items()}
  grad = jax.jit(jax.value_and_grad(lambda p, chunk: token_nll(model, p, batch, chunk)[0]), static_argnums=1)
  want_loss, want_grads = grad(params, 0)
  for chunk in (8, 7, 64):
    loss, grads = grad(params, chunk)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert_same_params(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_frozen_towers_do_not_move_and_get_no_gradient():
  tc = train_config(train_vit=False, train_resampler=True, train_llm=True)
  mesh, state, step, _ = setup((1, 1, 1), jax.devices()[:1], tc)
  before = jax.device_get(state["params"])
  state, _ = run_steps(mesh, state, step, fixed_batch(), 2)
  after = jax.device_get(state["params"])
  vis_b, vis_a = before["visual"], after["visual"]
  for name in ("conv1", "positional_embedding", "ln_pre", "ln_post", "proj"):
    assert_same_params(vis_b[name], vis_a[name], rtol=0, atol=0)
  trunk = [k for k in vis_b if k.startswith("resblocks")]
  assert trunk
  for name in trunk:
    assert_same_params(vis_b[name], vis_a[name], rtol=0, atol=0)
  np.testing.assert_array_equal(vis_b["attn_pool"]["pos_embed"], vis_a["attn_pool"]["pos_embed"])
  pool = {k: v for k, v in vis_b["attn_pool"].items() if k != "pos_embed"}
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), pool, {k: vis_a["attn_pool"][k] for k in pool})
  assert all(jax.tree.leaves(moved)), moved
  assert np.any(before["llm"]["wte"]["embedding"] != after["llm"]["wte"]["embedding"])

  # The frozen trunk is not differentiated at all: the step costs what the same step costs with the ViT's
  # inputs cut off by stop_gradient, not what it costs when the ViT trains.
  def step_flops(train_vit):
    t = train_config(train_vit=train_vit)
    m, s, f, _ = setup((1, 1, 1), jax.devices()[:1], t)
    with jax.set_mesh(m):
      return f.lower(s, to_global(fixed_batch(), m)).compile().cost_analysis()["flops"]

  frozen, trained = step_flops(False), step_flops(True)
  assert frozen < trained, (frozen, trained)


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
  target = shd.abstract_with_shardings(fresh, shardings2)
  restored, data_state, meta = Checkpointer(tmp_path / "ckpt").restore(target, expect_meta={"scan_layers": False})
  assert data_state == {"position": 2} and meta["step"] == 2 and int(restored["step"]) == 2
  _, got = run_steps(mesh2, restored, step2, batches[2], 1)
  assert got == expected
  with pytest.raises(ValueError, match="scan_layers"):
    Checkpointer(tmp_path / "ckpt").restore(target, expect_meta={"scan_layers": True})


def stacked(params: dict, scanned_names: dict[str, str]) -> dict:
  """Unrolled params (`h_0`, `h_1`, …) -> the scanned layout (`h` with a leading layer axis)."""
  out = {}
  for key, value in params.items():
    base = key.rsplit("_", 1)[0]
    if base in scanned_names and key[len(base) + 1:].isdigit():
      continue
    out[key] = stacked(value, scanned_names) if isinstance(value, dict) else value
  for base in scanned_names:
    layers = sorted((k for k in params if k.rsplit("_", 1)[0] == base and k[len(base) + 1:].isdigit()),
                    key=lambda k: int(k.rsplit("_", 1)[1]))
    if layers:
      out[base] = jax.tree.map(lambda *xs: np.stack(xs), *(params[k] for k in layers))
  return out


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_scan_layers_and_remat_train_the_same_as_unrolled(policy):
  """Same weights in both layouts (the unrolled init stacked into the scanned one), three SGD steps: the
  losses, gradient norms and weights agree."""
  tc = train_config()
  batch = fixed_batch()
  m, s_a, f_a, _ = setup((1, 1, 1), jax.devices()[:1], tc, sgd=0.5)
  scanned = dataclasses.replace(CFG, scan_layers=True, remat_policy=policy, vision_remat_policy="full")
  _, s_b, f_b, _ = setup((1, 1, 1), jax.devices()[:1], tc, model_cfg=scanned, sgd=0.5)
  names = {"h": "llm", "resblocks": "visual"}
  s_b = {**s_b, "params": jax.tree.map(jnp.asarray, stacked(jax.device_get(s_a["params"]), names))}
  s_a, r_a = run_steps(m, s_a, f_a, batch, 3, key=None)
  s_b, r_b = run_steps(m, s_b, f_b, batch, 3, key=None)
  for a, b in zip(r_a, r_b, strict=True):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)
  assert r_a[0]["loss"] - r_a[-1]["loss"] > 1e-3
  assert_same_params(stacked(jax.device_get(s_a["params"]), names), s_b["params"], rtol=1e-5, atol=1e-7)


def test_init_from_a_hugging_face_checkpoint_starts_from_its_weights(fixtures_dir):
  from bird_jax.model.convert import load_pretrained
  from bird_jax.train import fresh_state
  from bird_jax.train_step import model_config_from
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
  from bird_jax.data_stages import reads_kept_set

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


def test_a_mesh_axis_that_does_not_divide_a_weight_is_one_line_naming_param_and_axis():
  """tensor=8 over the tiny model's 4 heads: a ConfigError (one line from the CLIs) instead of XLA's
  IndivisibleError deep in the jitted init."""
  from bird_jax.config_util import ConfigError

  mesh = shd.make_mesh((1, 1, 8), jax.devices()[:8])
  with pytest.raises(ConfigError, match=r"has 4 along 'heads', which does not divide over mesh axes tensor \(8 "):
    create_state_shardings(CFG, lambda p: optax.adam(1e-3), mesh, shd.DEFAULT_RULES, seed=0)
