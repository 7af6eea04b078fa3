"""End to end: phantom -> dataset folder: record format, box truth, split, determinism, idempotence, skips,
CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen.boxes import denormalize_box, label_to_name, mask_to_pixel_boxes, parse_boxes
from data_gen.pipeline import generate_dataset
from data_gen.sources.base import MODALITIES, Instance, Sample, SkipReport, modality_from_id
from data_gen.sources.phantom import PhantomSource
from data_gen.split import split_cases
from data_gen.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
PREFIX_RE = re.compile(r"^Picture 1: <img>images/([^<>]+)\.png</img>\n(?!\n)")
BOX = r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>"
VG_ANSWER_RE = re.compile(rf"^<ref>([a-z0-9][a-z0-9 \-]*)</ref>(?:{BOX})+$")
RO_QUESTION_RE = re.compile(rf"^.*{BOX}.*$", re.S)


def _tiny_source(seed: int = 0) -> PhantomSource:
  return PhantomSource(num_cases=5, image_size=64, seed=seed, slices_per_case=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
  out = tmp_path_factory.mktemp("dg") / "phantom"
  manifest = generate_dataset(_tiny_source(), out, seed=0, test_fraction=0.4, max_turns=3)
  return out, manifest


def _load(out: Path, name: str) -> list[dict]:
  return json.loads((out / name).read_text())


def test_folder_layout_and_manifest(dataset):
  out, m = dataset
  names = {p.name for p in out.iterdir()}
  assert {"images", "train.json", "manifest.json", "stats.md", "box_sizes.png", "turns.png"} <= names
  assert {f"test_{t}.json" for t in TASKS} <= names
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp folder gone
  assert m == json.loads((out / "manifest.json").read_text())
  assert m["source"] == "phantom" and m["seed"] == 0 and m["version"]
  n_images = sum(sum(v.values()) for v in m["counts"]["images"].values())
  assert n_images == len(list((out / "images").glob("*.png"))) == 5 * (3 + 3 + 1)
  for t in TASKS:
    assert sum(m["counts"]["qa"]["test"][t].values()) == sum(m["counts"]["images"]["test"].values())


def test_records_match_contract(dataset):
  out, _ = dataset
  files = ["train.json"] + [f"test_{t}.json" for t in TASKS]
  for name in files:
    recs = _load(out, name)
    assert recs
    for r in recs:
      assert set(r) == {"id", "conversations", "task", "case_id"}
      mod = modality_from_id(r["id"])
      assert mod in MODALITIES
      conv = r["conversations"]
      assert isinstance(conv, list) and all(isinstance(t, list) and len(t) == 2 for t in conv)
      m = PREFIX_RE.match(conv[0][0])
      assert m and m.group(1) == r["id"], conv[0][0]
      assert (out / "images" / f"{r['id']}.png").is_file()
      assert not any("<img>" in q for q, _ in conv[1:]) and not any("<img>" in a for _, a in conv)
      for q, a in conv:
        for box in parse_boxes(q) + parse_boxes(a):
          assert all(0 <= v < 1000 for v in box) and box[0] < box[2] and box[1] < box[3]
        # every box-looking span is well-formed (no spaces, no floats)
        assert q.count("<box>") == len(parse_boxes(q)) and a.count("<box>") == len(parse_boxes(a))
      if name != "train.json":
        assert len(conv) == 1 and r["task"] == name[5:-5]
  for r in _load(out, "test_VG.json"):
    q, a = r["conversations"][0]
    assert VG_ANSWER_RE.match(a), a
    name = VG_ANSWER_RE.match(a).group(1)
    assert name in q
  for r in _load(out, "test_RO.json"):
    q, a = r["conversations"][0]
    assert RO_QUESTION_RE.match(q) and re.fullmatch(r"[a-z0-9][a-z0-9 \-]*", a), (q, a)
  for r in _load(out, "test_GC.json"):
    q, a = r["conversations"][0]
    assert len(parse_boxes(q)) == 1 and "<box>" not in a and a.endswith(".")
  for r in _load(out, "test_MII.json"):
    q, a = r["conversations"][0]
    assert "<box>" not in q + a and len(a.split(". ")) >= 2
  train = _load(out, "train.json")
  assert max(len(r["conversations"]) for r in train) <= 3
  assert {r["task"] for r in train} <= set(TASKS) | {"mixed"}
  assert "mixed" in {r["task"] for r in train}


def test_boxes_in_answers_equal_mask_extents(dataset):
  out, _ = dataset
  truth: dict[str, dict[str, list[tuple]]] = {}
  for s in _tiny_source():
    per: dict[str, list[tuple]] = {}
    for inst in s.instances:
      per.setdefault(label_to_name(inst.label), []).extend(mask_to_pixel_boxes(inst.mask))
    truth[s.image_id] = per
  checked = 0
  for name in ["train.json", "test_VG.json", "test_RO.json"]:
    for r in _load(out, name):
      img = np.asarray(Image.open(out / "images" / f"{r['id']}.png"))
      h, w = img.shape[:2]
      for q, a in r["conversations"]:
        if a.startswith("<ref>"):  # VG: all boxes of that class, in reading order
          cls = re.match(r"<ref>(.*?)</ref>", a).group(1)
          got = [denormalize_box(b, w, h) for b in parse_boxes(a)]
          assert sorted(got) == sorted(truth[r["id"]][cls])
          checked += 1
        elif "<box>" in q and "<box>" not in a and len(a.split()) <= 4:  # RO: the box's class name
          (b,) = parse_boxes(q)
          assert denormalize_box(b, w, h) in truth[r["id"]][a]
          checked += 1
  assert checked > 20


def test_no_training_turn_is_answered_by_an_earlier_one(tmp_path):
  # Test questions are single turns: a VG box or RO name already said earlier in the conversation would be
  # learnt as a copy. Each structure is the subject of at most one VG/RO/GC turn per conversation.
  out = tmp_path / "out"
  generate_dataset(PhantomSource(num_cases=8, image_size=64, seed=3), out, seed=0, test_fraction=0.25,
                   max_turns=5, task_weights={"VG": 1.0, "RO": 1.0, "GC": 1.0}, write_stats=False)
  multi = 0
  for r in _load(out, "train.json"):
    said, subjects = "", []
    for q, a in r["conversations"]:
      if a.startswith("<ref>"):
        subjects.append(re.match(r"<ref>(.*?)</ref>", a).group(1))
        assert a.split("<box>", 1)[1] not in said, r
      elif "<box>" in q:
        (box,) = re.findall(r"<box>.*?</box>", q)
        subjects.append(a if len(a.split()) <= 4 else re.search(r"contains the (.*?),", a).group(1))  # RO | GC
        assert box not in said, r
      said += q + a
    assert len(subjects) == len(set(subjects)), r
    multi += len(subjects) > 1
  assert multi > 5  # the rule leaves multi-turn conversations about different structures


def test_saved_images_are_the_source_arrays(dataset):
  out, _ = dataset
  for s in list(_tiny_source())[:8]:
    saved = np.asarray(Image.open(out / "images" / f"{s.image_id}.png"))
    np.testing.assert_array_equal(saved, s.image)


def test_split_disjoint_by_case(dataset):
  out, m = dataset
  train_cases = {r["case_id"] for r in _load(out, "train.json")}
  test_cases = {r["case_id"] for t in TASKS for r in _load(out, f"test_{t}.json")}
  assert train_cases and test_cases and not (train_cases & test_cases)
  for r in _load(out, "train.json"):
    assert r["id"].startswith(r["case_id"] + "--")
  # every modality has test cases (stratified)
  assert set(m["counts"]["cases"]["test"]) == {"ct", "mr", "x"}


def test_split_cases_rules():
  cases = [(f"ct_00--D--c{i}", "ct") for i in range(10)] + [("x_ray--D--only", "x")]
  tr, te = split_cases(cases + cases[:3], 0.2, seed=5)  # duplicates (slices) are fine
  assert len(te) == 2 and "x_ray--D--only" in tr and not tr & te and len(tr | te) == 11
  assert split_cases(list(reversed(cases)), 0.2, seed=5) == (tr, te)  # order-independent
  assert split_cases(cases, 0.2, seed=6) != (tr, te)
  with pytest.raises(ValueError, match="unique per modality"):
    split_cases([("a", "ct"), ("a", "mr")], 0.2, 0)


def test_deterministic_and_worker_independent(tmp_path, dataset):
  out0, _ = dataset
  out1 = tmp_path / "again"
  generate_dataset(_tiny_source(), out1, seed=0, test_fraction=0.4, max_turns=3, workers=2)
  for name in ["train.json"] + [f"test_{t}.json" for t in TASKS]:
    assert (out0 / name).read_bytes() == (out1 / name).read_bytes(), name
  out2 = tmp_path / "seed1"
  generate_dataset(_tiny_source(), out2, seed=1, test_fraction=0.4, max_turns=3, write_stats=False)
  assert (out0 / "train.json").read_bytes() != (out2 / "train.json").read_bytes()


def test_idempotent_and_overwrite(tmp_path):
  out = tmp_path / "ds"
  m1 = generate_dataset(_tiny_source(), out, limit=10, write_stats=False)
  stamp = (out / "manifest.json").stat().st_mtime_ns
  m2 = generate_dataset(_tiny_source(), out, limit=10, write_stats=False)
  assert m2 == m1 and (out / "manifest.json").stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match="other parameters"):
    generate_dataset(_tiny_source(), out, limit=10, seed=9, write_stats=False)
  m3 = generate_dataset(_tiny_source(), out, limit=10, seed=9, overwrite=True, write_stats=False)
  assert m3["seed"] == 9 and json.loads((out / "manifest.json").read_text())["seed"] == 9
  assert len(list((out / "images").glob("*.png"))) == 10
  junk = tmp_path / "junk"
  junk.mkdir()
  with pytest.raises(FileExistsError, match="no manifest.json"):
    generate_dataset(_tiny_source(), junk)


class _Exploding:
  name = "exploding"

  def __iter__(self):
    yield from list(_tiny_source())[:3]
    raise RuntimeError("disk went away")


def test_failed_run_leaves_nothing_behind(tmp_path):
  stale = tmp_path / ".ds.tmp-999999999-deadbeef"  # from a killed run (no such pid)
  (stale / "images").mkdir(parents=True)
  with pytest.raises(RuntimeError, match="disk went away"):
    generate_dataset(_Exploding(), tmp_path / "ds")
  assert list(tmp_path.iterdir()) == []


class _ListSource:
  """A source over a fixed list of samples, with a skip report of its own (like a file-based source)."""

  name = "list"

  def __init__(self, samples):
    self.samples = samples
    self.skips = SkipReport()
    self.skips.add("file.png", "unreadable image", "truncated PNG")

  def __iter__(self):
    return iter(self.samples)


def _good(case: int, sl: int, modality: str = "ct") -> Sample:
  img = np.full((40, 50), 30, np.uint8)
  img[5:15, 10:30] = 200
  m = np.zeros((40, 50), bool)
  m[5:15, 10:30] = True
  pre = {"ct": "ct_00", "x": "x_ray"}[modality]
  return Sample(f"{pre}--T--c{case}--z_{sl:04d}", img, [Instance("liver", m)], f"{pre}--T--c{case}", modality,
                "list")


def test_bad_inputs_are_counted_not_fatal(tmp_path):
  good = [_good(c, s) for c in range(4) for s in range(2)] + [_good(9, 0, "x")]
  m_ok = np.zeros((40, 50), bool)
  m_ok[1:9, 1:9] = True
  bad = [
    _good(0, 0),  # duplicate id
    Sample("ct_00--T--c5--z_0000", np.full((40, 50), 7, np.uint8), [Instance("liver", m_ok)], "c5", "ct",
           "l"),
    Sample("ct_00--T--c6--z_0000", np.zeros((40, 50), np.float32), [Instance("liver", m_ok)], "c6", "ct",
           "l"),
    Sample("ct_00--T--c7--z_0000", _good(0, 0).image, [Instance("liver", np.zeros((40, 50), bool))], "c7",
           "ct", "l"),
    Sample("ct_00--T--c8--z_0000", _good(0, 0).image, [Instance("liver", np.ones((20, 20), bool))], "c8",
           "ct", "l"),
    Sample("../evil", _good(0, 0).image, [Instance("liver", m_ok)], "c9", "ct", "l"),
    Sample("mr_00--T--c10--z_0000", _good(0, 0).image, [Instance("liver", m_ok)], "c10", "ct", "l"),
    Sample("ct_00--T--c11--z_0000", _good(0, 0).image, [Instance("liver", m_ok)], "c11", "xyz", "l"),
    Sample("ct_00--T--c12--z_0000", _good(0, 0).image, [Instance("", m_ok), Instance("spleen", m_ok)],
           "c12", "ct", "l"),
    "not a sample",
  ]
  m = generate_dataset(_ListSource(good + bad), tmp_path / "ds", write_stats=False)
  skipped = m["skipped"]["counts"]
  assert skipped["duplicate image id"] == 1
  assert skipped["blank image"] == 1
  assert skipped["bad image array"] == 1
  assert skipped["instance: empty mask"] == 1
  assert skipped["instance: mask size mismatch"] == 1
  assert skipped["unsafe image id"] == 1
  assert skipped["id prefix does not give the modality"] == 1
  assert skipped["unknown modality"] == 1
  assert skipped["instance: empty label"] == 1
  assert skipped["not a Sample"] == 1
  assert skipped["unreadable image"] == 1  # merged from the source's own report
  assert skipped["no usable instances"] == 2  # c7 and c8
  images = {p.stem for p in (tmp_path / "ds" / "images").glob("*.png")}
  assert len(images) == 10 and "ct_00--T--c12--z_0000" in images
  assert any("c8" in e for e in m["skipped"]["examples"]["instance: mask size mismatch"])
  with pytest.raises(ValueError, match="no usable samples"):
    generate_dataset(_ListSource(bad[1:3]), tmp_path / "none", write_stats=False)
  assert not (tmp_path / "none").exists()


def test_cli_end_to_end(tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "data_gen", "--source", "phantom", "--out", str(out), "--num-cases", "3",
         "--image-size", "48", "--slices-per-case", "2", "--objects", "1,1", "--balance-modalities", "--seed", "2",
         "--workers", "1"]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "train" in r.stdout and "| VG |" in r.stdout
  m = json.loads((out / "manifest.json").read_text())
  assert m["params"]["source_params"]["image_size"] == 48 and m["seed"] == 2
  assert (m["params"]["source_params"]["min_objects"], m["params"]["source_params"]["max_objects"]) == (1, 1)
  train = json.loads((out / "train.json").read_text())
  answers = [a for r in train for _, a in r["conversations"]]
  assert any("<box>" in a for a in answers) and all(a.count("<box>") <= 1 for a in answers)  # one structure each
  # --balance-modalities: 2 slices per ct/mr case, so x-ray gets 2 x 3 cases of 1 image.
  assert m["params"]["source_params"]["balance_modalities"] is True
  images = Counter()
  for split in m["counts"]["images"].values():
    images.update(split)
  assert images == {"ct": 6, "mr": 6, "x": 6}
  r2 = subprocess.run(cmd[:-2] + ["--seed", "3"], capture_output=True, text=True, cwd=REPO, env=env,
                      timeout=120)
  assert r2.returncode == 2 and "overwrite" in r2.stderr and len(r2.stderr.strip().splitlines()) == 1
  r3 = subprocess.run([sys.executable, "-m", "data_gen", "stats", str(out)], capture_output=True, text=True,
                      cwd=REPO, env=env, timeout=120)
  assert r3.returncode == 0 and "| MII |" in r3.stdout


def test_cli_rejects_a_bad_objects_range(tmp_path, capsys):
  from data_gen.__main__ import main as cli_main

  for bad, why in (("3", "--objects '3'.*MIN,MAX"), ("3,2", "min_objects <= max_objects")):
    assert cli_main(["--source", "phantom", "--out", str(tmp_path / "o"), "--objects", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(why, err), err
  assert not (tmp_path / "o").exists()


def test_cli_palette_reaches_the_phantom_and_its_manifest(tmp_path, capsys):
  from data_gen.__main__ import main as cli_main

  out = tmp_path / "hue"
  assert cli_main(["--source", "phantom", "--out", str(out), "--num-cases", "2", "--image-size", "48",
                   "--slices-per-case", "1", "--palette", "hue"]) == 0
  assert json.loads((out / "manifest.json").read_text())["params"]["source_params"]["palette"] == "hue"
  png = next((out / "images").glob("*.png"))
  assert np.asarray(Image.open(png)).ndim == 3  # colour images from a grey modality
  capsys.readouterr()  # the first run's progress bar
  assert cli_main(["--source", "phantom", "--out", str(tmp_path / "bad"), "--palette", "rainbow"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "palette 'rainbow' is unknown" in err, err


def test_cli_size_reaches_the_phantom_and_its_manifest(tmp_path, capsys):
  from data_gen.__main__ import main as cli_main

  out = tmp_path / "big"
  assert cli_main(["--source", "phantom", "--out", str(out), "--num-cases", "2", "--image-size", "48",
                   "--slices-per-case", "1", "--size", "0.25,0.5"]) == 0
  params = json.loads((out / "manifest.json").read_text())["params"]["source_params"]
  assert (params["min_frac"], params["max_frac"]) == (0.25, 0.5)
  capsys.readouterr()
  for bad, why in (("big", "--size 'big'.*MIN,MAX"), ("0.5,0.25", "need 0.02 <= MIN <= MAX")):
    assert cli_main(["--source", "phantom", "--out", str(tmp_path / "bad"), "--size", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(why, err), err
