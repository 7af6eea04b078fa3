"""End-to-end parity with the original Qwen-VL PyTorch implementation on a tiny official-format checkpoint.

The fixture (../shared/fixtures/qwen_vl_tiny_official) holds a bf16 Qwen-VL-Chat-layout checkpoint and the
original code's float32 outputs: the vision tower's features for ct_slice.png, the logits of the last 4
positions of three prompts (two with the image), and 8 greedy tokens each. Covers checkpoint import,
preprocessing, ViT + resampler + proj, image-row insertion, the decoder and KV-cache decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bird_jax.data.image import preprocess_image
from bird_jax.generate import generate
from bird_jax.model import QwenVL, encode_images
from bird_jax.model.convert import load_pretrained

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official"


@pytest.fixture(scope="module")
def official():
  assert FIXTURE.is_dir(), f"fixture missing: {FIXTURE} (../shared must sit next to the repo; CI always has it)"
  cfg, params = load_pretrained(FIXTURE / "checkpoint", dtype="float32")
  ref = json.loads((FIXTURE / "reference.json").read_text())
  pixels = preprocess_image(Image.open(FIXTURE / "ct_slice.png"), cfg.image_size)
  return cfg, params, ref, pixels


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_image_features_match(official):
  cfg, params, ref, pixels = official
  feats = jax.jit(lambda p, x: encode_images(cfg, p, x))(params["visual"], pixels[None])
  want = np.load(FIXTURE / "image_features.npy")
  assert feats.shape == (1, *ref["image_features_shape"])
  assert _max_rel_err(np.asarray(feats[0]), want) < 1e-5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_last4_logits_match(official, scan_layers):
  cfg, params, ref, pixels = official
  if scan_layers:  # the stacked import path must give the same model
    cfg, params = load_pretrained(FIXTURE / "checkpoint", dtype="float32", scan_layers=True)
  fwd = jax.jit(lambda p, i, x: QwenVL(cfg).apply({"params": p}, i, x))
  for name, prompt in ref["prompts"].items():
    ids = prompt["input_ids"]
    has_image = cfg.image_start_id in ids
    logits = np.asarray(
      fwd(params, jnp.asarray([ids], jnp.int32), jnp.asarray(pixels)[None, None] if has_image else None)
    )[0]
    want = np.load(FIXTURE / f"logits_last4_{name}.npy")
    err = _max_rel_err(logits[-ref["last_positions"] :], want)
    assert err < 1e-5, f"{name}: max rel err {err:.2e}"
    np.testing.assert_allclose(np.abs(logits).mean(), prompt["logits_mean_abs"], rtol=1e-5)


def test_greedy_continuations_match(official):
  cfg, params, ref, pixels = official
  prompts = list(ref["prompts"].values())
  ids = [p["input_ids"] for p in prompts]
  # one batch with mixed lengths (left padding) and one image row slot each; the text prompt's image is unused
  px = np.stack([pixels] * len(prompts))[:, None]
  out = generate(QwenVL(cfg), params, ids, px, max_new_tokens=8, stop_ids=[], pad_id=151643)
  assert out == [p["greedy_next8"] for p in prompts]


def test_sharded_load_and_forward_match(official):
  """Import straight onto a (data 2, fsdp 2, tensor 2) mesh with the trainer's logical rules, scanned layers;
  the forward under those rules and greedy decoding give the reference numbers."""
  import flax.linen as nn

  from bird_jax.sharding import DEFAULT_RULES, make_mesh

  n = len(jax.devices())
  assert n >= 8, f"needs 8 (fake) devices, got {n}: tests/conftest.py adds them to XLA_FLAGS"
  _, _, ref, pixels = official
  mesh = make_mesh((2, 2, 2), jax.devices()[:8])
  # the tiny fixture's resampler has 1 head and its ViT MLP is 315 wide: those two stay unsharded here
  unsharded = ("heads", "vit_mlp")
  rules = tuple(r for r in DEFAULT_RULES if r[0] not in unsharded) + tuple((n, None) for n in unsharded)
  cfg, params = load_pretrained(FIXTURE / "checkpoint", dtype="float32", mesh=mesh, rules=rules,
                                scan_layers=True)
  wte = params["llm"]["wte"]["embedding"]
  assert wte.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  prompt = ref["prompts"]["grounding"]
  ids = jnp.asarray([prompt["input_ids"]] * 4, jnp.int32)
  px = jnp.broadcast_to(jnp.asarray(pixels), (4, 1) + pixels.shape)

  @jax.jit
  def fwd(p, i, x):
    return QwenVL(cfg).apply({"params": p}, i, x)[:, -4:]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = np.asarray(fwd(params, ids, px))
  want = np.load(FIXTURE / "logits_last4_grounding.npy")
  for row in logits:
    assert _max_rel_err(row, want) < 1e-5
  out = generate(QwenVL(cfg), params, [p["input_ids"] for p in ref["prompts"].values()],
                 np.stack([pixels] * 3)[:, None], max_new_tokens=8, pad_id=151643, mesh=mesh, rules=rules)
  assert out == [p["greedy_next8"] for p in ref["prompts"].values()]
