"""Med-GRIT TFDS builder (both configs, bad-record skipping, phantom fallback) and the TF-free `tfds build`
console script, read back with `tfds.data_source` exactly as training reads it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from bird_jax.data.med_grit import Builder, MedGritConfig
from bird_jax.data.tiny_dataset import TASKS, write_tiny_med_grit

TFDS_BIN = Path(sys.executable).parent / "tfds"
# python -c REPORT_TF_AT_EXIT SCRIPT ARGS...: runs SCRIPT as __main__ and, however it exits, prints on stderr whether
# TensorFlow got imported in that process.
REPORT_TF_AT_EXIT = """import atexit, runpy, sys
atexit.register(lambda: print(f"tensorflow imported: {'tensorflow' in sys.modules}", file=sys.stderr, flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _bad_records(root: Path) -> list:
  """One of each failure the builder must survive; (root.parent / outside.png) exists on purpose."""
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root.parent / "outside.png")
  (root / "images" / "ct_00--Bad--corrupt--z_0000.png").write_bytes(b"not a png")
  q = "Picture 1: <img>{}</img>\nWhere is the liver?"
  return [
    "not an object",                                                              # malformed
    {"id": "ct_00--Bad--a--z", "conversations": "hello"},                          # malformed
    {"id": "ct_00--Bad--b--z", "conversations": [[q.format("images/x.png")]]},    # malformed
    {"id": "ct_00--Bad--c--z", "conversations": []},                               # malformed
    {"id": "ct_00--Bad--d--z", "conversations": [["Where is it?", "here"]]},       # malformed (no <img>)
    {"id": "ct_00--Bad--e--z", "conversations": [[q.format("images/x.png"), ""]]},  # malformed (empty)
    {"id": "ct_00--Bad--f--z", "conversations": [[q.format("../outside.png"), "a"]]},  # unsafe_path
    {"id": "ct_00--Bad--g--z",
     "conversations": [[q.format(str(root.parent / "outside.png")), "a"]]},       # unsafe_path (absolute)
    {"id": "../../etc", "conversations": [[q.format("images/x.png"), "a"]]},      # unsafe_path (id)
    {"id": "ct_00--Bad--h--z", "conversations": [[q.format("images/nope.png"), "a"]]},  # missing_image
    {"id": "ct_00--Bad--corrupt--z_0000",
     "conversations": [[q.format("images/ct_00--Bad--corrupt--z_0000.png"), "a"]]},  # unreadable_image
    {"id": "ct_00--Bad--i--z",
     "conversations": [[q.format("images/x.png"), "<ref>liver</ref><box>(abc,def),(ghi,jkl)</box>"]]},  # bad_box
    {"id": "ct_00--Bad--j--z", "conversations": [[q.format("images/x.png"), "<box>(10,20),(1500,30)</box>"]]},
    {"id": "ct_00--Bad--k--z",
     "conversations": [[q.format("images/x.png") + " <box>(1,2),(3)</box>", "kidney"]]},  # bad_box (user turn)
  ]


BAD_COUNTS = {"malformed": 6, "bad_box": 3, "unsafe_path": 3, "missing_image": 1, "unreadable_image": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("medgrit") / "data"
  written = write_tiny_med_grit(root, n_train=6, n_test_per_task=2)
  train = json.loads((root / "train.json").read_text())
  (root / "train.json").write_text(json.dumps(train + _bad_records(root)))
  return root, written


def _by_id(source) -> dict[str, dict]:
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def test_generated_config_builds_skips_and_reads_back(folder, tmp_path, caplog):
  root, written = folder
  builder = Builder(config="generated", data_dir=tmp_path, file_format="array_record")
  with caplog.at_level(logging.WARNING):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  assert builder.info.splits["train"].num_examples == 6
  assert builder.info.splits["test"].num_examples == 2 * len(TASKS)
  assert dict(builder.skip_counts["train"]) == BAD_COUNTS and not builder.skip_counts["test"]
  skip_lines = [r.getMessage() for r in caplog.records if "med_grit: skip train.json" in r.getMessage()]
  assert len(skip_lines) == sum(BAD_COUNTS.values()) and all("\n" not in m for m in skip_lines)
  assert any("../outside.png" in m and "inside the dataset folder" in m for m in skip_lines)
  # each names the file, the record's index and id, and what is wrong
  assert any(m.startswith("med_grit: skip train.json[") and "(id=ct_00--Bad--i--z)" in m
             and "<box>(abc,def),(ghi,jkl)</box> is not (x1,y1),(x2,y2) with integers in [0, 1000)" in m
             for m in skip_lines)
  assert any("(id=ct_00--Bad--j--z)" in m and "(1500,30)" in m for m in skip_lines)
  assert any("(id=ct_00--Bad--b--z)" in m and "is not a [user, assistant] pair" in m for m in skip_lines)

  train = tfds.data_source("med_grit/generated", split="train", data_dir=tmp_path, download=False)
  got = _by_id(train)
  assert set(got) == {r["id"] for r in written["train"]}
  for rec in written["train"]:
    ex = got[rec["id"]]
    assert ex["modality"].decode() == rec["id"].split("_", 1)[0]
    assert ex["task"].decode() == rec["task"] and ex["case_id"].decode() == rec["case_id"]
    assert [u.decode() for u in ex["conversations"]["user"]] == [u for u, _ in rec["conversations"]]
    assert [a.decode() for a in ex["conversations"]["assistant"]] == [a for _, a in rec["conversations"]]
    original = np.asarray(Image.open(root / "images" / f"{rec['id']}.png"))
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (40, 48, 3)
    if original.ndim == 2:  # grayscale slices are replicated into RGB, pixel values unchanged
      assert all(np.array_equal(ex["image"][..., c], original) for c in range(3))
    else:
      assert np.array_equal(ex["image"], original)

  test = tfds.data_source("med_grit/generated", split="test", data_dir=tmp_path, download=False)
  tasks = sorted(test[i]["task"].decode() for i in range(len(test)))
  assert tasks == sorted(list(TASKS) * 2)
  assert all(len(test[i]["conversations"]["user"]) == 1 for i in range(len(test)))


def test_a_malformed_json_lines_record_is_one_line_naming_file_and_line(tmp_path):
  from bird_jax.data.med_grit.records import UnreadableFile, read_records

  good = json.dumps({"id": "ct_00--A--b--c", "conversations": [["q", "a"]]})
  path = tmp_path / "train.jsonl"
  path.write_text(f"{good}\n\n{good}\n{{\"id\": broken\n")
  with pytest.raises(UnreadableFile) as e:
    read_records(path)
  assert str(e.value) == (f"{path}: cannot read records (line 4, record 2: Expecting value at column 8); "
                          "fix or remove the file")
  (tmp_path / "train.json").write_text('{"id": "x"}')
  with pytest.raises(UnreadableFile, match=r"train.json: cannot read records \(expected a JSON list of records, "
                                           r"got a dict\); fix or remove the file"):
    read_records(tmp_path / "train.json")


def test_official_config_layout(tmp_path):
  manual = tmp_path / "release"
  (manual / "SAMed2D_v1" / "images").mkdir(parents=True)
  (manual / "images").mkdir()
  rng = np.random.default_rng(0)
  ids = ["ct_00--AbdomenCT1K--Case_00220--x_0359", "x_ray--Chest_Image_Pneum--abc123--2d_none",
         "dermoscopy_00--isic2018_task1--ISIC_0014156--2d_none"]
  gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
  rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  Image.fromarray(gray).save(manual / "SAMed2D_v1" / "images" / f"{ids[0]}.png")
  Image.fromarray(rgb).save(manual / "images" / f"{ids[1]}.png")
  # ids[2] has no image anywhere -> skipped.

  def rec(i: str, q: str, a: str) -> dict:
    user = f"Picture 1: <img>/root/paddlejob/SAMed2D_v1/images/{i}.png</img>\n{q}"
    return {"id": i, "conversations": [[user, a]]}

  (manual / "0301_CombinedAll_7.5w_train1_chatlm_img_coord2.json").write_text(json.dumps(
    [rec(ids[0], "Where is the liver?", "<ref>liver</ref><box>(1,2),(30,40)</box>"),
     rec(ids[1], "What is at <box>(1,2),(3,4)</box>?", "left lung"), rec(ids[2], "q", "a")]))
  (manual / "0301_CombinedAll_7.5w_test_chatlm_VG_img_coord_OneConv.json").write_text(json.dumps(
    [rec(ids[0], "Where is the spleen?", "<ref>spleen</ref><box>(5,6),(7,8)</box>")]))
  (manual / "0301_CombinedAll_7.5w_test_chatlm_MII_img_coord_OneConv.json").write_text(json.dumps(
    [rec(ids[1], "What can you interpret from the overall image?", "A chest X-ray.")]))

  builder = Builder(config="official", data_dir=tmp_path / "tfds", file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  assert dict(builder.skip_counts["train"]) == {"missing_image": 1}
  train = _by_id(tfds.data_source("med_grit/official", split="train", data_dir=tmp_path / "tfds"))
  assert set(train) == set(ids[:2])
  ct = train[ids[0]]
  assert ct["modality"].decode() == "ct" and train[ids[1]]["modality"].decode() == "x"
  assert ct["task"].decode() == "mixed" and ct["case_id"].decode() == "AbdomenCT1K--Case_00220"
  # The authors' absolute path is replaced by a dataset-relative one.
  assert ct["conversations"]["user"][0].decode().startswith(f"Picture 1: <img>images/{ids[0]}.png</img>\n")
  test = tfds.data_source("med_grit/official", split="test", data_dir=tmp_path / "tfds")
  assert sorted((test[i]["id"].decode(), test[i]["task"].decode()) for i in range(len(test))) == \
    sorted([(ids[0], "VG"), (ids[1], "MII")])


def test_image_prefix_without_the_space_reads_as_with_it(tmp_path):
  """`Picture 1: <img>` (BiRD's evaluation script, data_gen, the pipeline, the API) and `Picture 1:<img>` give the
  same stored turn, in either layout."""
  from bird_jax.data.med_grit.records import parse_record

  image_id = "ct_00--AbdomenCT1K--Case_00220--x_0359"
  (tmp_path / "images").mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / f"{image_id}.png")
  turn = "<img>{path}</img>\nWhere is the liver?"
  answer = "<ref>liver</ref><box>(1,2),(30,40)</box>"
  paths = {"official": f"/root/SAMed2D_v1/images/{image_id}.png", "generated": f"images/{image_id}.png"}
  for layout, path in paths.items():
    read = [parse_record({"id": image_id, "conversations": [[prefix + turn.format(path=path), answer]]},
                         root=tmp_path, layout=layout, default_task="VG", image_dirs=[tmp_path / "images"])
            for prefix in ("Picture 1: ", "Picture 1:")]
    assert read[0]["conversations"] == read[1]["conversations"]
    assert read[1]["conversations"][0][0] == f"Picture 1: <img>images/{image_id}.png</img>\nWhere is the liver?"


def test_phantom_fallback_without_manual_dir(tmp_path):
  pytest.importorskip("data_gen.pipeline")
  cfg = MedGritConfig(name="phantom_tiny", layout="generated", phantom_num_cases=3, phantom_image_size=32)
  builder = Builder(config=cfg, data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples > 0 and builder.info.splits["test"].num_examples > 0
  src = builder.as_data_source(split="train")
  ex = src[0]
  assert ex["image"].shape == (32, 32, 3) and "--Phantom--" in ex["id"].decode()
  assert ex["conversations"]["user"][0].decode().startswith("Picture 1: <img>images/")


def test_tfds_console_script_builds_without_tensorflow(folder, tmp_path):
  root, written = folder
  out = tmp_path / "tfds"
  # The console script itself, run by a wrapper that reports at exit whether the CLI's process imported TensorFlow.
  cmd = [sys.executable, "-c", REPORT_TF_AT_EXIT, str(TFDS_BIN), "build", "med_grit", "--data_dir", str(out),
         "--manual_dir", str(root)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  n_bad = sum(BAD_COUNTS.values())
  assert f"skipped {n_bad} of {n_bad + len(written['train'])} records" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == "tensorflow imported: False"
  prepared = out / "med_grit" / "generated" / "1.0.0"
  assert sorted(p.name for p in prepared.glob("*.array_record*")) == [
    "med_grit-test.array_record-00000-of-00001", "med_grit-train.array_record-00000-of-00001"]
  train = tfds.data_source("med_grit", split="train", data_dir=out)
  assert sorted(_by_id(train)) == sorted(r["id"] for r in written["train"])

  bad = subprocess.run([str(TFDS_BIN), "build", "med_grit", "--config", "official", "--data_dir", str(out)],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "needs --manual_dir" in bad.stderr and "Traceback" not in bad.stderr
