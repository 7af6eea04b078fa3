"""The grounding diagnostics measure what they claim on inputs with known answers."""

import numpy as np
import pytest

from bird_jax.benchmarks.grounding_probe import box_errors, query_spread, ridge_r2


def test_query_spread_separates_pooled_from_spatial_features():
  rng = np.random.default_rng(0)
  per_image = rng.normal(size=(20, 1, 8))
  pooled = np.repeat(per_image, 9, axis=1)  # every query says the same thing
  spatial = pooled + rng.normal(size=(20, 9, 8))
  assert query_spread(pooled)["std_across_queries"] == pytest.approx(0.0, abs=1e-12)
  assert query_spread(spatial)["std_across_queries"] > 0.5
  assert query_spread(pooled)["std_across_images"] > 0.5


def test_ridge_r2_finds_linear_targets_and_not_noise():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 4, 5))
  y_linear = x.reshape(300, -1)[:, :4] @ rng.normal(size=(4, 4))
  assert np.all(ridge_r2(x, y_linear, lam=1e-3) > 0.99)
  assert np.all(ridge_r2(x, rng.normal(size=(300, 4))) < 0.2)
  with pytest.raises(ValueError, match="at least 4 samples"):
    ridge_r2(x[:3], y_linear[:3])


def test_box_errors_separates_coarse_from_fine_mistakes():
  ref = "<ref>liver</ref><box>(100,100),(400,400)</box>"  # side 300
  small = "<ref>aorta</ref><box>(500,500),(600,600)</box>"  # side 100
  preds = [
    {"annotation": ref, "response": "<ref>liver</ref><box>(100,100),(400,400)</box>"},  # exact
    {"annotation": ref, "response": "<ref>liver</ref><box>(190,190),(490,490)</box>"},  # hundreds right, off by 90
    {"annotation": small, "response": "<ref>aorta</ref><box>(100,100),(200,200)</box>"},  # wrong place
    {"annotation": small, "response": "no box at all"},
  ]
  r = box_errors(preds)
  assert r["n"] == 4
  assert r["hundreds_digit_right"] == pytest.approx(8 / 12)  # the third answer gets every hundreds digit wrong
  assert r["last_two_digits_error"] == pytest.approx(90 * 4 / 8)
  assert r["by_size"]["250-350"] == {"n": 2, "recall@0.5": 0.5, "mean_edge_error": 45.0}
  assert r["by_size"]["0-150"] == {"n": 2, "recall@0.5": 0.0, "mean_edge_error": (400 + 1000) / 2}
  with pytest.raises(ValueError, match="predictions_VG.jsonl"):
    box_errors([{"annotation": "no box", "response": ""}])
