"""Writes the Med-GRIT dataset folder (see the contract) and publishes it atomically.

  <out>/images/<id>.png   train.json   test_{VG,RO,GC,MII}.json   manifest.json   stats.md  *.png

Everything is written into a hidden sibling temp folder first and renamed into place at the end, so a
killed run leaves either the old complete folder or nothing at `<out>` (a stale `.<name>.tmp-*` sibling at
worst, which the next run removes). `manifest.json` is written last and marks a folder as complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
TRAIN_FILE = "train.json"
TEST_FILES = {t: f"test_{t}.json" for t in ("VG", "RO", "GC", "MII")}


def write_png(path: Path, image: np.ndarray) -> None:
  """uint8 HxW -> L PNG, HxWx3 -> RGB PNG; the exact array boxes were computed on (no conversion)."""
  # fromarray infers L for uint8 HxW and RGB for uint8 HxWx3 (its `mode=` argument is deprecated).
  Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG", compress_level=4)


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
  """A JSON list with one record per line: valid JSON, and diffs/greps stay readable."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("[\n")
    for i, r in enumerate(records):
      f.write(json.dumps(r, ensure_ascii=False))
      f.write(",\n" if i + 1 < len(records) else "\n")
    f.write("]\n")


def write_json(path: Path, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
    f.write("\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
  p = Path(folder) / MANIFEST
  if not p.is_file():
    return None
  try:
    with open(p, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def make_temp_dir(out: Path) -> Path:
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (not by a live one)
    pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
    if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
      continue
    shutil.rmtree(stale, ignore_errors=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  (tmp / "images").mkdir(parents=True)
  return tmp


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def publish(tmp: Path, out: Path) -> None:
  """Moves the finished temp folder to `out`, replacing an existing `out` (caller checked overwrite)."""
  out = Path(out)
  trash = None
  if out.exists():
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, trash)
  os.replace(tmp, out)
  if trash is not None:
    shutil.rmtree(trash, ignore_errors=True)
