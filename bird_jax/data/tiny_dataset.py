"""A tiny, valid Med-GRIT dataset folder (the data_gen layout) written in milliseconds, for tests and demos
that need real files but not realistic content. Deterministic in `seed`.

    write_tiny_med_grit(root)  ->  root/images/<id>.png, train.json, test_{VG,RO,GC,MII}.json, manifest.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TASKS = ("VG", "RO", "GC", "MII")
_PREFIX = ("ct_00", "mr_00", "x_ray")
_NAMES = ("liver", "left kidney", "spleen", "right lung", "aorta", "stomach")


def _box(rng: np.random.Generator) -> str:
  x1, y1 = (int(v) for v in rng.integers(0, 500, 2))
  x2, y2 = x1 + int(rng.integers(50, 499)), y1 + int(rng.integers(50, 499))
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _qa(task: str, rng: np.random.Generator, modality: str) -> tuple[str, str]:
  name = _NAMES[int(rng.integers(len(_NAMES)))]
  box = _box(rng)
  if task == "VG":
    return f"Where is the {name} in the image?", f"<ref>{name}</ref>{box}"
  if task == "RO":
    return f"What is the object at {box}?", name
  if task == "GC":
    return (f"Describe the region {box}.",
            f"This region contains the {name}, a structure seen in the {modality}.")
  words = " ".join(_NAMES[int(i)] for i in rng.integers(len(_NAMES), size=int(rng.integers(3, 12))))
  return ("What can you interpret from the overall image?",
          f"The {modality} image shows several structures: {words}.")


def _record(image_id: str, case_id: str, tasks: list[str], rng: np.random.Generator) -> dict[str, Any]:
  modality = image_id.split("_", 1)[0]
  turns = []
  for k, task in enumerate(tasks):
    q, a = _qa(task, rng, modality)
    if k == 0:
      q = f"Picture 1: <img>images/{image_id}.png</img>\n{q}"
    turns.append([q, a])
  return {"id": image_id, "conversations": turns, "task": tasks[0] if len(tasks) == 1 else "mixed",
          "case_id": case_id}


def write_tiny_med_grit(root: str | Path, *, n_train: int = 8, n_test_per_task: int = 2,
                        image_size: tuple[int, int] = (40, 48), max_turns: int = 3, seed: int = 0
                        ) -> dict[str, Any]:
  """Writes the folder; returns {"train": [records], "test": {task: [records]}}. Every other image is
  grayscale ("L" PNG), the rest RGB, so readers see both."""
  root = Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  h, w = image_size
  out: dict[str, Any] = {"train": [], "test": {t: [] for t in TASKS}}

  def new_image(k: int, split: str) -> tuple[str, str]:
    prefix = _PREFIX[k % len(_PREFIX)]
    case = f"Tiny--{split}{k:03d}"
    image_id = f"{prefix}--{case}--z_0000"
    if k % 2:
      arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
    else:
      arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / "images" / f"{image_id}.png")
    return image_id, f"{prefix}--{case}"

  for k in range(n_train):
    image_id, case_id = new_image(k, "tr")
    n_turns = 1 + k % max_turns
    tasks = [TASKS[int(i)] for i in rng.integers(len(TASKS), size=n_turns)]
    out["train"].append(_record(image_id, case_id, tasks, rng))
  k = n_train
  for task in TASKS:
    for _ in range(n_test_per_task):
      image_id, case_id = new_image(k, "te")
      out["test"][task].append(_record(image_id, case_id, [task], rng))
      k += 1
  (root / "train.json").write_text(json.dumps(out["train"], indent=1))
  for task in TASKS:
    (root / f"test_{task}.json").write_text(json.dumps(out["test"][task], indent=1))
  (root / "manifest.json").write_text(json.dumps({"source": "tiny", "version": "1.0", "seed": seed,
                                                  "counts": {"train": n_train, "test": n_test_per_task}}))
  return out
