"""The grounding diagnostics measure what they claim on inputs with known answers."""

import numpy as np
import pytest

from bird_jax.benchmarks.grounding_probe import query_spread, ridge_r2


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
