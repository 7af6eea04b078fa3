"""data_gen.boxes: the normalisation rule, its inverse, components, tiny objects, text forms, names.

Speed (masks/s) is measured by `python -m data_gen.benchmark`, not asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from data_gen.boxes import (
  denormalize_box,
  format_box,
  format_ref_boxes,
  label_to_name,
  mask_extents,
  mask_to_boxes,
  mask_to_pixel_boxes,
  min_area_for,
  normalize_box,
  parse_boxes,
)


def test_normalize_matches_contract_formula():
  # 258x181 is a real SAM-Med2D demo slice size: non-square and not a divisor of 1000.
  w, h = 258, 181
  ext = (10, 20, 99, 180)
  x1, y1, x2, y2 = normalize_box(ext, w, h)
  assert (x1, y1) == (int(np.floor(1000 * 10 / w)), int(np.floor(1000 * 20 / h)))
  assert x2 == int(np.floor(1000 * 100 / w))
  assert y2 == 999  # ymax + 1 == H -> 1000, clipped


@pytest.mark.parametrize("w,h", [(64, 64), (128, 96), (258, 181), (999, 1000), (1000, 7)])
def test_denormalize_inverts_normalize_exactly(w, h):
  rng = np.random.default_rng(w * 1000 + h)
  for _ in range(500):
    xs = np.sort(rng.integers(0, w, 2))
    ys = np.sort(rng.integers(0, h, 2))
    ext = (int(xs[0]), int(ys[0]), int(xs[1]), int(ys[1]))
    box = normalize_box(ext, w, h)
    assert all(0 <= v < 1000 for v in box)
    assert box[0] < box[2] and box[1] < box[3]  # even a one-pixel object has a positive-area box
    assert denormalize_box(box, w, h) == ext


def test_components_are_split_and_sorted_with_8_connectivity():
  m = np.zeros((50, 40), bool)
  m[30:40, 2:12] = True  # lower blob
  m[5:10, 20:30] = True  # upper blob
  m[10, 30] = True  # touches the upper blob diagonally only -> same object under 8-connectivity
  px = mask_to_pixel_boxes(m, min_area=1)
  assert px == [(20, 5, 30, 10), (2, 30, 11, 39)]  # top-to-bottom
  assert mask_to_boxes(m, min_area=1) == [normalize_box(e, 40, 50) for e in px]
  assert mask_to_boxes(m, min_area=1, connected_components=False) == [normalize_box((2, 5, 30, 39), 40, 50)]
  assert mask_extents(m) == (2, 5, 30, 39)


def test_tiny_components_dropped_by_documented_threshold():
  h = w = 256
  thr = min_area_for(h, w)
  assert thr == max(8, int(np.ceil(0.0005 * h * w)))
  m = np.zeros((h, w), bool)
  m[100:140, 100:140] = True
  m[5:7, 5:7] = True  # a 4-pixel speck
  assert len(mask_to_boxes(m)) == 1
  assert len(mask_to_boxes(m, min_area=1)) == 2
  speck = np.zeros((h, w), bool)
  speck[0, 0] = True
  assert mask_to_boxes(speck) == [] and mask_to_boxes(np.zeros((h, w), bool)) == []
  with pytest.raises(ValueError, match="2-D"):
    mask_to_boxes(np.zeros((4, 4, 3), bool))


def test_box_text_forms_and_parse_roundtrip():
  assert format_box((1, 2, 345, 999)) == "<box>(1,2),(345,999)</box>"
  s = format_ref_boxes("left hip", [(1, 2, 3, 4), (10, 20, 30, 40)])
  assert s == "<ref>left hip</ref><box>(1,2),(3,4)</box><box>(10,20),(30,40)</box>"
  assert parse_boxes(s) == [(1, 2, 3, 4), (10, 20, 30, 40)]
  with pytest.raises(ValueError):
    format_box((0, 0, 1000, 5))
  with pytest.raises(ValueError):
    format_ref_boxes("liver", [])


@pytest.mark.parametrize("raw,name", [
  ("hip_left", "left hip"), ("heart_atrium_right", "right heart atrium"),
  ("lung_upper_lobe_left", "left lung upper lobe"), ("rib_left_9", "left 9th rib"),
  ("rib_right_12", "right 12th rib"), ("rib_left_1", "left 1st rib"), ("vertebrae_T9", "t9 vertebra"),
  ("inferior_vena_cava", "inferior vena cava"), ("gluteus_maximus_left", "left gluteus maximus"),
  ("left kidney", "left kidney"), ("Liver", "liver"), ("heart_myocardium", "myocardium"),
])
def test_label_to_name(raw, name):
  assert label_to_name(raw) == name


def test_label_to_name_dataset_table_wins():
  assert label_to_name("ET", dataset="BraTS2021") == "enhancing tumor"
  assert label_to_name("ET") == "et"


def _components_by_flood_fill(mask: np.ndarray) -> list[tuple[tuple[int, int, int, int], int]]:
  """(inclusive extents, area) of each 8-connected component, by a plain flood fill (independent of scipy)."""
  h, w = mask.shape
  seen = np.zeros_like(mask)
  out = []
  for y0, x0 in zip(*np.nonzero(mask), strict=True):
    if seen[y0, x0]:
      continue
    seen[y0, x0] = True
    stack, ys, xs = [(int(y0), int(x0))], [], []
    while stack:
      y, x = stack.pop()
      ys.append(y)
      xs.append(x)
      for ny in (y - 1, y, y + 1):
        for nx in (x - 1, x, x + 1):
          if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
            seen[ny, nx] = True
            stack.append((ny, nx))
    out.append(((min(xs), min(ys), max(xs), max(ys)), len(ys)))
  return out


def test_random_masks_match_a_flood_fill_reference():
  # A rectangle plus a stray pixel (sometimes touching it, mostly a speck): the components, their order and the
  # speck dropped under the default threshold. Speed is data_gen.benchmark's job, not a unit test's.
  rng = np.random.default_rng(0)
  for _ in range(40):
    m = np.zeros((256, 256), bool)
    y, x = rng.integers(0, 200, 2)
    m[y:y + rng.integers(5, 50), x:x + rng.integers(5, 50)] = True
    m[rng.integers(0, 256), rng.integers(0, 256)] = True
    ref = sorted(_components_by_flood_fill(m), key=lambda c: (c[0][1], c[0][0]))
    assert mask_to_pixel_boxes(m, min_area=1) == [e for e, _ in ref]
    thr = min_area_for(256, 256)
    assert mask_to_boxes(m) == [normalize_box(e, 256, 256) for e, area in ref if area >= thr]
