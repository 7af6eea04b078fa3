"""`python -m bird_jax.eval --predictions=...` end to end, the trainer-facing API, and the HTML gallery."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bird_jax import eval as E
from bird_jax import metrics as M
from bird_jax import report

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DEMO_IMAGES = FIXTURES / "sam_med2d_demo" / "images"

CT = "ct_00--Phantom--case_0001--z_0003"
CT2 = "ct_00--Phantom--case_0001--z_0004"
MR = "mr_00--Phantom--case_0002--z_0001"
XRAY = "x_ray--Phantom--case_0003--2d_none"


def box(x1, y1, x2, y2) -> str:
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def official_record(idx: int, name: str, question: str, annotation: str, response: str) -> dict:
  # What the original infer.py writes: id = index in the test file, image = basename of the PNG.
  q = f"Picture 1: <img>/data/{name}.png</img>\n{question}"
  return {"id": idx, "image": f"{name}.png", "question": q, "annotation": annotation, "response": response}


A = box(100, 100, 300, 300)
VG_RECORDS = [
  official_record(0, CT, "Where is the liver?", f"<ref>liver</ref>{A}", f"<ref>liver</ref>{A}<|im_end|>\n"),
  official_record(1, CT2, "Where is the spleen?", f"<ref>spleen</ref>{A}", box(100, 100, 300, 200)),  # IoU .5
  official_record(2, MR, "Where is the brain?", f"<ref>brain</ref>{A}{box(600, 600, 700, 700)}",
                  "It is at (100,100),(300,300)<|endoftext|>"),
  official_record(3, XRAY, "Where is the lung?", f"<ref>lung</ref>{A}", "<box>(1,2),(3)</box>"),
]
RO_RECORDS = [
  {**official_record(0, CT, f"What is at {A}?", "liver", "deliver<|endoftext|>"), "task": "RO"},
  {**official_record(1, CT2, f"What is at {A}?", "left kidney", "kidney"), "task": "RO"},
  {**official_record(2, XRAY, f"What is at {A}?", "lung", "Lung.<|im_end|>\n"), "task": "RO"},
]
GC_RECORDS = [
  official_record(0, CT, f"Describe {A}.", "This region contains the liver.", "This region has the liver."),
  official_record(1, CT2, f"Describe {A}.", "The left kidney filters blood.", "A kidney filters blood."),
  official_record(2, MR, f"Describe {A}.", "The brain stem links brain and cord.", "The brain stem."),
]


def test_write_read_roundtrip_and_errors(tmp_path):
  p = E.write_predictions_jsonl(tmp_path / "sub" / "p.jsonl", [{"response": "r", "annotation": "a", "id": 3,
                                                                 "extra": 1}])
  first = p.read_text().splitlines()[0]
  assert list(json.loads(first)) == ["id", "annotation", "response", "extra"]
  assert E.read_predictions_jsonl(p) == [{"id": 3, "annotation": "a", "response": "r", "extra": 1}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1, "annotation": "a", "response": "r"}\n\n{oops\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
    E.read_predictions_jsonl(bad)
  bad.write_text('{"id": 1, "response": "r"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) annotation"):
    E.read_predictions_jsonl(bad)


def test_task_inference():
  official_name = "0301_CombinedAll_7.5w_test_chatlm_VG_img_coord_pred_bfloat16_top03_inferv3.jsonl"
  assert E.task_from_filename(official_name) == "VG"
  assert E.task_from_filename("out/test_MII.jsonl") == "MII"
  assert E.task_from_filename("preds-GC.jsonl") == "GC"
  assert E.task_from_filename("groundtruth.jsonl") is None  # "RO" inside a word is not a tag
  recs = [{"id": CT, "annotation": "a", "response": "a", "task": "RO"}, {"id": CT, "annotation": "a",
                                                                       "response": "a"}]
  groups = E.split_by_task(recs, None, "preds_VG.jsonl")
  assert {k: len(v) for k, v in groups.items()} == {"RO": 1, "VG": 1}
  with pytest.raises(ValueError, match="contradicts --task VG"):
    E.split_by_task(recs, "VG", "x.jsonl")
  with pytest.raises(ValueError, match="cannot tell the task"):
    E.split_by_task(recs[1:], None, "x.jsonl")


def test_roc_is_read_as_ro(tmp_path):
  """The paper and the official records call the task ROC: --task ROC, a `task` field ROC and a _ROC_ file
  tag all mean RO."""
  assert E.task_from_filename("test_ROC_pred.jsonl") == "RO"
  assert E.normalize_task("roc") == "RO" and E.normalize_task("VG") == "VG"
  recs = [dict(r, task="ROC") for r in RO_RECORDS]
  assert list(E.split_by_task(recs, "ROC", "x.jsonl")) == ["RO"]
  assert E.score_predictions(RO_RECORDS, "ROC") == E.score_predictions(RO_RECORDS, "RO")
  assert E.build_parser().parse_args(["--task", "ROC"]).task == "RO"
  preds = E.write_predictions_jsonl(tmp_path / "preds.jsonl", [{k: v for k, v in r.items() if k != "task"}
                                                              for r in RO_RECORDS])
  out = tmp_path / "scores"
  assert E.main([f"--predictions={preds}", "--task", "ROC", f"--out={out}"]) == 0
  assert list(json.loads((out / "metrics.json").read_text())["results"]) == ["RO"]


def test_score_predictions_and_table_in_process():
  r = E.score_predictions(VG_RECORDS, "VG")
  per = r["per_modality"]
  assert per["ct"] == {"n": 2, "recall@0.5": 0.5}        # exact 0.5 IoU is a miss
  assert per["mr"] == {"n": 2, "recall@0.5": 0.5}        # fallback hit, second reference box missed
  assert per["x"] == {"n": 1, "recall@0.5": 0.0}         # parse error -> IoU 0
  assert r["mean_official"]["recall@0.5"] == pytest.approx(1.0 / 8)
  assert r["mean_nonempty"]["recall@0.5"] == pytest.approx(1.0 / 3)
  table = E.format_table(r)
  assert re.search(r"^ct\s+2\s+0\.5000$", table, re.M)
  assert re.search(r"^pet\s+0\s+-$", table, re.M)
  assert re.search(r"^mean \(official: 8 modalities, empty = 0\)\s+5\s+0\.1250$", table, re.M)
  assert re.search(r"^mean \(non-empty modalities only\)\s+5\s+0\.3333$", table, re.M)
  t = E.score_triples([(CT, "liver", "deliver"), (MR, "lung", "heart")], "RO")
  assert t["per_modality"]["ct"]["accuracy"] == 1.0 and t["per_modality"]["mr"]["accuracy"] == 0.0
  d = E.per_sample_details(VG_RECORDS, "VG")
  assert d[1]["ious"] == [0.5] and d[1]["hits"] == 0 and d[2]["fallback"] is True
  assert d[0]["processed_response"] == f"<ref>liver</ref>{A}"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "bird_jax.eval", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_scoring_mode(tmp_path):
  vg = E.write_predictions_jsonl(tmp_path / "model_test_VG_pred.jsonl", VG_RECORDS)
  ro = E.write_predictions_jsonl(tmp_path / "ro_preds.jsonl", RO_RECORDS)  # task from the field
  gc = E.write_predictions_jsonl(tmp_path / "chatlm_GC_img_coord.jsonl", GC_RECORDS)
  images = tmp_path / "images"
  images.mkdir()
  for i, rec in enumerate(VG_RECORDS + RO_RECORDS):
    src = sorted(DEMO_IMAGES.glob("*.png"))[i % 5]
    (images / rec["image"]).write_bytes(src.read_bytes())
  out = tmp_path / "scores"
  p = _run_cli(f"--predictions={vg}", f"--predictions={ro}", f"--predictions={gc}", f"--out={out}",
               "--skip_metrics=METEOR", f"--gallery_images={images}")
  assert p.returncode == 0, p.stderr
  table = p.stdout
  heads = ("== VG: recall@0.5", "== RO: accuracy", "== GC: Bleu_1, Bleu_2, Bleu_3, Bleu_4, ROUGE_L, CIDEr")
  assert all(h in table for h in heads), table
  vg_block = table.split("== RO")[0]
  assert re.search(r"^mean \(official: 8 modalities, empty = 0\)\s+5\s+0\.1250$", vg_block, re.M)
  assert re.search(r"^x\s+1\s+0\.0000$", vg_block, re.M)
  ro_block = table.split("== RO")[1].split("== GC")[0]
  assert re.search(r"^ct\s+2\s+0\.5000$", ro_block, re.M)
  assert re.search(r"^mean \(non-empty modalities only\)\s+3\s+0\.7500$", ro_block, re.M)
  assert "METEOR: unavailable (skipped on request)" in table
  spice = M.spice_status()  # None only where Stanford CoreNLP is installed: then SPICE is a GC column
  if spice is None:
    assert "== GC: Bleu_1, Bleu_2, Bleu_3, Bleu_4, ROUGE_L, CIDEr, SPICE" in table and "SPICE: unavailable" not in table
  else:
    assert f"SPICE: unavailable ({spice})" in table

  payload = json.loads((out / "metrics.json").read_text())
  res = payload["results"]
  assert set(res) == {"VG", "RO", "GC"}
  assert res["VG"]["mean_official"]["recall@0.5"] == pytest.approx(1 / 8)
  assert res["RO"]["per_modality"]["x"]["accuracy"] == 1.0
  assert res["RO"]["mean_official"]["accuracy"] == pytest.approx(1.5 / 8)
  gc_ct = res["GC"]["per_modality"]["ct"]
  direct = M.caption_scores([(r["image"], r["annotation"], r["response"]) for r in GC_RECORDS], "GC",
                            skip=["METEOR"])
  assert gc_ct["CIDEr"] == direct["per_modality"]["ct"]["CIDEr"] and gc_ct["n"] == 2
  assert payload["sources"] == [str(vg), str(ro), str(gc)]

  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  row = {(r["task"], r["modality"], r["metric"]): r for r in rows}
  assert float(row[("VG", "mean_nonempty", "recall@0.5")]["value"]) == pytest.approx(1 / 3)
  assert row[("VG", "pet", "recall@0.5")]["value"] == "" and row[("VG", "pet", "recall@0.5")]["n"] == "0"
  assert float(row[("GC", "ct", "CIDEr")]["value"]) == pytest.approx(gc_ct["CIDEr"])

  per_vg = [json.loads(x) for x in (out / "per_sample_VG.jsonl").read_text().splitlines()]
  assert [d["hits"] for d in per_vg] == [1, 0, 1, 0]
  html = (out / "gallery" / "index.html").read_text()
  # every sample (GC records reuse the VG images) plus the bar chart
  assert html.count("data:image/png;base64,") == len(VG_RECORDS + RO_RECORDS + GC_RECORDS) + 1


def test_cli_errors_are_one_line(tmp_path):
  f = tmp_path / "preds.jsonl"
  E.write_predictions_jsonl(f, VG_RECORDS[:1])
  p = _run_cli(f"--predictions={f}")
  assert p.returncode == 2
  assert p.stderr.strip().count("\n") == 0 and "cannot tell the task" in p.stderr
  p = _run_cli("--checkpoint=/nonexistent")
  assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "needs both --config" in p.stderr
  p = _run_cli("--config=cpu_demo", "--checkpoint=/nonexistent")
  assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
  p = _run_cli("--config=cpu_demo", "--config.train.stepz=3", "--checkpoint=/nonexistent")
  assert p.returncode == 2 and "unknown config field 'train.stepz'" in p.stderr


def _decode_images(html: str) -> list[np.ndarray]:
  return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
          for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def test_gallery_draws_both_box_colours(tmp_path):
  recs = [dict(r, task="VG") for r in VG_RECORDS] + RO_RECORDS
  files = sorted(DEMO_IMAGES.glob("*.png"))
  loader = lambda rec: files[int(rec["id"]) % len(files)]
  path = report.write_gallery(recs, loader, tmp_path / "g", max_samples=5)
  html = path.read_text()
  imgs = _decode_images(html)
  assert len(imgs) == 6  # chart + 5 samples
  assert (tmp_path / "g" / "modality_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "IoU per reference box: 0.500" in html or "IoU per reference box: 1.000 (hit)" in html
  assert "correct" in html and "&lt;ref&gt;" in html  # text is escaped
  # On a plain grey image: green reference box and red prediction where [0, 1000) coordinates put them.
  grey = Image.new("L", (500, 400), 128)
  rec = official_record(0, CT, "Where?", f"<ref>a</ref>{box(100, 200, 300, 600)}", box(500, 500, 900, 950))
  p1 = report.write_gallery([rec], lambda r: grey, tmp_path / "g1", task="VG")
  im = _decode_images(p1.read_text())[-1]
  h, w = im.shape[:2]
  assert min(h, w) >= 320  # small images are upscaled for display
  green = (im[..., 1] > 180) & (im[..., 0] < 40) & (im[..., 2] < 40)
  red = (im[..., 0] > 200) & (im[..., 1] < 50) & (im[..., 2] < 50)
  for mask, (x1, y1, x2, y2) in ((green, (0.1, 0.2, 0.3, 0.6)), (red, (0.5, 0.5, 0.9, 0.95))):
    ys, xs = np.nonzero(mask)
    assert xs.min() == pytest.approx(x1 * w, abs=2) and xs.max() == pytest.approx(x2 * w, abs=4)
    assert ys.min() == pytest.approx(y1 * h, abs=2) and ys.max() == pytest.approx(y2 * h, abs=4)
  assert "IoU per reference box: 0.000" in p1.read_text()
  # array images and a missing image are handled
  arr = np.zeros((40, 60), np.uint8)
  p2 = report.write_gallery(recs[:2], lambda r: arr if r["id"] == 0 else None, tmp_path / "g2", max_samples=2)
  assert len(_decode_images(p2.read_text())) == 2 and "image not found" in p2.read_text()


def test_comparison_table_shows_the_class_prior_column():
  from bird_jax import eval as E
  from bird_jax.inference import format_comparison

  ref = "<ref>liver</ref><box>(100,100),(300,300)</box>"
  recs = [{"id": f"ct_00--Phantom--case_{k:04d}--z_0000", "image": "", "question": "Where is the liver?",
           "annotation": ref, "response": ref if k < 3 else "<box>(700,700),(900,900)</box>", "task": "VG"}
          for k in range(4)]
  model = {"VG": E.score_predictions(recs, "VG")}
  const = {"VG": E.score_predictions([dict(r, response="<box>(0,0),(10,10)</box>") for r in recs], "VG")}
  prior = {"VG": E.score_predictions([dict(r, response=ref) for r in recs[:2]] + recs[2:3]
                                     + [dict(recs[3], response="")], "VG")}
  lines = format_comparison(model, const, {"VG": "<box>(0,0),(10,10)</box>"}, prior).splitlines()
  assert "class prior: the named class's mean training box" in lines[0]
  assert lines[1].split() == ["modality", "n", "model", "baseline", "prior"]
  assert lines[2].split() == ["ct", "4", "0.750", "0.000", "0.750"]
  assert lines[3].split()[:4] == ["mean*", "0.750", "0.000", "0.750"]
  without = format_comparison(model, {}, {}).splitlines()  # no prior scored: no column; no baseline: nan
  assert without[1].split() == ["modality", "n", "model", "baseline"] and without[2].split()[-1] == "nan"
