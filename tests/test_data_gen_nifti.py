"""MSD / nnU-Net v2 NIfTI sources: display orientation under non-identity affines (checked against world
coordinates computed here from the affine, not through nibabel), CT windowing, MR normalisation, nearest-
neighbour labels, empty-slice skipping, the per-case slice cap, and every bad-input case counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_gen.__main__ import main as cli_main
from data_gen.boxes import mask_extents, normalize_box, parse_boxes
from data_gen.pipeline import generate_dataset
from data_gen.sources.nifti import (
  MsdSource,
  NnUNetSource,
  channel_modality,
  parse_ct_window,
  resize_linear,
  resize_nearest,
)

SHAPE = (12, 10, 8)  # stored voxel grid; deliberately all different so a transpose cannot go unnoticed
CUBE = (slice(2, 5), slice(5, 9), slice(1, 6))  # stored voxel ranges of the labelled block (i, j, k)
# voxel axis 0 -> posterior (-y), axis 1 -> superior (+z), axis 2 -> left (-x): codes P, S, L
PERMUTED = np.array([[0, 0, -1, 5.0], [-1, 0, 0, 3.0], [0, 1, 0, -2.0], [0, 0, 0, 1.0]])
AFFINES = {"identity": np.eye(4), "permuted_flipped": PERMUTED}


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.Nifti1Image(arr, np.eye(4) if affine is None else affine).to_filename(str(path))


def _volume(shape=SHAPE, cube=CUBE, inside=240.0, outside=0.0, value=1):
  img = np.full(shape, outside, np.float32)
  lab = np.zeros(shape, np.uint8)
  img[cube] = inside
  lab[cube] = value
  return img, lab


def _msd(root: Path, cases: dict, *, labels=None, modality=None, extra: list | None = None) -> Path:
  """cases: name -> (image array, label array, affine)."""
  training = []
  for name, (img, lab, aff) in cases.items():
    _save(root / "imagesTr" / f"{name}.nii.gz", img, aff)
    _save(root / "labelsTr" / f"{name}.nii.gz", lab, aff)
    training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
  meta = {"name": "Test", "modality": modality or {"0": "CT"},
          "labels": labels or {"0": "background", "1": "liver", "2": "spleen"},
          "training": training + (extra or []), "numTraining": len(training)}
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def _expected_display(affine: np.ndarray, shape, cube, axis: str):
  """From world coordinates alone: {canonical slice index: (display mask shape, set of (row, col))}.

  Unit spacing, axis-aligned: canonical index along R/A/S = world coordinate minus its minimum over the grid.
  Radiological display: axial rows = A reversed, cols = R reversed; coronal rows = S reversed, cols = R
  reversed; sagittal rows = S reversed, cols = A reversed."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
  world = grid @ affine[:3, :3].T + affine[:3, 3]
  lo = world.min(0)
  n = np.rint(world.max(0) - lo).astype(int) + 1  # canonical shape (nR, nA, nS)
  sel = np.zeros(shape, bool)
  sel[cube] = True
  c = np.rint(world[sel.reshape(-1)] - lo).astype(int)
  slice_ax, row_ax, col_ax = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}[axis]
  out: dict[int, tuple[tuple[int, int], set]] = {}
  for v in c:
    s = int(v[slice_ax])
    hw = (int(n[row_ax]), int(n[col_ax]))
    out.setdefault(s, (hw, set()))[1].add((int(n[row_ax] - 1 - v[row_ax]), int(n[col_ax] - 1 - v[col_ax])))
  return out


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("aff_name", list(AFFINES))
def test_orientation_matches_world_coordinates(tmp_path, aff_name, axis):
  aff = AFFINES[aff_name]
  img, lab = _volume()
  src = MsdSource(_msd(tmp_path / "Task03_Liver", {"c1": (img, lab, aff)}), axis=axis, ct_window="40,400",
                  max_slices_per_case=None)
  samples = {s.meta["slice"]: s for s in src}
  expected = _expected_display(aff, SHAPE, CUBE, axis)
  assert set(samples) == set(expected), "slices with labels = canonical slices the cube occupies"
  tag = {"axial": "z", "coronal": "y", "sagittal": "x"}[axis]
  for s, (hw, pix) in expected.items():
    smp = samples[s]
    assert smp.image_id == f"ct_00--MSD_Liver--c1--{tag}_{s:04d}"
    assert smp.image.shape == hw and smp.image.dtype == np.uint8
    want = np.zeros(hw, bool)
    want[tuple(np.array(sorted(pix)).T)] = True
    (inst,) = smp.instances
    assert inst.label == "liver"
    np.testing.assert_array_equal(inst.mask, want)
    # the image went through the identical transform: its bright block is exactly the label block
    np.testing.assert_array_equal(smp.image == 255, want)
    assert smp.meta["plane"] == axis and smp.modality == "ct"


def test_end_to_end_png_boxes_equal_world_extents(tmp_path):
  """The written PNG's bright block, the box in the records, and the world-coordinate prediction agree."""
  cases = {}
  for n in range(3):
    img, lab = _volume(cube=(slice(2 + n, 5 + n), slice(5, 9), slice(1, 6)))
    cases[f"c{n}"] = (img, lab, PERMUTED)
  src = MsdSource(_msd(tmp_path / "Task03_Liver", cases), axis="axial", max_slices_per_case=None,
                  ct_window="40,400")
  out = tmp_path / "ds"
  m = generate_dataset(src, out, test_fraction=0.34, write_stats=False)
  assert m["counts"]["images"]["test"]["ct"] > 0 and m["counts"]["images"]["train"]["ct"] > 0
  records = json.loads((out / "train.json").read_text())
  for t in ("VG", "RO", "GC", "MII"):
    records += json.loads((out / f"test_{t}.json").read_text())
  boxes_by_id: dict[str, set] = {}
  for r in records:
    for q, a in r["conversations"]:
      boxes_by_id.setdefault(r["id"], set()).update(parse_boxes(q + a))
  pngs = sorted((out / "images").glob("*.png"))
  # the block spans stored j = 5..8, which PERMUTED maps to S: 4 axial slices per case
  assert len(pngs) == 3 * 4
  checked = 0
  for p in pngs:
    arr = np.asarray(Image.open(p))
    case, tag = p.stem.split("--")[2], p.stem.split("--")[3]
    n = int(case[1:])
    exp = _expected_display(PERMUTED, SHAPE, (slice(2 + n, 5 + n), slice(5, 9), slice(1, 6)), "axial")
    hw, pix = exp[int(tag.split("_")[1])]
    rows, cols = zip(*pix, strict=True)
    want_ext = (min(cols), min(rows), max(cols), max(rows))
    assert arr.shape == hw
    assert mask_extents(arr == 255) == want_ext
    if p.stem in boxes_by_id and boxes_by_id[p.stem]:
      assert boxes_by_id[p.stem] == {normalize_box(want_ext, hw[1], hw[0])}
      checked += 1
  assert checked >= 8  # images whose only records are MII mention no box


def test_ct_window_values(tmp_path):
  hu = np.array([-1000, -160, 0, 40, 240, 1000], np.float32)
  img = np.zeros(SHAPE, np.float32)
  img[:6, 0, :] = hu[:, None]  # stored row j=0 -> display bottom row (A reversed), cols = R reversed
  _, lab = _volume()
  src = MsdSource(_msd(tmp_path / "t", {"c": (img, lab, np.eye(4))}), ct_window="40,400",
                  max_slices_per_case=1)
  (s,) = list(src)
  bottom = s.image[-1, ::-1][:6]  # back to stored i order
  np.testing.assert_array_equal(bottom, [0, 0, 102, 128, 255, 255])
  assert s.meta["window"] == [-160.0, 240.0]
  assert parse_ct_window("lung") == (-1350.0, 150.0)
  assert parse_ct_window("auto", "MSD_Lung") == parse_ct_window("lung")
  assert parse_ct_window("auto", "MSD_Liver") == parse_ct_window("abdomen") == (-160.0, 240.0)
  assert parse_ct_window("auto", "CTSpine1K") == parse_ct_window("bone")
  with pytest.raises(ValueError, match="LEVEL,WIDTH"):
    parse_ct_window("kidneyish")


def test_mr_percentile_normalisation(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.uniform(100, 500, SHAPE).astype(np.float32)
  img[0, 0, 0] = 1e6  # one hot voxel must not crush the contrast of the rest
  _, lab = _volume()
  src = MsdSource(_msd(tmp_path / "t", {"c": (img, lab, np.eye(4))}, modality={"0": "T2"}),
                  max_slices_per_case=None)
  samples = list(src)
  assert samples and all(s.modality == "mr" and s.image_id.startswith("mr_t2--") for s in samples)
  lo, hi = np.percentile(img, [0.5, 99.5])
  for s in samples:
    plane = img[:, :, s.meta["slice"]].T[::-1, ::-1]
    want = np.rint(np.clip((plane.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255)
    assert np.abs(s.image.astype(int) - want).max() <= 1
    assert s.image.std() > 40  # real contrast, not a near-black image
  assert samples[0].meta["window"] == pytest.approx([lo, hi], rel=1e-5)


def test_labels_nearest_neighbour_and_square_pixels(tmp_path):
  shape = (6, 5, 4)
  img = np.zeros(shape, np.float32)
  img[:, :, 1] = 240.0  # -> 255 with the 40,400 window
  img[:, :, 2] = -160.0  # -> 0
  lab = np.zeros(shape, np.float32)  # float-stored labels are fine while integer-valued
  lab[1:4, 2, 1] = 1  # 3 voxels = 9 output pixels: above the tiny-object threshold
  lab[1:4, 2, 2] = 2
  aff = np.diag([1.0, 1.0, 3.0, 1.0])  # 3 mm slices: a coronal slice is 4*3 = 12 rows of 1 mm
  src = MsdSource(_msd(tmp_path / "t", {"c": (img, lab, aff)}), axis="coronal", max_slices_per_case=None,
                  ct_window="40,400")
  (s,) = list(src)
  assert s.image.shape == (12, 6)
  by = {i.label: i.mask for i in s.instances}
  # display rows = S reversed; each stored k is exactly 3 output rows (no blending at the border)
  liver_rows = np.flatnonzero(by["liver"].any(1))
  spleen_rows = np.flatnonzero(by["spleen"].any(1))
  np.testing.assert_array_equal(liver_rows, [6, 7, 8])  # k=1 -> rows (3-1)*3 .. +2
  np.testing.assert_array_equal(spleen_rows, [3, 4, 5])  # k=2
  assert not (by["liver"] & by["spleen"]).any()
  # ...while the image is interpolated linearly between the 255 and 0 rows
  col = s.image[:, 0].astype(int)
  assert set(col[3:9]) - {0, 255}, "image rows between slices should blend"
  lab_i = np.arange(35, dtype=np.int16).reshape(5, 7)
  r = resize_nearest(lab_i, (13, 4))
  assert r.dtype == np.int16 and set(np.unique(r)) <= set(lab_i.ravel())
  assert resize_linear(np.array([[0.0, 10.0]]), (1, 4)).tolist() == [[0.0, 2.5, 7.5, 10.0]]

  lab_bad = lab.copy()
  lab_bad[0, 0, 0] = 1.5
  src = MsdSource(_msd(tmp_path / "t2", {"c": (img, lab_bad, aff)}), axis="coronal")
  assert list(src) == [] and src.skips.counts["non-integer label values"] == 1


def test_empty_slices_skipped_and_cap(tmp_path):
  shape = (16, 16, 30)
  img = np.zeros(shape, np.float32)
  img[4:12, 4:12, :] = 100
  lab = np.zeros(shape, np.uint8)
  lab[4:12, 4:12, 5:25] = 1  # labelled in 20 of 30 axial slices
  lab[4, 4, 2] = 1  # one voxel: below the tiny-object threshold, so slice 2 is not a candidate
  root = _msd(tmp_path / "t", {"c": (img, lab, np.eye(4))})
  all_s = list(MsdSource(root, max_slices_per_case=None))
  assert [s.meta["slice"] for s in all_s] == list(range(5, 25))
  src = MsdSource(root, max_slices_per_case=5)
  capped = [s.meta["slice"] for s in src]
  assert capped == [5, 10, 15, 19, 24]  # evenly through the candidates, both ends included
  assert src.stats["slices_seen"] == 30 and src.stats["slices_with_labels"] == 20
  assert src.stats["slices_emitted"] == 5
  r0 = [s.meta["slice"] for s in MsdSource(root, max_slices_per_case=5, slice_sampling="random", seed=0)]
  r0b = [s.meta["slice"] for s in MsdSource(root, max_slices_per_case=5, slice_sampling="random", seed=0)]
  assert r0 == r0b and len(set(r0)) == 5 and set(r0) <= set(range(5, 25))
  # the budget is per case, shared across axes
  two = list(MsdSource(root, axis="axial,coronal", max_slices_per_case=5))
  assert len(two) == 5 and {s.meta["plane"] for s in two} == {"axial", "coronal"}


def test_bad_inputs_are_counted(tmp_path):
  root = tmp_path / "Task09_Spleen"
  img, lab = _volume()
  many_nan = img.copy()
  many_nan[:, :, :2] = np.nan
  few_nan = img.copy()
  few_nan[0, 0, 0] = np.inf
  unnamed = lab.copy()
  unnamed[8:10, 0:2, 0:3] = 3
  cases = {"good": (img, lab, np.eye(4)), "nan_many": (many_nan, lab, np.eye(4)),
           "nan_few": (few_nan, lab, np.eye(4)), "unnamed": (img, unnamed, np.eye(4))}
  extra = [
    {"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/gone.nii.gz"},
    {"image": "../outside.nii.gz", "label": "./labelsTr/good.nii.gz"},
    {"image": "./imagesTr/mismatch.nii.gz", "label": "./labelsTr/mismatch.nii.gz"},
    {"image": "./imagesTr/trunc.nii.gz", "label": "./labelsTr/good.nii.gz"},
    {"image": "./imagesTr/junk.nii.gz", "label": "./labelsTr/good.nii.gz"},
    {"image": "./imagesTr/flipped.nii.gz", "label": "./labelsTr/flipped.nii.gz"},
    "not-a-dict",
  ]
  _msd(root, cases, extra=extra)
  _save(root / "imagesTr/mismatch.nii.gz", img)
  _save(root / "labelsTr/mismatch.nii.gz", lab[:, :, :-1])
  raw = (root / "imagesTr/good.nii.gz").read_bytes()
  (root / "imagesTr/trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
  (root / "imagesTr/junk.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
  _save(root / "imagesTr/flipped.nii.gz", img, np.eye(4))
  _save(root / "labelsTr/flipped.nii.gz", lab, np.diag([-1.0, 1, 1, 1]))
  (tmp_path / "outside.nii.gz").write_bytes(raw)

  src = MsdSource(root, max_slices_per_case=2)
  samples = list(src)
  cases_out = {s.image_id.split("--")[2] for s in samples}
  assert cases_out == {"good", "nan_few", "unnamed"}
  c = src.skips.counts
  assert c["missing file"] == 1
  assert c["path traversal"] == 1
  assert c["image/label shape mismatch"] == 1
  assert c["unreadable volume"] == 2  # truncated gzip and a gzip of garbage
  assert c["non-finite image voxels"] == 1
  assert c["label value not in dataset.json"] == 1
  assert c["image/label orientation differ"] == 1
  assert c["bad dataset.json entry"] == 1
  assert src.skips.total == 9
  assert all(len(line) < 300 and "\n" not in line for ex in src.skips.examples.values() for line in ex)
  few = [s for s in samples if "nan_few" in s.image_id]
  assert few and few[0].meta["nonfinite_replaced"] == 1
  assert all({i.label for i in s.instances} == {"liver"} for s in samples)
  # a dataset.json that cannot be read at all raises (nothing to count against)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "dataset.json").write_text("{")
  with pytest.raises(ValueError, match="not valid JSON"):
    MsdSource(tmp_path / "broken")
  with pytest.raises(FileNotFoundError, match="dataset.json"):
    MsdSource(tmp_path / "nowhere")


def _nnunet(root: Path, cases: dict, labels: dict, channels: dict) -> Path:
  for name, (img, lab, aff) in cases.items():
    _save(root / "labelsTr" / f"{name}.nii.gz", lab, aff)
    if img is not None:
      _save(root / "imagesTr" / f"{name}_0000.nii.gz", img, aff)
  (root / "dataset.json").write_text(json.dumps({
    "channel_names": channels, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}))
  return root


def test_nnunet_layout(tmp_path):
  img, lab = _volume()
  lab[2:5, 5:9, 1:3] = 2  # lower part of the block is label 2
  lab[0:2, 0:2, 1:6] = 3  # "ignore": neither named nor counted as unnamed
  root = _nnunet(tmp_path / "Dataset002_Heart", {"la_003": (img, lab, PERMUTED), "la_004": (None, lab, np.eye(4))},
                 labels={"background": 0, "LV": 1, "RV": 2, "whole_heart": [1, 2], "ignore": 3},
                 channels={"0": "MRI"})
  (root / "labelsTr" / "._la_003.nii.gz").write_bytes(b"junk")  # macOS resource fork: ignored
  src = NnUNetSource(root, axis="axial", max_slices_per_case=None)
  samples = list(src)
  assert samples and all(s.image_id.startswith("mr_00--Heart--la_003--z_") for s in samples)
  assert dict(src.skips.counts) == {"missing file": 1}
  exp = _expected_display(PERMUTED, SHAPE, CUBE, "axial")
  for s in samples:
    by = {i.label: i.mask for i in s.instances}
    assert set(by) <= {"left ventricle", "right ventricle", "whole heart"} and "whole heart" in by
    hw, pix = exp[s.meta["slice"]]
    want = np.zeros(hw, bool)
    want[tuple(np.array(sorted(pix)).T)] = True
    np.testing.assert_array_equal(by["whole heart"], want)  # region label = union of 1 and 2
    if "left ventricle" in by and "right ventricle" in by:
      np.testing.assert_array_equal(by["left ventricle"] | by["right ventricle"], want)
  assert {s.meta["slice"] for s in samples if "right ventricle" in {i.label for i in s.instances}}
  with pytest.raises(ValueError, match="modality"):
    _nnunet(tmp_path / "z", {"a": (img, lab, np.eye(4))}, labels={"background": 0, "x": 1},
            channels={"0": "zscore"})
    NnUNetSource(tmp_path / "z")
  assert NnUNetSource(tmp_path / "z", modality="mr").modality == "mr"


def test_channel_modality_names():
  assert channel_modality("CT") == ("ct", "ct_00")
  assert channel_modality("MRI") == ("mr", "mr_00")
  assert channel_modality("FLAIR") == ("mr", "mr_flair")
  assert channel_modality("T1w") == ("mr", "mr_t1w")
  assert channel_modality("t1gd") == ("mr", "mr_t1gd")
  assert channel_modality("ADC") == ("mr", "mr_adc")
  assert channel_modality("PET") == ("pet", "pet_00")
  assert channel_modality("zscore") is None and channel_modality("noNorm") is None


def test_msd_multichannel_and_cli(tmp_path):
  img, lab = _volume()
  img4 = np.stack([img, 1000 - img], -1)  # BrainTumour-style (X, Y, Z, C)
  root = _msd(tmp_path / "Task01_BrainTumour", {"b1": (img4, lab, np.eye(4)), "b2": (img4, lab, np.eye(4))},
              modality={"0": "FLAIR", "1": "T1w"}, labels={"0": "background", "1": "edema"})
  s0 = list(MsdSource(root, channel=0, max_slices_per_case=1))
  s1 = list(MsdSource(root, channel=1, max_slices_per_case=1))
  assert s0[0].image_id.startswith("mr_flair--MSD_BrainTumour--b1--z_")
  assert s1[0].image_id.startswith("mr_t1w--")
  np.testing.assert_array_equal(s0[0].image, 255 - s1[0].image)  # inverted channel, same percentiles
  bad = MsdSource(root, channel=1, max_slices_per_case=1)
  bad.channel = 5
  assert list(bad) == [] and bad.skips.counts["missing channel"] == 2

  out = tmp_path / "out"
  rc = cli_main(["--source", "msd", "--root", str(root), "--out", str(out), "--axis", "coronal",
                 "--ct-window", "lung", "--max-slices-per-case", "2", "--test-fraction", "0.5"])
  assert rc == 0
  m = json.loads((out / "manifest.json").read_text())
  assert m["source"] == "msd"
  sp = m["params"]["source_params"]
  assert sp["axes"] == ["coronal"] and sp["max_slices_per_case"] == 2 and sp["ct_window"] == "lung"
  assert sum(m["counts"]["images"]["train"].values()) + sum(m["counts"]["images"]["test"].values()) == 4
  assert all("--y_" in p.name for p in (out / "images").glob("*.png"))
