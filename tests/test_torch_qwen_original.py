"""`tests/torch_qwen_original.OriginalQwenVL` against the original Qwen-VL implementation's own outputs.

On the tiny official-format checkpoint (../shared/fixtures/qwen_vl_tiny_official): the module's state_dict keys
are exactly the checkpoint's tensor names (so strict loading and peft's by-name LoRA targeting work), and the
float32 forward reproduces the reference image features and last-4 logits of the three prompts, to the same
tolerance as test_official_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bird_jax.data.image import preprocess_image
from bird_jax.model import QwenVLConfig

torch = pytest.importorskip("torch")

from torch_qwen_original import OriginalQwenVL  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official"
CKPT = FIXTURE / "checkpoint"


@pytest.fixture(scope="module")
def official() -> tuple[OriginalQwenVL, dict[str, Any], np.ndarray]:
  assert FIXTURE.is_dir(), f"fixture missing: {FIXTURE} (../shared must sit next to the repo; CI always has it)"
  cfg = QwenVLConfig.from_hf_config(json.loads((CKPT / "config.json").read_text()))
  model = OriginalQwenVL(cfg).eval()
  model.load_checkpoint(CKPT)
  ref = json.loads((FIXTURE / "reference.json").read_text())
  pixels = preprocess_image(Image.open(FIXTURE / "ct_slice.png"), cfg.image_size)
  return model, ref, pixels


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_state_dict_keys_are_checkpoint_names(official):
  model, _, _ = official
  index = json.loads((CKPT / "model.safetensors.index.json").read_text())
  assert set(model.state_dict()) == set(index["weight_map"])
  assert len(model.state_dict()) == len(index["weight_map"])
  # the frozen sin-cos table is a checkpoint tensor (a Parameter, as in the original) but is never trained
  assert not model.transformer.visual.attn_pool.pos_embed.requires_grad
  # peft targets these by module name: they must be plain nn.Linear at exactly these paths
  mods = dict(model.named_modules())
  for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.w1",
               "transformer.h.0.mlp.w2", "transformer.h.0.mlp.c_proj"):
    assert type(mods[name]) is torch.nn.Linear, name
  assert isinstance(mods["transformer.visual.attn_pool.attn"], torch.nn.MultiheadAttention)


def test_load_is_exact_and_strict(official):
  model, _, _ = official
  from bird_jax.model.convert import iter_checkpoint

  sd = model.state_dict()
  for name, arr, _ in iter_checkpoint(CKPT):  # bf16 -> float32 widening is exact
    np.testing.assert_array_equal(sd[name].numpy(), arr.astype(np.float32), err_msg=name)
  fresh = OriginalQwenVL(model.cfg.to_dict())  # the dict-of-fields form of the config
  with pytest.raises(RuntimeError, match="Unexpected key"):
    fresh.load_state_dict({**sd, "transformer.extra.weight": torch.zeros(1)}, strict=True)


def test_image_features_match(official):
  model, ref, pixels = official
  with torch.no_grad():
    feats = model.image_features(torch.from_numpy(pixels)[None]).numpy()
  want = np.load(FIXTURE / "image_features.npy")
  assert feats.shape == (1, *ref["image_features_shape"])
  assert _max_rel_err(feats[0], want) < 1e-5


def test_last4_logits_match(official):
  model, ref, pixels = official
  image_start = model.cfg.image_start_id
  for name, prompt in ref["prompts"].items():
    ids = torch.tensor([prompt["input_ids"]])
    px = torch.from_numpy(pixels)[None, None] if image_start in prompt["input_ids"] else None
    with torch.no_grad():
      logits = model(ids, px)[0].numpy()
    assert logits.dtype == np.float32 and logits.shape == (ids.shape[1], model.cfg.vocab_size)
    want = np.load(FIXTURE / f"logits_last4_{name}.npy")
    err = _max_rel_err(logits[-ref["last_positions"] :], want)
    assert err < 1e-5, f"{name}: max rel err {err:.2e}"
    np.testing.assert_allclose(np.abs(logits).mean(), prompt["logits_mean_abs"], rtol=1e-5)
    # greedy argmax at the last prompt position is the first reference continuation token
    assert int(logits[-1].argmax()) == prompt["greedy_next8"][0], name


def test_batched_rows_and_missing_image_errors(official):
  model, ref, pixels = official
  prompt = ref["prompts"]["grounding"]["input_ids"]
  ids = torch.tensor([prompt, prompt])
  px = torch.from_numpy(np.stack([pixels, pixels]))[:, None]
  with torch.no_grad():
    logits = model(ids, px)[:, -ref["last_positions"] :].numpy()
  want = np.load(FIXTURE / "logits_last4_grounding.npy")
  for row in logits:
    assert _max_rel_err(row, want) < 1e-5
  with pytest.raises(ValueError, match="pixel_values is None"):
    model(ids, None)
