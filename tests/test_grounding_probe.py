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


def test_box_landing_tells_binding_errors_from_read_out_errors():
  from bird_jax.benchmarks.grounding_probe import box_landing, structure_boxes

  img = "Picture 1: <img>images/a.png</img>\n"
  liver, spleen = "<box>(100,100),(400,400)</box>", "<box>(600,600),(900,900)</box>"
  structures = structure_boxes([
    (img + "Where is the liver?", f"{img}Where is the liver? <ref>liver</ref>{liver}"),
    (img + f"What is at {spleen}?", f"{img}What is at {spleen}? spleen"),
    ("Picture 1: <img>images/b.png</img>\nWhere is the aorta?", "<ref>aorta</ref><box>(0,0),(100,100)</box>"),
  ])
  assert structures["images/a.png"] == [(100.0, 100.0, 400.0, 400.0), (600.0, 600.0, 900.0, 900.0)]
  ask = img + "Where is the liver?"
  preds = [
    {"question": ask, "annotation": f"<ref>liver</ref>{liver}", "response": "<box>(110,110),(400,400)</box>"},
    {"question": ask, "annotation": f"<ref>liver</ref>{liver}", "response": "<box>(600,600),(880,900)</box>"},
    {"question": ask, "annotation": f"<ref>liver</ref>{liver}", "response": "<box>(350,350),(650,650)</box>"},
    {"question": ask, "annotation": f"<ref>liver</ref>{liver}", "response": "the liver"},
    {"question": "Picture 1: <img>images/b.png</img>\nWhere is the aorta?",
     "annotation": "<ref>aorta</ref><box>(0,0),(100,100)</box>", "response": "<box>(0,0),(100,100)</box>"},
  ]
  assert box_landing(preds, structures) == {
    1: {"n": 1, "named": 1, "other": 0, "none": 0, "no_box": 0},
    2: {"n": 4, "named": 1, "other": 1, "none": 1, "no_box": 1},
  }


def test_phantom_structure_boxes_regenerate_every_structure_of_a_generated_set(tmp_path):
  import json
  import re

  from bird_jax.benchmarks.grounding_probe import image_key, phantom_structure_boxes
  from bird_jax.metrics import parse_boxes
  from data_gen.pipeline import generate_dataset
  from data_gen.sources.phantom import PhantomSource

  source = PhantomSource(num_cases=3, image_size=64, seed=4, slices_per_case=2, min_objects=3, max_objects=4)
  generate_dataset(source, tmp_path / "set", seed=1, max_turns=4, write_stats=False)
  manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
  named: dict[str, set] = {}
  for f in (tmp_path / "set").glob("*.json"):
    if f.name == "manifest.json":
      continue
    for rec in json.loads(f.read_text()):
      turns = rec["conversations"]
      named.setdefault(image_key(turns[0][0]), set()).update(
        b for q, a in turns for b in parse_boxes(q + a, fallback=False) if b)
  structures = phantom_structure_boxes(manifest)
  assert set(structures) == set(named)
  for key, boxes in structures.items():
    assert named[key] <= set(boxes), key  # every box a record names is a regenerated structure
    assert 3 <= len(boxes) <= 4
  assert any(len(named[k]) < len(structures[k]) for k in named)  # the records alone miss some
  one = next(iter(structures))
  assert list(phantom_structure_boxes(manifest, {one})) == [one]
  assert re.fullmatch(r"images/.+\.png", one)
  with pytest.raises(ValueError, match="only phantom sets"):
    phantom_structure_boxes({"params": {"source": "sam_med2d"}})
