"""Task weights steer which tasks the training conversations ask; the test files keep every task."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_gen.pipeline import generate_dataset
from data_gen.sources.phantom import PhantomSource
from data_gen.tasks import TASKS, classify_turn, parse_task_weights


def test_parse_task_weights():
  assert parse_task_weights("VG=0.5, ro=0.5") == {"VG": 0.5, "RO": 0.5}
  for bad in ("VG", "XX=1", "VG=-1", "VG=0"):
    with pytest.raises(ValueError, match="task weight"):
      parse_task_weights(bad)


def test_roc_weight_is_the_ro_weight():
  """ROC, the paper's name for the task, weighs RO."""
  assert parse_task_weights("VG=0.5,ROC=0.5") == parse_task_weights("VG=0.5,RO=0.5") == {"VG": 0.5, "RO": 0.5}


def turn_tasks(folder) -> Counter:
  records = json.loads((folder / "train.json").read_text())
  return Counter(classify_turn(q, a) for r in records for q, a in r["conversations"])


def test_weights_select_the_training_tasks(tmp_path):
  source = lambda: PhantomSource(num_cases=6, image_size=64, seed=1)
  grounding = generate_dataset(source(), tmp_path / "g", max_turns=4, task_weights={"VG": 1.0, "RO": 1.0})
  default = generate_dataset(source(), tmp_path / "d", max_turns=4)
  only = turn_tasks(tmp_path / "g")
  assert set(only) == {"VG", "RO"} and min(only.values()) > 0
  assert {"GC", "MII"} & set(turn_tasks(tmp_path / "d"))
  assert grounding["params"]["task_weights"] == {"RO": 1.0, "VG": 1.0} and "task_weights" not in default["params"]
  for task in TASKS:  # one-turn test files are unaffected
    assert json.loads((tmp_path / "g" / f"test_{task}.json").read_text())
