"""Reading and validating Med-GRIT records (no TFDS here, so it is cheap to test and reuse).

Two folder layouts:

* "generated" (what data_gen writes): `train.json`, `test_{VG,RO,GC,MII}.json`, `images/<id>.png`; the image
  is the `<img>P</img>` path of the first user turn, relative to the folder.
* "official" (the Med-GRIT-270k release): `*_train*.json` and `*_test_chatlm_{VG,RO,GC,MII}_*OneConv.json`
  anywhere under the folder; `<img>` holds the authors' absolute path, so the image is found by basename
  `<id>.png` in the folder, its `images/` or `SAMed2D_v1/images/` (the name BiRD's loader uses).

A bad record (not an object, turns that are not [user, assistant] string pairs, a `<box>` that is not four
integers in [0, 1000), an unsafe or missing image) raises `BadRecord(reason)`; the builder counts it, logs one line
naming the file, the record's index and id, and goes on. A file that is not JSON (or a JSON-lines line that is not)
raises `UnreadableFile` naming the file and where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("VG", "RO", "GC", "MII")
RECORD_TASKS = (*TASKS, "mixed")
OFFICIAL_TEST_RE = re.compile(r"_test_chatlm_(VG|RO|GC|MII)_.*OneConv\.jsonl?$")
IMG_SPAN_RE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
# Qwen-VL's user-turn image prefix, `Picture 1: <img>P</img>\n` with a space, as BiRD's own evaluation script,
# data_gen, the pipeline and the API write it (docs/evaluation.md); records that write `Picture 1:<img>` are
# read as if they had the space, so both spellings give the same tokens.
IMAGE_PREFIX_RE = re.compile(r"^Picture (\d+):[ \t]*<img>")
BOX_SPAN_RE = re.compile(r"<box>(.*?)</box>", re.DOTALL)
BOX_RE = re.compile(r"^\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class BadRecord(ValueError):
  """A record that cannot be used; the message is the one-line reason, `kind` the counter key
  (malformed, bad_box, unsafe_path, missing_image, unreadable_image)."""

  def __init__(self, message: str, kind: str = "malformed") -> None:
    super().__init__(message)
    self.kind = kind


class UnreadableFile(ValueError):
  """A records file that cannot be read at all (not UTF-8, not JSON, not a list); the message is one line naming
  the file, where it breaks and the fix."""


def modality_from_id(image_id: str) -> str:
  """Med-GRIT rule (BiRD's eval): text before the first "_" (`x_ray--...` -> x, `ct_00--...` -> ct)."""
  return image_id.split("_", 1)[0]


def case_id_from_id(image_id: str) -> str:
  """SA-Med2D ids are `<modality>--<dataset>--<case>--<slice>`: the case is dataset--case."""
  parts = image_id.split("--")
  return "--".join(parts[1:3]) if len(parts) >= 3 else image_id


def read_records(path: Path) -> list[Any]:
  """A JSON list, or JSON lines (`.jsonl`). UnreadableFile (one line: the file, the line/record, the fix) if not."""
  fix = "fix or remove the file"
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UnreadableFile(f"{path}: cannot read records (not UTF-8 text: byte {e.start}); {fix}") from None
  if path.suffix == ".jsonl":
    records = []
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise UnreadableFile(f"{path}: cannot read records (line {n}, record {len(records)}: {e.msg} at column "
                             f"{e.colno}); {fix}") from None
    return records
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UnreadableFile(f"{path}: cannot read records ({e}); {fix}") from None
  if not isinstance(data, list):
    raise UnreadableFile(f"{path}: cannot read records (expected a JSON list of records, got a "
                         f"{type(data).__name__}); {fix}")
  return data


def find_generated_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
  """(train files, [(test file, task)]) of a data_gen folder."""
  train = [p for p in (root / "train.json", root / "train.jsonl") if p.is_file()]
  tests = [(root / f"test_{t}{ext}", t) for t in TASKS for ext in (".json", ".jsonl")
           if (root / f"test_{t}{ext}").is_file()]
  return train, tests


def find_official_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
  """(train files, [(test file, task)]) of the release, searched recursively, sorted for determinism."""
  files = sorted(p for p in root.rglob("*.json*") if p.is_file() and p.suffix in (".json", ".jsonl"))
  train = [p for p in files if "_train" in p.name and "_test_" not in p.name]
  tests = []
  for p in files:
    m = OFFICIAL_TEST_RE.search(p.name)
    if m:
      tests.append((p, m.group(1)))
  return train, tests


def _turn_pairs(conversations: Any) -> list[list[str]]:
  if not isinstance(conversations, list) or not conversations:
    raise BadRecord("'conversations' must be a non-empty list of [user, assistant] pairs")
  pairs = []
  for k, turn in enumerate(conversations):
    if not (isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2
            and all(isinstance(x, str) for x in turn)):
      raise BadRecord(f"conversations[{k}] is not a [user, assistant] pair of strings")
    if not turn[0].strip() or not turn[1].strip():
      raise BadRecord(f"conversations[{k}] has an empty user or assistant string")
    pairs.append([turn[0], turn[1]])
  return pairs


def check_boxes(pairs: list[list[str]]) -> None:
  """Every `<box>` must be `(x1,y1),(x2,y2)` with integers in [0, 1000) (Qwen-VL's normalised corners): the
  evaluation parses reference boxes, so one that is not four such integers would stop it later."""
  for k, (user, assistant) in enumerate(pairs):
    for who, text in (("user", user), ("assistant", assistant)):
      for span in BOX_SPAN_RE.findall(text):
        m = BOX_RE.match(span)
        if not m or any(int(v) >= 1000 for v in m.groups()):
          raise BadRecord(f"conversations[{k}] {who} box <box>{span[:60]}</box> is not (x1,y1),(x2,y2) with "
                          "integers in [0, 1000)", "bad_box")


def normalize_image_prefix(user: str) -> str:
  """`Picture N:<img>` (no space) -> `Picture N: <img>`; any other text is returned as it is."""
  return IMAGE_PREFIX_RE.sub(r"Picture \1: <img>", user, count=1)


def _inside(path: Path, root: Path) -> bool:
  try:
    path.resolve().relative_to(root.resolve())
    return True
  except ValueError:
    return False


def parse_record(rec: Any, *, root: Path, layout: str, default_task: str,
                 image_dirs: Sequence[Path] = ()) -> dict[str, Any]:
  """Validates one record; returns {id, modality, task, case_id, conversations, image_path}.

  The first user turn must hold exactly one `<img>` span and no other turn may hold one (one image per
  record is what the pipeline and model assume). For the official layout the span's path is rewritten to
  `images/<id>.png`, so stored text never carries the authors' machine paths.
  """
  if not isinstance(rec, dict):
    raise BadRecord(f"record is a {type(rec).__name__}, not an object")
  image_id = rec.get("id")
  if not isinstance(image_id, str) or not image_id:
    raise BadRecord("missing or empty 'id'")
  if not _SAFE_ID_RE.match(image_id) or ".." in image_id:
    raise BadRecord(f"id {image_id[:80]!r} is not a safe file stem (letters, digits, ._+- only)",
                      "unsafe_path")
  pairs = _turn_pairs(rec.get("conversations"))
  pairs[0][0] = normalize_image_prefix(pairs[0][0])
  check_boxes(pairs)
  spans = IMG_SPAN_RE.findall(pairs[0][0])
  if len(spans) != 1:
    raise BadRecord(f"first user turn has {len(spans)} <img>...</img> spans, expected 1")
  if any("<img>" in u or "<img>" in a for u, a in pairs[1:]) or "<img>" in pairs[0][1]:
    raise BadRecord("an <img> span outside the first user turn (one image per record)")
  img_rel = spans[0].strip()

  if layout == "generated":
    p = Path(img_rel)
    if not img_rel or p.is_absolute() or ".." in p.parts or not _inside(root / p, root):
      raise BadRecord(f"image path {img_rel[:80]!r} is not a relative path inside the dataset folder",
                      "unsafe_path")
    image_path = root / p
    if not image_path.is_file():
      raise BadRecord(f"image {img_rel} not found", "missing_image")
  elif layout == "official":
    found = [d / f"{image_id}.png" for d in image_dirs if (d / f"{image_id}.png").is_file()]
    if not found:
      raise BadRecord(f"image {image_id}.png not found in {', '.join(str(d) for d in image_dirs)}",
                      "missing_image")
    image_path = found[0]
    new_user = pairs[0][0].replace(f"<img>{spans[0]}</img>", f"<img>images/{image_id}.png</img>", 1)
    pairs[0] = [new_user, pairs[0][1]]
  else:
    raise ValueError(f"unknown layout {layout!r}")

  task = rec.get("task", default_task)
  if task not in RECORD_TASKS:
    task = default_task
  case_id = rec.get("case_id")
  if not isinstance(case_id, str) or not case_id:
    case_id = case_id_from_id(image_id)
  return {"id": image_id, "modality": modality_from_id(image_id), "task": task, "case_id": case_id,
          "conversations": pairs, "image_path": image_path}
