"""File-based sources: the real SAM-Med2D demo fixture, the SA-Med2D-20M release layout, a plain PNG folder,
and the counted skips for broken inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen.boxes import denormalize_box, label_to_name, mask_extents, mask_to_boxes, parse_boxes
from data_gen.pipeline import generate_dataset
from data_gen.sources.base import modality_from_id
from data_gen.sources.png_folder import PngFolderSource
from data_gen.sources.sam_med2d import SamMed2DSource

DEMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sam_med2d_demo"


def _mask_file_extents() -> dict[str, dict[str, list[tuple]]]:
  """image stem -> raw label -> pixel extents, read straight from the fixture's mask files."""
  out: dict[str, dict[str, list[tuple]]] = {}
  stems = [p.stem for p in (DEMO / "images").glob("*.png")]
  for p in sorted((DEMO / "masks").glob("*.png")):
    stem = next(s for s in stems if p.stem.startswith(s + "_"))
    label = p.stem[len(stem) + 1:-4]
    out.setdefault(stem, {}).setdefault(label, []).append(mask_extents(np.asarray(Image.open(p)) > 0))
  return out


def test_demo_fixture_samples_and_boxes():
  src = SamMed2DSource(DEMO)
  assert src.layout == "demo"
  samples = list(src)
  by_id = {s.image_id: s for s in samples}
  assert set(by_id) == {
    "ct_00--AMOS2022--amos_0006--z_0090", "ct_00--AMOS2022--amos_0004--z_0075",
    "ct_00--Totalsegmentator_dataset--s0114--z_0111", "ct_00--Totalsegmentator_dataset--s0619--z_0032",
  }
  assert src.skips.counts == {"image not in any index": 1}  # amos_0507_31 has no masks listed
  truth = _mask_file_extents()
  n_boxes = 0
  for s in samples:
    assert modality_from_id(s.image_id) == "ct" and s.image.ndim == 2  # identical-channel RGB -> L
    raw = np.asarray(Image.open(DEMO / "images" / s.meta["file"]))
    np.testing.assert_array_equal(s.image, raw[..., 0])
    stem = Path(s.meta["file"]).stem
    got: dict[str, list[tuple]] = {}
    for inst in s.instances:
      h, w = inst.mask.shape
      for b in mask_to_boxes(inst.mask, connected_components=False):
        got.setdefault(inst.label, []).append(denormalize_box(b, w, h))
        n_boxes += 1
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in truth[stem].items()}
  assert n_boxes == 30


def test_demo_fixture_through_pipeline(tmp_path):
  out = tmp_path / "demo"
  m = generate_dataset(SamMed2DSource(DEMO), out, test_fraction=0.5, max_turns=3, write_stats=False)
  assert m["skipped"]["counts"] == {"image not in any index": 1}
  assert sum(sum(v.values()) for v in m["counts"]["images"].values()) == 4
  truth = _mask_file_extents()
  recs = json.loads((out / "train.json").read_text()) + json.loads((out / "test_VG.json").read_text())
  stem_of = {"ct_00--AMOS2022--amos_0006--z_0090": "amos_0006_90", "ct_00--AMOS2022--amos_0004--z_0075":
             "amos_0004_75", "ct_00--Totalsegmentator_dataset--s0114--z_0111": "s0114_111",
             "ct_00--Totalsegmentator_dataset--s0619--z_0032": "s0619_32"}
  names = {stem: {label_to_name(k): v for k, v in d.items()} for stem, d in truth.items()}
  seen_vg = 0
  for r in recs:
    h, w = np.asarray(Image.open(out / "images" / f"{r['id']}.png")).shape[:2]
    for _, a in r["conversations"]:
      mm = re.fullmatch(r"<ref>([^<]+)</ref>((?:<box>\(\d+,\d+\),\(\d+,\d+\)</box>)+)", a)
      if mm:
        boxes = parse_boxes(mm.group(2))
        assert sorted(denormalize_box(b, w, h) for b in boxes) == sorted(names[stem_of[r["id"]]][mm.group(1)])
        seen_vg += 1
  assert seen_vg >= 2


def _png(path: Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path)


def _img(h: int = 40, w: int = 60, seed: int = 0, rgb: bool = False) -> np.ndarray:
  a = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
  return np.stack([a, a // 2, a // 3], -1) if rgb else a


def _mask(h: int = 40, w: int = 60, box=(5, 8, 20, 30)) -> np.ndarray:
  m = np.zeros((h, w), np.uint8)
  x0, y0, x1, y1 = box
  m[y0:y1 + 1, x0:x1 + 1] = 255
  return m


def test_demo_layout_bad_inputs_counted(tmp_path):
  root = tmp_path / "data_demo"
  _png(root / "images" / "case_1.png", _img())
  _png(root / "masks" / "case_1_liver_000.png", _mask())
  _png(root / "masks" / "case_1_spleen_000.png", np.zeros((40, 60), np.uint8))  # empty
  _png(root / "masks" / "case_1_aorta_000.png", _mask(20, 20, (1, 1, 5, 5)))  # size mismatch
  _png(root / "images" / "case_2.png", _img(seed=1))
  (root / "images" / "case_3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # corrupt
  _png(root / "masks" / "case_3_liver_000.png", _mask())
  _png(root / "images" / "case_4.png", np.full((40, 60), 9, np.uint8))  # blank
  _png(root / "masks" / "case_4_liver_000.png", _mask())
  _png(root / "masks" / "case_2_liver_000.png", _mask(box=(30, 10, 50, 20)))
  index = {
    "data_demo/images/case_1.png": [
      "data_demo/masks/case_1_liver_000.png", "data_demo/masks/case_1_spleen_000.png",
      "data_demo/masks/case_1_aorta_000.png", "data_demo/masks/case_1_heart_000.png",  # heart: missing
      "../../../etc/passwd", "data_demo/masks/case_2_liver_000.png",  # traversal; another image's mask
    ],
    "data_demo/images/case_3.png": ["data_demo/masks/case_3_liver_000.png"],
    "data_demo/images/case_4.png": ["data_demo/masks/case_4_liver_000.png"],
    "data_demo/images/missing_9.png": ["data_demo/masks/missing_9_liver_000.png"],
    "/etc/passwd": [],
  }
  (root / "image2label_train.json").write_text(json.dumps(index))
  (root / "label2image_test.json").write_text(json.dumps({"data_demo/masks/case_2_liver_000.png":
                                                          "data_demo/images/case_2.png"}))
  src = SamMed2DSource(root)
  samples = list(src)
  assert [s.image_id for s in samples] == ["ct_00--SAM-Med2D_demo--case--z_0001",
                                           "ct_00--SAM-Med2D_demo--case--z_0002"]
  assert [i.label for i in samples[0].instances] == ["liver"]
  c = src.skips.counts
  assert c["empty mask"] == 1 and c["mask size mismatch"] == 1 and c["missing mask file"] == 1
  assert c["path traversal"] == 2 and c["unreadable image"] == 1 and c["blank or binary image"] == 1
  assert c["missing file"] == 1 and c["mask name does not match image"] == 1
  assert any("case_3.png" in e for e in src.skips.examples["unreadable image"])
  m = generate_dataset(src, tmp_path / "out", write_stats=False)
  assert m["skipped"]["counts"]["path traversal"] == 2  # merged into the manifest


def _release(tmp_path: Path, with_index: bool = True) -> Path:
  root = tmp_path / "SAMed2Dv1"
  img_a = "ct_00--AbdomenCT1K--Case_00220--x_0359"
  img_b = "x_ray--covid_19_ct_cxr--16660_5_1--2d_none"
  img_c = "mr_t1--BraTS2021--BraTS2021_00218--z_0141"
  img_d = "ct_00--Brain_PTM--p1--z_0001"
  _png(root / "images" / f"{img_a}.png", _img(seed=2, rgb=False))
  rgb = _img(seed=3)
  _png(root / "images" / f"{img_b}.png", np.stack([rgb] * 3, -1))  # identical channels -> saved as L
  _png(root / "images" / f"{img_c}.png", _img(seed=4, rgb=True))  # real colour stays RGB
  _png(root / "images" / f"{img_d}.png", _mask())  # a "binary image": skipped
  masks = {
    img_a: {"0000_000": _mask(), "0003_000": _mask(box=(40, 2, 55, 10)),
            "0003_001": _mask(box=(30, 30, 40, 38)), "0007_000": _mask(), "0009_000": _mask(),
            "0004_000": _mask(box=(0, 0, 59, 39))},
    img_b: {"0000_000": _mask(box=(2, 2, 20, 20)), "0001_000": _mask(box=(1, 1, 3, 3))},
    img_c: {"0002_000": _mask(box=(10, 10, 30, 30))},
    img_d: {"0000_000": _mask()},
  }
  index = {}
  for stem, ms in masks.items():
    index[f"images/{stem}.png"] = []
    for suffix, arr in ms.items():
      _png(root / "masks" / f"{stem}--{suffix}.png", arr)
      index[f"images/{stem}.png"].append(f"masks/{stem}--{suffix}.png")
  index[f"images/{img_a}.png"].append(f"masks/{img_b}--0000_000.png")  # belongs to another image
  mapping = {
    # 0009 is unmapped
    "AbdomenCT1K": {"liver": "0000", "kidney": "0003", "union_abdomen": "0007", "body": "0004"},
    "covid_19_ct_cxr": {"lung_left": "0000", "class1": "0001"},
    "BraTS2021": {"edema": "0002"},
    "Brain_PTM": {"tract": "0000"},
  }
  (root / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps(mapping))
  if with_index:
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
  return root


@pytest.mark.parametrize("with_index", [True, False])
def test_release_layout(tmp_path, with_index):
  src = SamMed2DSource(_release(tmp_path, with_index))
  assert src.layout == "release"
  samples = {s.image_id: s for s in src}
  a = samples["ct_00--AbdomenCT1K--Case_00220--x_0359"]
  assert a.case_id == "ct_00--AbdomenCT1K--Case_00220" and a.modality == "ct"
  assert sorted(i.label for i in a.instances) == ["kidney", "kidney", "liver"]  # class 0000 is real
  liver = next(i for i in a.instances if i.label == "liver")
  assert mask_extents(liver.mask) == (5, 8, 20, 30)
  b = samples["x_ray--covid_19_ct_cxr--16660_5_1--2d_none"]
  assert b.modality == "x" and b.image.ndim == 2
  assert samples["mr_t1--BraTS2021--BraTS2021_00218--z_0141"].image.ndim == 3
  assert "ct_00--Brain_PTM--p1--z_0001" not in samples
  c = src.skips.counts
  assert c["union_* aggregate mask"] == 1 and c["class id not in mapping"] == 1
  assert c["generic class name"] == 1 and c["mask covers nearly the whole image"] == 1
  assert c["blank or binary image"] == 1
  if with_index:
    assert c["mask name does not match image"] == 1
  out = tmp_path / "out"
  m = generate_dataset(src, out, test_fraction=0.0, write_stats=False)
  assert m["counts"]["images"]["train"] == {"ct": 1, "mr": 1, "x": 1}
  text = (out / "train.json").read_text()
  assert "mr_t1--BraTS2021--BraTS2021_00218--z_0141" in text


def test_release_requires_class_mapping(tmp_path):
  root = _release(tmp_path)
  (root / "SAMed2D_v1_class_mapping_id.json").unlink()
  with pytest.raises(FileNotFoundError, match="class_mapping"):
    SamMed2DSource(root)


def test_png_folder_masks_and_label_maps(tmp_path):
  root = tmp_path / "mydata"
  _png(root / "images" / "patient7_031.png", _img(seed=5))
  _png(root / "masks" / "patient7_031" / "hip_left_000.png", _mask())
  _png(root / "masks" / "patient7_031" / "hip_left_001.png", _mask(box=(40, 20, 50, 30)))
  _png(root / "masks" / "patient7_031" / "bad.png", _mask(10, 10, (1, 1, 2, 2)))
  _png(root / "images" / "patient8_002.png", _img(seed=6))
  lab = np.zeros((40, 60), np.uint8)
  lab[2:10, 3:20] = 1
  lab[20:30, 30:50] = 2
  lab[35:38, 1:4] = 7
  _png(root / "labels" / "patient8_002.png", lab)
  (root / "classes.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "spleen"}))
  (root / "images" / "._patient8_002.png").write_bytes(b"junk")
  with pytest.raises(ValueError, match="unknown modality"):
    PngFolderSource(root, modality="xyz")
  src = PngFolderSource(root, modality="mr")
  samples = list(src)
  assert [s.image_id for s in samples] == ["mr_00--mydata--patient7_031--2d_none",
                                           "mr_00--mydata--patient8_002--2d_none"]
  assert samples[0].case_id == "mr_00--mydata--patient7"
  assert [i.label for i in samples[0].instances] == ["hip_left", "hip_left"]
  assert sorted(i.label for i in samples[1].instances) == ["liver", "spleen"]
  assert mask_extents(samples[1].instances[0].mask) == (3, 2, 19, 9)
  assert src.skips.counts == {"mask size mismatch": 1, "label value not in classes.json": 1}
  src2 = PngFolderSource(root)  # no modality anywhere: counted, not raised
  assert list(src2) == [] and src2.skips.counts["no modality"] == 2
