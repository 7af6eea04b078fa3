"""`generate_dataset(workers=N)` writes exactly what workers=1 writes (records, order, PNG files, skips, counts),
and the per-image work (reading/rendering, boxes, PNG encoding) runs in the worker processes, not the parent.
Speed (1 vs 2 workers) is measured by `python -m data_gen.benchmark`, not asserted here."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import data_gen.pipeline as P
from data_gen.pipeline import generate_dataset
from data_gen.sources.base import Instance, Sample, SkipReport
from data_gen.sources.phantom import PhantomSource
from data_gen.sources.sam_med2d import SamMed2DSource

SAM_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sam_med2d_demo"


def _folder(out: Path) -> tuple[dict[str, str], dict]:
  """Every file's bytes (as a hash) by relative path, and the manifest without its time stamp."""
  files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
  manifest = json.loads((out / "manifest.json").read_text())
  manifest.pop("created")
  return files, manifest


def _same_for_workers(make_source, tmp: Path, workers=(2, 3), **kw) -> tuple[dict[str, str], dict]:
  ref = _folder_of(make_source, tmp / "w1", 1, **kw)
  assert ref[0] and not [n for n in ref[0] if n.startswith("images/.")]
  for w in workers:
    got = _folder_of(make_source, tmp / f"w{w}", w, **kw)
    assert got[0] == ref[0], f"workers={w}: files differ"
    assert got[1] == ref[1], f"workers={w}: manifest differs"
  return ref


def _folder_of(make_source, out: Path, workers: int, **kw) -> tuple[dict[str, str], dict]:
  generate_dataset(make_source(), out, workers=workers, write_stats=False, **kw)
  return _folder(out)


def test_phantom_byte_identical(tmp_path):
  files, m = _same_for_workers(lambda: PhantomSource(num_cases=4, image_size=64, slices_per_case=3), tmp_path,
                               test_fraction=0.4)
  assert sum(n.startswith("images/") for n in files) == 4 * (3 + 3 + 1)


def test_phantom_limit_inside_a_case_byte_identical(tmp_path):
  # 3 slices per ct/mr case: limit 11 stops inside a case, and the units read ahead must leave no trace.
  files, _ = _same_for_workers(lambda: PhantomSource(num_cases=4, image_size=64, slices_per_case=3), tmp_path,
                               limit=11, test_fraction=0.4)
  assert sum(n.startswith("images/") for n in files) == 11


def test_sam_med2d_fixture_byte_identical(tmp_path):
  assert SAM_FIXTURE.is_dir(), f"fixture missing: {SAM_FIXTURE} (../shared must sit next to the repo)"
  files, m = _same_for_workers(lambda: SamMed2DSource(SAM_FIXTURE), tmp_path, test_fraction=0.5)
  assert sum(n.startswith("images/") for n in files) >= 4
  assert m["skipped"]["counts"] == {"image not in any index": 1}


def test_sam_med2d_broken_copy_same_skips(tmp_path):
  # Skips found while the workers read files (unreadable mask, blank image) come back in source order.
  assert SAM_FIXTURE.is_dir(), f"fixture missing: {SAM_FIXTURE} (../shared must sit next to the repo)"
  root = tmp_path / "sam_med2d_demo"
  shutil.copytree(SAM_FIXTURE, root)
  masks = sorted((root / "masks").glob("*.png"))
  masks[0].write_bytes(b"not a png")
  masks[5].write_bytes(b"")
  _, m = _same_for_workers(lambda: SamMed2DSource(root), tmp_path / "runs", test_fraction=0.5)
  assert m["skipped"]["counts"]["unreadable mask"] == 2


class _ListSource:
  """A source the pipeline cannot split (no known loader): its items are made in the parent."""

  name = "list"

  def __init__(self, items):
    self.items = items
    self.skips = SkipReport()

  def __iter__(self):
    self.skips = SkipReport()
    for i, it in enumerate(self.items):
      if i % 4 == 3:
        self.skips.add(f"item {i}", "source-side skip", "")
      yield it
    self.skips.add("end", "found after the last item", "")  # recorded only when the source is read to its end


def _items() -> list:
  rng = np.random.default_rng(0)
  out: list = []
  for i in range(12):
    img = rng.integers(0, 255, (32, 40), dtype=np.uint8)
    mask = np.zeros((32, 40), bool)
    mask[4:12 + i, 5:20] = True
    out.append(Sample(image_id=f"ct_00--L--c{i % 5}--z_{i:04d}", image=img, instances=[Instance("liver", mask)],
                      case_id=f"ct_00--L--c{i % 5}", modality="ct", source="list"))
  dup = Sample(image_id=out[2].image_id, image=np.full((32, 40), 7, np.uint8) + np.eye(32, 40, dtype=np.uint8),
               instances=[Instance("spleen", out[2].instances[0].mask)], case_id="ct_00--L--c2", modality="ct",
               source="list")
  blank = Sample(image_id="ct_00--L--c1--z_0099", image=np.zeros((32, 40), np.uint8), instances=[],
                 case_id="ct_00--L--c1", modality="ct", source="list")
  unsafe = Sample(image_id="ct_00--L--../x", image=out[0].image, instances=[], case_id="c", modality="ct",
                  source="list")
  return out[:5] + [dup, "junk", blank, unsafe] + out[5:]


def test_unsplittable_source_duplicates_and_bad_items_byte_identical(tmp_path):
  files, m = _same_for_workers(lambda: _ListSource(_items()), tmp_path, test_fraction=0.4)
  c = m["skipped"]["counts"]
  assert c["duplicate image id"] == 1 and c["not a Sample"] == 1 and c["blank image"] == 1
  assert c["unsafe image id"] == 1 and c["source-side skip"] == 4 and c["found after the last item"] == 1
  assert sum(n.startswith("images/") for n in files) == 12
  _, m = _same_for_workers(lambda: _ListSource(_items()), tmp_path / "limited", limit=7, test_fraction=0.4)
  assert m["skipped"]["counts"]["source-side skip"] == 1 and "found after the last item" not in m["skipped"]["counts"]


def test_msd_volume_byte_identical_with_source_stats(tmp_path):
  from data_gen.benchmark import _msd_fixture
  from data_gen.sources.nifti import MsdSource

  root = _msd_fixture(tmp_path / "Task03_Bench", 3, (48, 48, 6))
  (root / "labelsTr" / "case_002.nii.gz").write_bytes(b"\x1f\x8b broken")  # a skipped case, counted in a worker
  sources: dict[int, MsdSource] = {}

  def make():
    sources[len(sources) + 1] = MsdSource(root, max_slices_per_case=None)
    return sources[len(sources)]

  _, m = _same_for_workers(make, tmp_path / "runs", workers=(2,), test_fraction=0.5)
  assert m["skipped"]["counts"] == {"unreadable volume": 1}
  assert sources[1].stats == sources[2].stats and sources[1].stats["cases_skipped"] == 1
  assert sources[1].skips.to_dict() == sources[2].skips.to_dict()


def test_per_image_work_runs_in_the_workers(tmp_path, monkeypatch):
  if multiprocessing.get_start_method() != "fork":
    pytest.skip("the call log below reaches the workers through fork")
  log = tmp_path / "calls"
  log.mkdir()

  def logged(fn, tag):
    def wrapper(*a, **k):
      (log / f"{tag}-{os.getpid()}-{len(list(log.iterdir()))}").touch()
      return fn(*a, **k)
    return wrapper

  monkeypatch.setattr(PhantomSource, "case", logged(PhantomSource.case, "render"))
  monkeypatch.setattr(P, "process_sample", logged(P.process_sample, "png"))
  generate_dataset(PhantomSource(num_cases=3, image_size=48, slices_per_case=2), tmp_path / "out", workers=2,
                   write_stats=False)
  calls = [p.name.split("-")[:2] for p in log.iterdir()]
  assert {t for t, _ in calls} == {"render", "png"}
  assert str(os.getpid()) not in {pid for _, pid in calls}  # the parent only gathered facts


def test_benchmark_run_toy_is_well_formed():
  from bird_jax.benchmarks.common import BenchResult
  from data_gen.benchmark import run

  r = run(toy=True)
  assert isinstance(r, BenchResult) and r.name == "data_gen"
  for name in ("phantom_128", "phantom_512", "msd_ct"):
    w1, w2 = r.summary[f"{name}_images_per_s_w1"], r.summary[f"{name}_images_per_s_w2"]
    assert w1 > 0 and w2 > 0 and r.summary[f"{name}_speedup_2v1"] == pytest.approx(w2 / w1)
  assert r.summary["masks_per_s_per_core_cc"] > 0 and r.summary["masks_per_s_per_core_no_cc"] > 0
  assert 1 < r.summary["qa_per_image"] < 5 and r.summary["hours_270k_phantom_512_w2"] > 0
  assert {row["workers"] for row in r.rows} == {1, 2} and len({tuple(row) for row in r.rows}) == 1
  json.dumps(r.to_json(), allow_nan=False)
