"""Masks -> Qwen-VL boxes, box text, and label -> referring-expression names.

Box normalisation (the project contract): for inclusive pixel extents xmin..xmax, ymin..ymax of an object on
a W x H image,
  x1 = floor(1000 * xmin / W),  y1 = floor(1000 * ymin / H),
  x2 = min(999, floor(1000 * (xmax + 1) / W)),  y2 = min(999, floor(1000 * (ymax + 1) / H)).
So every coordinate is an integer in [0, 1000) and the box covers the object's pixels as areas (the +1 makes
a one-pixel-wide object a box of width ~1000/W, not zero). For W, H <= 1000 the map is invertible
(`denormalize_box`), which is what the tests check.

Tiny objects: a connected component smaller than `max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * H * W)` pixels is
dropped. Such boxes are a few units wide in [0, 1000), so IoU > 0.5 would hinge on one pixel of rounding and
the "object" is usually a segmentation speck. SAM-Med2D reportedly dropped masks under ~0.153% of the image
(unverified, see dataset_layouts.md 1.6); 0.05% is more permissive and keeps small real lesions.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy import ndimage

MIN_AREA_PIXELS = 8
MIN_AREA_FRACTION = 0.0005
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: diagonal touches belong to one object (thin vessels, ribs)

Box = tuple[int, int, int, int]


def min_area_for(height: int, width: int) -> int:
  return max(MIN_AREA_PIXELS, math.ceil(MIN_AREA_FRACTION * height * width))


def normalize_box(extents: tuple[int, int, int, int], width: int, height: int) -> Box:
  """Inclusive pixel extents (xmin, ymin, xmax, ymax) -> contract box ints in [0, 1000)."""
  xmin, ymin, xmax, ymax = (int(v) for v in extents)
  return (
    (1000 * xmin) // width,
    (1000 * ymin) // height,
    min(999, (1000 * (xmax + 1)) // width),
    min(999, (1000 * (ymax + 1)) // height),
  )


def denormalize_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
  """Inverse of `normalize_box` (exact for width, height <= 1000): -> inclusive pixel extents."""
  x1, y1, x2, y2 = box

  def lo(v: int, n: int) -> int:
    return -((-v * n) // 1000)  # ceil(v * n / 1000), integer-exact

  def hi(v: int, n: int) -> int:
    return n - 1 if v == 999 else lo(v, n) - 1

  return lo(x1, width), lo(y1, height), hi(x2, width), hi(y2, height)


def mask_extents(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """Inclusive (xmin, ymin, xmax, ymax) of the True pixels, or None for an empty mask."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return None
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def mask_to_pixel_boxes(mask: np.ndarray, *, min_area: int | None = None,
                        connected_components: bool = True) -> list[tuple[int, int, int, int]]:
  """Inclusive pixel extents per object, sorted top-to-bottom then left-to-right (a stable answer order)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
  mask = mask.astype(bool, copy=False)
  h, w = mask.shape
  thr = min_area_for(h, w) if min_area is None else int(min_area)
  if not connected_components:
    ext = mask_extents(mask)
    if ext is None or int(mask.sum()) < thr:
      return []
    return [ext]
  labels, n = ndimage.label(mask, structure=_EIGHT)
  if n == 0:
    return []
  areas = np.bincount(labels.ravel(), minlength=n + 1)
  out = []
  for i, sl in enumerate(ndimage.find_objects(labels), start=1):
    if sl is None or areas[i] < thr:
      continue
    out.append((sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1))
  out.sort(key=lambda b: (b[1], b[0]))
  return out


def mask_to_boxes(mask: np.ndarray, *, min_area: int | None = None,
                  connected_components: bool = True) -> list[Box]:
  """Contract boxes (x1, y1, x2, y2) in [0, 1000) for each object of a binary mask.

  connected_components=True gives one box per 8-connected component (a class mask with two blobs -> two
  boxes); False gives the extents of the whole mask. Components under `min_area` pixels (default: see the
  module docstring) are dropped; an empty result means "nothing groundable here".
  """
  h, w = np.shape(mask)[:2]
  return [normalize_box(e, w, h) for e in mask_to_pixel_boxes(
    mask, min_area=min_area, connected_components=connected_components)]


def format_box(box: Box) -> str:
  x1, y1, x2, y2 = (int(v) for v in box)
  for v in (x1, y1, x2, y2):
    if not 0 <= v < 1000:
      raise ValueError(f"box {box} has a coordinate outside [0, 1000)")
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_ref_boxes(name: str, boxes: list[Box]) -> str:
  if not boxes:
    raise ValueError(f"no boxes to ground {name!r}")
  return f"<ref>{name}</ref>" + "".join(format_box(b) for b in boxes)


BOX_RE = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


def parse_boxes(text: str) -> list[Box]:
  return [tuple(int(g) for g in m.groups()) for m in BOX_RE.finditer(text)]  # type: ignore[misc]


# ---- label -> name ------------------------------------------------------------------------------------
# Exact raw labels (lower-cased) whose generic rule would read badly. Keyed by dataset name; "*": all.
NAME_TABLE: dict[str, dict[str, str]] = {
  "*": {
    "ivc": "inferior vena cava",
    "inferior_vena_cava": "inferior vena cava",
    "postcava": "inferior vena cava",
    "portal_vein_and_splenic_vein": "portal and splenic vein",
    "covid_lesion": "covid-19 lesion",
    "covid-19_lesion": "covid-19 lesion",
    "lv": "left ventricle",
    "rv": "right ventricle",
    "myo": "myocardium",
    "heart_myocardium": "myocardium",
    "urinary_bladder": "bladder",
    "small_bowel": "small bowel",
    "duodenum": "duodenum",
    "esophagus": "esophagus",
  },
  "BraTS2021": {"ncr": "necrotic tumor core", "ed": "peritumoral edema", "et": "enhancing tumor"},
  "MSD_Prostate": {"pz": "prostate peripheral zone", "tz": "prostate transition zone"},
}
_SIDES = ("left", "right")


def _ordinal(n: int) -> str:
  suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
  return f"{n}{suffix}"


def label_to_name(label: str, dataset: str | None = None) -> str:
  """Raw dataset label -> lower-case referring expression: "hip_left" -> "left hip",
  "heart_atrium_right" -> "right heart atrium", "lung_upper_lobe_left" -> "left lung upper lobe",
  "rib_left_9" -> "left 9th rib", "vertebrae_T9" -> "t9 vertebra". Already-natural names pass unchanged."""
  raw = label.strip()
  key = raw.lower().replace(" ", "_")
  for table in (NAME_TABLE.get(dataset or "", {}), NAME_TABLE["*"]):
    if key in table:
      return table[key]
  words = [w for w in re.split(r"[_\s]+", key) if w]
  sides = [w for w in words if w in _SIDES]
  rest = [w for w in words if w not in _SIDES]
  if rest[:1] in (["vertebrae"], ["vertebra"]) and len(rest) == 2:
    rest = [rest[1], "vertebra"]
  elif rest[:1] == ["rib"] and len(rest) == 2 and rest[1].isdigit():
    rest = [_ordinal(int(rest[1])), "rib"]
  name = " ".join(sides[:1] + rest)
  return name or key
