"""The phantom source: determinism, layout rules, and the properties that make it a useful demo dataset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_gen.boxes import denormalize_box, mask_extents, mask_to_boxes
from data_gen.sources.base import MODALITIES, Sample, Source, modality_from_id
from data_gen.sources.phantom import SPECS, PhantomSource


def _signature(samples: list[Sample]) -> list:
  return [(s.image_id, s.image.tobytes(), [(i.label, i.mask.tobytes()) for i in s.instances])
          for s in samples]


def test_protocol_ids_and_modalities():
  src = PhantomSource(num_cases=3, image_size=64, modalities=("ct", "mr", "x", "ultrasound", "fundus"))
  assert isinstance(src, Source)
  samples = list(src)
  assert len(samples) == len(src) == 3 * (6 + 6 + 1 + 1 + 1)
  for s in samples:
    assert s.modality in MODALITIES and modality_from_id(s.image_id) == s.modality
    assert s.image.dtype == np.uint8 and s.image.shape[:2] == (64, 64)
    assert s.image.ndim == (3 if s.modality == "fundus" else 2)
    assert s.image_id.startswith(s.case_id + "--")
  ids = [s.image_id for s in samples]
  assert len(set(ids)) == len(ids)
  assert "x_ray--Phantom--case_0002--2d_none" in ids
  assert "ct_00--Phantom--case_0001--z_0005" in ids


def test_deterministic_from_seed_and_independent_of_num_cases():
  a = list(PhantomSource(num_cases=4, image_size=64, seed=3))
  b = list(PhantomSource(num_cases=4, image_size=64, seed=3))
  assert _signature(a) == _signature(b)
  c = list(PhantomSource(num_cases=4, image_size=64, seed=4))
  assert _signature(a) != _signature(c)
  # Case k does not depend on how many cases are generated.
  more = {s.image_id: s for s in PhantomSource(num_cases=6, image_size=64, seed=3)}
  assert _signature(a) == _signature([more[s.image_id] for s in a])


def test_balance_modalities_gives_each_modality_as_many_images_and_keeps_existing_cases():
  plain = list(PhantomSource(num_cases=3, image_size=64, seed=3))
  balanced = list(PhantomSource(num_cases=3, image_size=64, seed=3, balance_modalities=True))
  per_mod = Counter(s.modality for s in balanced)
  assert per_mod == {"ct": 18, "mr": 18, "x": 18} and len(PhantomSource(3, balance_modalities=True)) == 54
  assert len({s.case_id for s in balanced if s.modality == "x"}) == 18
  by_id = {s.image_id: s for s in balanced}
  assert _signature(plain) == _signature([by_id[s.image_id] for s in plain])  # the extra cases only add
  assert "balance_modalities" not in PhantomSource(3).params()  # old folders keep their parameters


def test_layout_rules_sizes_overlap_and_box_equals_mask_extents():
  size = 128
  src = PhantomSource(num_cases=25, image_size=size, seed=1)
  centers = []
  for s in src:
    names = [i.label for i in s.instances]
    assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
    assert set(names) <= {c.name for c in SPECS[s.modality].classes}
    union = np.zeros((size, size), int)
    for inst in s.instances:
      union += inst.mask
      ext = mask_extents(inst.mask)
      w, h = ext[2] - ext[0] + 1, ext[3] - ext[1] + 1
      assert 0.12 * size * 0.85 <= min(w, h) and max(w, h) <= 0.45 * size + 1, (s.image_id, inst.label, w, h)
      boxes = mask_to_boxes(inst.mask)
      assert len(boxes) == 1  # every phantom structure is one connected object
      assert denormalize_box(boxes[0], size, size) == ext
      centers.append(((ext[0] + ext[2]) / 2 / size, (ext[1] + ext[3]) / 2 / size))
    assert union.max() == 1  # non-overlapping
  c = np.array(centers)
  assert c.std(axis=0).min() > 0.15  # positions vary strongly across cases


def test_slices_share_layout_with_small_jitter():
  case = PhantomSource(image_size=128, seed=0).case("ct", 7)
  assert len(case) == 6 and len({s.case_id for s in case}) == 1
  first = {i.label: mask_extents(i.mask) for i in case[0].instances}
  for s in case[1:]:
    assert {i.label for i in s.instances} == set(first)
    assert not np.array_equal(s.image, case[0].image)
    for inst in s.instances:
      e, f = mask_extents(inst.mask), first[inst.label]
      assert abs((e[0] + e[2]) - (f[0] + f[2])) / 2 <= 6 and abs((e[1] + e[3]) - (f[1] + f[3])) / 2 <= 6


def test_classes_separable_by_intensity():
  # Nearest-centroid on the mean grey level inside the mask must classify every instance: the visual cue a
  # tiny model can pick up first. (Shapes differ too.)
  src = PhantomSource(num_cases=30, image_size=96, seed=2)
  per_mod: dict[str, list[tuple[str, float]]] = {}
  for s in src:
    g = s.image.astype(np.float32)
    for inst in s.instances:
      per_mod.setdefault(s.modality, []).append((inst.label, float(g[inst.mask].mean())))
  for mod, items in per_mod.items():
    labels = sorted({label for label, _ in items})
    cent = {lab: np.mean([v for label, v in items if label == lab]) for lab in labels}
    correct = sum(min(labels, key=lambda lab: abs(cent[lab] - v)) == label for label, v in items)
    assert correct / len(items) > 0.99, mod


def test_default_set_size():
  # ct and mr cases give 6 slices, x-ray cases 1: the 1,950 images of the documented demo set, 2,678 for 206 cases.
  # (Generation speed is measured by `python -m data_gen.benchmark`, not asserted in a unit test.)
  assert len(PhantomSource()) == 150 * 13 == 1950
  assert len(PhantomSource(num_cases=206, image_size=128, seed=0)) == 206 * 13


def test_bad_arguments_raise_one_line():
  with pytest.raises(ValueError, match="no modality"):
    PhantomSource(modalities=("ct", "xyz"))
  with pytest.raises(ValueError, match="image_size"):
    PhantomSource(image_size=8)


def test_anatomical_layout_puts_each_class_around_its_home():
  size, jitter = 128, 0.12
  src = PhantomSource(num_cases=30, image_size=size, seed=3, layout="anatomical", home_jitter=jitter,
                      slices_per_case=1)
  homes = {c.name: c.home for spec in SPECS.values() for c in spec.classes}
  offsets, sizes = [], []
  for s in src:
    union = np.zeros((size, size), int)
    for inst in s.instances:
      union += inst.mask
      x0, y0, x1, y1 = mask_extents(inst.mask)
      hy, hx = homes[inst.label]
      # The centre is the home +- jitter, unless clipping at the border pushed the box inwards.
      offsets.append((((y0 + y1) / 2 + 0.5) / size - hy, ((x0 + x1) / 2 + 0.5) / size - hx))
      sizes.append((x1 - x0 + 1) / size)
    assert union.max() == 1  # still non-overlapping
  off = np.abs(np.array(offsets))
  assert np.mean(off.max(axis=1) <= jitter + 0.02) > 0.97, off.max(axis=0)
  assert off.max(axis=0).min() > 0.08  # the jitter is used, not a fixed place
  assert np.std(sizes) > 0.05  # sizes still vary: the box cannot be read off the class
  assert src.params()["layout"] == "anatomical"
  assert "layout" not in PhantomSource().params()  # sets made before the option keep their parameters


def test_random_layout_is_unchanged_by_the_layout_option():
  a = PhantomSource(num_cases=3, image_size=64, seed=4)
  b = PhantomSource(num_cases=3, image_size=64, seed=4, layout="random", home_jitter=0.3)
  assert _signature(list(a)) == _signature(list(b))
  with pytest.raises(ValueError, match="layout 'grid' is unknown"):
    PhantomSource(layout="grid")


def test_textures_are_unique_per_class_and_keep_the_grey_level():
  from data_gen.sources.phantom import DEFAULT_MODALITIES, TEXTURES

  kinds = {(TEXTURES[i % len(TEXTURES)], SPECS[m].texture_cycles)
           for m in DEFAULT_MODALITIES for i in range(len(SPECS[m].classes))}
  assert len(kinds) == sum(len(SPECS[m].classes) for m in DEFAULT_MODALITIES)  # no two classes share one
  flat = PhantomSource(num_cases=4, image_size=128, seed=5, slices_per_case=1)
  assert _signature(list(flat)) == _signature(list(PhantomSource(num_cases=4, image_size=128, seed=5,
                                                                 slices_per_case=1, texture_amplitude=0.0)))
  textured = PhantomSource(num_cases=4, image_size=128, seed=5, slices_per_case=1, texture_amplitude=40)
  levels = {c.name: c.level for spec in SPECS.values() for c in spec.classes}
  for a, b in zip(flat, textured, strict=True):
    assert [i.label for i in a.instances] == [i.label for i in b.instances]
    for fi, ti in zip(a.instances, b.instances, strict=True):
      assert np.array_equal(fi.mask, ti.mask)  # same layout and boxes: only the inside changes
      inside = b.image[ti.mask].astype(np.float32)
      if 45 <= levels[ti.label] <= 210 and ti.mask.sum() > 100:  # no clipping at 0 / 255
        assert inside.std() > 20 > a.image[fi.mask].astype(np.float32).std(), ti.label
        assert abs(inside.mean() - levels[ti.label]) < 12, ti.label  # the mean grey level stays the class's
  assert textured.params()["texture_amplitude"] == 40 and "texture_amplitude" not in flat.params()


def test_hue_palette_colours_each_class_and_keeps_the_layout():
  from data_gen.sources.phantom import HUES

  grey = PhantomSource(num_cases=3, image_size=96, seed=2, slices_per_case=3)
  hue = PhantomSource(num_cases=3, image_size=96, seed=2, slices_per_case=3, palette="hue")
  index = {c.name: i for spec in SPECS.values() for i, c in enumerate(spec.classes)}
  for a, b in zip(grey, hue, strict=True):
    assert a.image.ndim == 2 and b.image.shape == a.image.shape + (3,)
    for gi, hi in zip(a.instances, b.instances, strict=True):
      assert gi.label == hi.label and np.array_equal(gi.mask, hi.mask)  # same structures, same boxes
      mean = b.image[hi.mask].astype(np.float32).mean(0)
      nearest = int(np.argmin(((np.asarray(HUES, np.float32) - mean) ** 2).sum(-1)))
      assert nearest == index[hi.label], (hi.label, mean)
    outside = ~np.any([i.mask for i in b.instances], axis=0)
    assert np.array_equal(b.image[outside], np.repeat(a.image[outside][:, None], 3, axis=1))  # the grey twin
  assert hue.params()["palette"] == "hue" and "palette" not in grey.params()
  with pytest.raises(ValueError, match="palette 'rainbow' is unknown"):
    PhantomSource(palette="rainbow")


def test_size_range_bounds_every_structure_box():
  """min_frac/max_frac bound each structure's box side (as drawn, before the per-slice jitter and shape)."""
  big = PhantomSource(num_cases=4, image_size=96, seed=5, slices_per_case=2, min_objects=1, max_objects=1,
                      min_frac=0.3, max_frac=0.5)
  sides = []
  for s in big:
    for inst in s.instances:
      x0, y0, x1, y1 = mask_extents(inst.mask)  # inclusive
      sides += [(x1 - x0 + 1) / 96, (y1 - y0 + 1) / 96]
  # a shape's mask spans its drawn box up to a pixel of sampling at each edge
  assert min(sides) >= 0.3 - 2 / 96 and max(sides) <= 0.5 + 1 / 96, (min(sides), max(sides))
  assert big.params()["min_frac"] == 0.3 and big.params()["max_frac"] == 0.5
  for lo, hi in ((0.3, 0.2), (0.0, 0.3), (0.2, 0.9)):
    with pytest.raises(ValueError, match="need 0.02 <= MIN <= MAX <= 0.6"):
      PhantomSource(min_frac=lo, max_frac=hi)
