"""What every source yields: 2-D samples with per-instance binary masks, plus a report of what it skipped.

A source reads some on-disk layout (or synthesises data) and yields `Sample`s. It never raises on one bad
file: it records the file and the reason in its `SkipReport` and moves on, so one corrupt PNG in millions
does not kill a multi-hour generation run. The pipeline merges the source's report with its own.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

# BiRD's evaluation keys (image_name.split("_")[0]); the order is the one its scripts print.
MODALITIES: tuple[str, ...] = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")

# SA-Med2D file-name prefix used when a source has to invent ids (`{prefix}--{dataset}--{case}--{slice}`).
# The prefix's text before the first "_" is the modality key, which is the rule every reader applies.
MODALITY_PREFIX: dict[str, str] = {
  "ct": "ct_00",
  "mr": "mr_00",
  "x": "x_ray",
  "pet": "pet_00",
  "endoscopy": "endoscopy_00",
  "dermoscopy": "dermoscopy_00",
  "fundus": "fundus_photography",
  "ultrasound": "ultrasound_00",
}

# Ids become file names (images/<id>.png) and JSON keys: no path separators, no "..", no spaces.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def modality_from_id(image_id: str) -> str:
  """The Med-GRIT rule: the modality is the id's text before the first "_" (`x_ray--...` -> "x")."""
  return image_id.split("_", 1)[0]


def is_safe_id(image_id: str) -> bool:
  return bool(_SAFE_ID.match(image_id)) and ".." not in image_id and len(image_id) <= 200


def sanitize_token(text: str) -> str:
  """Makes free text usable as one `--`-separated id field (case names, dataset names)."""
  out = re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip())
  out = re.sub(r"-{2,}", "-", out).strip("._-")
  return out or "x"


def make_image_id(modality: str, dataset: str, case: str, slice_tag: str = "2d_none") -> str:
  """SA-Med2D-style id, e.g. ("ct", "Phantom", "case_0003", "z_0004") -> ct_00--Phantom--case_0003--z_0004."""
  if modality not in MODALITY_PREFIX:
    raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
  parts = [MODALITY_PREFIX[modality], dataset, case, slice_tag]
  return "--".join([parts[0]] + [sanitize_token(p) for p in parts[1:]])


@dataclasses.dataclass
class Instance:
  """One labelled object on one slice. `label` may be a raw dataset label (`hip_left`); tasks turn it
  into words with `boxes.label_to_name`. The mask may hold several connected components."""

  label: str
  mask: np.ndarray  # bool HxW, same HxW as the sample's image
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sample:
  """One 2-D image with its instances. `image` is exactly what gets written as PNG and what boxes are
  computed on (uint8 HxW or HxWx3)."""

  image_id: str
  image: np.ndarray
  instances: list[Instance]
  case_id: str  # the split unit: all slices of one patient/volume share it
  modality: str  # one of MODALITIES
  source: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
  name: str

  def __iter__(self) -> Iterator[Sample]: ...


class SkipReport:
  """Counts skipped items by reason and keeps the first few `where: reason (detail)` lines per reason."""

  def __init__(self, keep_examples: int = 5):
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self._keep = keep_examples

  def add(self, where: str, reason: str, detail: str = "") -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < self._keep:
      line = f"{where}: {reason}" + (f" ({detail})" if detail else "")
      self.examples[reason].append(line)

  def merge(self, other: SkipReport) -> None:
    for reason, n in other.counts.items():
      self.counts[reason] += n
      room = self._keep - len(self.examples[reason])
      self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def __len__(self) -> int:
    return self.total

  def lines(self) -> list[str]:
    out = []
    for reason, n in self.counts.most_common():
      out.append(f"{n:8d}  {reason}")
      out.extend(f"          e.g. {e}" for e in self.examples.get(reason, [])[:2])
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items() if v}}
