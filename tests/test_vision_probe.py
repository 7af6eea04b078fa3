"""The vision naming probe: which records it uses, its baseline, and that its training loop learns."""

import numpy as np
import pytest

from bird_jax.benchmarks.vision_probe import histogram_baseline, lone_structure, train_probe
from bird_jax.model import QwenVLConfig

IMG = "Picture 1: <img>images/a.png</img>\n"


def test_lone_structure_reads_ro_and_vg_records_and_skips_crowded_ones():
  assert lone_structure([(IMG + "What is at <box>(1,2),(30,40)</box>?", "liver")]) == "liver"
  assert lone_structure([(IMG + "Where is the aorta?", "<ref>Aorta</ref><box>(1,2),(30,40)</box>")]) == "aorta"
  two_boxes = [(IMG + "What is at <box>(1,2),(30,40)</box>?", "liver"),
               ("Where is the spleen?", "<ref>spleen</ref><box>(500,500),(600,600)</box>")]
  assert lone_structure(two_boxes) is None
  assert lone_structure([(IMG + "Describe the image.", "An axial CT slice.")]) is None
  caption = "This region contains the liver, a large oval structure in the center of the image."
  assert lone_structure([(IMG + "Describe <box>(1,2),(30,40)</box>.", caption)]) is None  # RC, not a name


def _images(levels: list[float], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  y = rng.integers(0, len(levels), n)
  x = np.full((n, 56, 56, 3), -1.5, np.float32)
  for i, c in enumerate(y):  # a square of the class's level somewhere on a dark background
    r, q = rng.integers(0, 28, 2)
    x[i, r:r + 28, q:q + 28] = levels[c]
  return x + rng.normal(0, 0.05, x.shape).astype(np.float32), y


def test_histogram_baseline_reads_grey_levels_and_not_noise():
  rng = np.random.default_rng(0)
  tx, ty = _images([-0.5, 0.5, 1.5], 120, rng)
  vx, vy = _images([-0.5, 0.5, 1.5], 60, rng)
  assert histogram_baseline(tx, ty, vx, vy) > 0.95
  assert histogram_baseline(tx, rng.integers(0, 3, 120), vx, rng.integers(0, 3, 60)) < 0.6


@pytest.mark.parametrize("method", ["tower", "trunk"])
def test_train_probe_learns_a_separable_task(method):
  rng = np.random.default_rng(1)
  tx, ty = _images([-1.0, 1.5], 96, rng)
  vx, vy = _images([-1.0, 1.5], 48, rng)
  cfg = QwenVLConfig.tiny()
  history = train_probe(cfg, tx, ty, vx, vy, steps=40, method=method, lr=3e-3, batch_size=16, every=20,
                        log=lambda _: None)
  assert [h["step"] for h in history] == [20, 40]
  assert history[-1]["loss"] < np.log(2) - 0.1
  assert history[-1]["held_out_accuracy"] > 0.8
  with pytest.raises(ValueError, match="method 'pixels'"):
    train_probe(cfg, tx, ty, vx, vy, steps=1, method="pixels")


def test_main_refuses_crowded_sets_and_unknown_arguments(tmp_path):
  import json

  from bird_jax.benchmarks.vision_probe import main

  manifest = tmp_path / "data" / "med_grit_phantom" / "manifest.json"
  manifest.parent.mkdir(parents=True)
  manifest.write_text(json.dumps({"params": {"source": "phantom", "source_params": {"max_objects": 4}}}))
  with pytest.raises(SystemExit, match="up to 4 structures per image; the probe needs one"):
    main(["--config=cpu_demo", f"--config.workdir={tmp_path}"])
  with pytest.raises(SystemExit, match="unknown arguments"):
    main(["--config=cpu_demo", f"--config.workdir={tmp_path}", "--epochs=3"])
