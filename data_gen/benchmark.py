"""Throughput of the non-LLM data path: `python -m data_gen.benchmark [--quick] [--json FILE]`.

Measures, on this machine:
  1. mask -> box extraction, masks/s on one core, 256x256 masks (1-3 blobs each), with and without the
     connected-component split (`boxes.mask_to_boxes(connected_components=...)`);
  2. the whole pipeline (source -> validation -> boxes -> facts -> PNG -> split -> records -> JSON), images/s,
     for the phantom source (128 px default and 512 px, CT-sized), the SAM-Med2D demo fixture (real PNG
     reading), and a synthetic MSD CT volume (NIfTI decode + reorientation + windowing + slicing);
     one worker (= per core) and, for the phantom, all cores;
  3. the projected wall time of a Med-GRIT-270k-sized build (270,000 QA pairs), using the QA pairs per image
     that the phantom run actually produced (train: 1..max_turns turns per conversation, test: one record per
     task), printed with the numbers.
Stats plots (written once per dataset, not per image) are left out of the timings.

`run(toy=False) -> BenchResult` (bird_jax.benchmarks.common; `python -m data_gen.benchmark --scaling [--quick]`)
is the 1-vs-2-worker figure: masks/s/core with and without connected components, and the pipeline's images/s
with workers=1 and workers=2 timed alternately (1, 2, 1, 2, ...; medians), their ratio per source, the CPU
share each run got (cpu_busy: process + workers CPU time / wall time; below the worker count the machine was
shared) and the projection of a 270k-QA build at both rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bird_jax.benchmarks.common import BenchResult, median, report, versions
from data_gen.boxes import mask_to_boxes
from data_gen.pipeline import generate_dataset

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sam_med2d_demo"
TARGET_QA = 270_000


def random_masks(n: int, size: int = 256, seed: int = 0) -> list[np.ndarray]:
  """Binary masks with 1-3 elliptical blobs of 1-20% of the side, like organ/lesion masks."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  out = []
  for _ in range(n):
    m = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
      cy, cx = rng.uniform(0.1, 0.9, 2) * size
      ry, rx = rng.uniform(0.01, 0.2, 2) * size
      m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    out.append(m)
  return out


def bench_boxes(n: int, size: int = 256, repeats: int = 3) -> dict[str, float]:
  masks = random_masks(n, size)
  res = {}
  for cc in (True, False):
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      for m in masks:
        mask_to_boxes(m, connected_components=cc)
      best = min(best, time.perf_counter() - t0)
    res["with_cc" if cc else "without_cc"] = n / best
  return res


def bench_pipeline(make_source: Callable[[], Any], *, workers: int = 1, repeats: int = 1) -> dict[str, float]:
  """Best of `repeats` full runs into a temp folder -> images/s, QA pairs per image."""
  best, images, qa = float("inf"), 0, 0
  for _ in range(repeats):
    tmp = Path(tempfile.mkdtemp(prefix="dg_bench_"))
    try:
      t0 = time.perf_counter()
      m = generate_dataset(make_source(), tmp / "ds", workers=workers, write_stats=False)
      dt = time.perf_counter() - t0
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    best = min(best, dt)
    c = m["counts"]
    images = sum(sum(v.values()) for v in c["images"].values())
    qa = sum(n for split in c["qa"].values() for task in split.values() for n in task.values())
  return {"images": images, "seconds": best, "images_per_s": images / best, "qa_per_image": qa / images}


def bench_per_image(make_source: Callable[[], Any], repeats: int) -> dict[str, float]:
  """Per-image work only (read + validate + boxes + facts + PNG write), without the fixed per-run cost of a
  whole `generate_dataset` (temp folder, split, JSON files), which swamps a 4-image fixture."""
  from data_gen.pipeline import process_sample

  tmp = Path(tempfile.mkdtemp(prefix="dg_bench_img_"))
  try:
    n, t0 = 0, time.perf_counter()
    for _ in range(repeats):
      for s in make_source():
        facts, _ = process_sample(s, str(tmp), None, True)
        n += facts is not None
    dt = time.perf_counter() - t0
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"images": n, "seconds": dt, "images_per_s": n / dt}


def _msd_fixture(root: Path, cases: int, shape: tuple[int, int, int]) -> Path:
  """A CT-like MSD task: body ellipse at 40 HU, two organs, 5 mm slices, int16 HU like the real tasks."""
  import nibabel as nib

  rng = np.random.default_rng(0)
  x, y, z = shape
  xx, yy = np.mgrid[:x, :y]
  body = ((xx - x / 2) / (0.45 * x)) ** 2 + ((yy - y / 2) / (0.35 * y)) ** 2 <= 1
  training = []
  for c in range(cases):
    img = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    for k in range(z):
      img[..., k][body] = 40
      r = 0.12 * x * np.sin(np.pi * (k + 1) / (z + 1))
      for v, (cx, cy) in ((1, (0.35, 0.45)), (2, (0.65, 0.5))):
        organ = ((xx - cx * x) ** 2 + (yy - cy * y) ** 2 <= r * r) & body
        lab[..., k][organ] = v
        img[..., k][organ] = 60 + 40 * v
    img = (img + rng.normal(0, 10, shape)).astype(np.int16)
    aff = np.diag([0.8, 0.8, 5.0, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(img, aff).to_filename(str(root / "imagesTr" / f"case_{c:03d}.nii.gz"))
    nib.Nifti1Image(lab, aff).to_filename(str(root / "labelsTr" / f"case_{c:03d}.nii.gz"))
    training.append({"image": f"./imagesTr/case_{c:03d}.nii.gz", "label": f"./labelsTr/case_{c:03d}.nii.gz"})
  (root / "dataset.json").write_text(json.dumps({
    "name": "Bench", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "spleen"},
    "training": training}))
  return root


def _cpu_seconds() -> float:
  """CPU time of this process and its reaped children (the pool's workers, joined when the pool closes)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_run(make_source: Callable[[], Any], workers: int) -> tuple[float, float, dict]:
  """One generate_dataset into a temp folder -> (wall s, CPU s incl. workers, manifest)."""
  tmp = Path(tempfile.mkdtemp(prefix="dg_bench_"))
  try:
    c0, t0 = _cpu_seconds(), time.perf_counter()
    m = generate_dataset(make_source(), tmp / "ds", workers=workers, write_stats=False)
    return time.perf_counter() - t0, _cpu_seconds() - c0, m
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _qa_per_image(m: dict) -> tuple[int, float]:
  c = m["counts"]
  images = sum(sum(v.values()) for v in c["images"].values())
  qa = sum(n for split in c["qa"].values() for task in split.values() for n in task.values())
  return images, qa / images


def bench_workers(make_source: Callable[[], Any], rounds: int, worker_counts: tuple[int, ...] = (1, 2),
                  warmup: int = 1) -> tuple[dict[int, dict[str, float]], float]:
  """The whole pipeline timed with each worker count in turn (1, 2, 1, 2, ... after `warmup` untimed runs each):
  {workers: images, median s, images/s, cpu_busy}, and the QA pairs per image of the folder made."""
  for _ in range(warmup):
    for w in worker_counts:
      _timed_run(make_source, w)
  walls: dict[int, list[float]] = {w: [] for w in worker_counts}
  cpus: dict[int, list[float]] = {w: [] for w in worker_counts}
  images, qa = 0, 0.0
  for _ in range(rounds):
    for w in worker_counts:
      wall, cpu, m = _timed_run(make_source, w)
      walls[w].append(wall)
      cpus[w].append(cpu)
      images, qa = _qa_per_image(m)
  out = {w: {"images": images, "seconds": median(walls[w]), "images_per_s": images / median(walls[w]),
             "cpu_busy": median([c / t for c, t in zip(cpus[w], walls[w], strict=True)]),
             "images_per_cpu_s": images / median(cpus[w]), "runs_s": [round(x, 3) for x in walls[w]]}
         for w in worker_counts}
  return out, qa


def run(toy: bool = False) -> BenchResult:
  """masks/s/core (with/without connected components), pipeline images/s at workers 1 and 2 and their ratio,
  and the 270k-QA projection. toy=True: tiny sizes, a few seconds."""
  from data_gen.sources.nifti import MsdSource
  from data_gen.sources.phantom import PhantomSource

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  n_masks, rounds = (50, 2) if toy else (1000, 3)
  b = bench_boxes(n_masks, repeats=rounds)
  rows: list[dict[str, Any]] = [
    {"what": "mask->boxes 256x256, connected components", "workers": 1, "images": None, "rate": b["with_cc"],
     "unit": "masks/s/core", "cpu_busy": None, "images_per_cpu_s": None, "ratio_vs_1": None},
    {"what": "mask->boxes 256x256, whole-mask extents", "workers": 1, "images": None, "rate": b["without_cc"],
     "unit": "masks/s/core", "cpu_busy": None, "images_per_cpu_s": None, "ratio_vs_1": None},
  ]
  summary: dict[str, Any] = {"masks_per_s_per_core_cc": b["with_cc"], "masks_per_s_per_core_no_cc": b["without_cc"]}
  tmp_msd = Path(tempfile.mkdtemp(prefix="dg_bench_msd_"))
  try:
    msd_root = _msd_fixture(tmp_msd / "Task03_Bench", 2 if toy else 4, (64, 64, 8) if toy else (256, 256, 48))
    sources: dict[str, Callable[[], Any]] = {
      "phantom_128": lambda: PhantomSource(num_cases=4 if toy else 100, image_size=128),
      "phantom_512": lambda: PhantomSource(num_cases=1 if toy else 10, image_size=512),
      "msd_ct": lambda: MsdSource(msd_root, max_slices_per_case=None),
    }
    qa_per_image = 0.0
    for name, make in sources.items():
      res, qa = bench_workers(make, rounds, warmup=0 if toy else 1)
      if name == "phantom_128":
        qa_per_image = qa
      for w, r in res.items():
        rows.append({"what": f"pipeline {name}", "workers": w, "images": r["images"], "rate": r["images_per_s"],
                     "unit": "images/s", "cpu_busy": r["cpu_busy"], "images_per_cpu_s": r["images_per_cpu_s"],
                     "ratio_vs_1": r["images_per_s"] / res[1]["images_per_s"]})
      summary[f"{name}_images_per_s_w1"] = res[1]["images_per_s"]
      summary[f"{name}_images_per_s_w2"] = res[2]["images_per_s"]
      summary[f"{name}_speedup_2v1"] = res[2]["images_per_s"] / res[1]["images_per_s"]
  finally:
    shutil.rmtree(tmp_msd, ignore_errors=True)
  n_images = TARGET_QA / qa_per_image
  summary["qa_per_image"] = qa_per_image
  summary["images_for_270k_qa"] = n_images
  for w in (1, 2):
    summary[f"hours_270k_phantom_512_w{w}"] = n_images / summary[f"phantom_512_images_per_s_w{w}"] / 3600
  notes = [
    "ratio_vs_1 = images/s with that many workers / images/s with 1 (medians of runs alternating 1, 2, 1, 2); "
    "cpu_busy = CPU time of the process and its workers / wall time: below the worker count, the run did not "
    "get that many cores (a shared machine), and its ratio undercounts; images_per_cpu_s (CPU time of all "
    "processes) shows what the workers cost in total, whatever the machine's load",
    f"projection: {TARGET_QA:,} QA pairs at {qa_per_image:.2f} QA pairs/image (phantom_128 folder: test_fraction "
    f"0.2, train 1..3 turns, 4 one-turn test records) = {n_images:,.0f} images; hours at the phantom_512 rate "
    "(512^2 slices: render + boxes + PNG encode, closest to real SA-Med2D/MSD slices)",
    f"cores here {os.cpu_count()}, load average before timing {load:.2f}",
    f"versions: {json.dumps(versions())}",
  ]
  if toy:
    notes.append("toy size: figures say nothing about the real pipeline")
  shapes = {"masks": n_masks, "rounds": rounds, "phantom_128_cases": 4 if toy else 100,
            "phantom_512_cases": 1 if toy else 10, "msd_volumes": "2x64x64x8" if toy else "4x256x256x48"}
  return BenchResult(name="data_gen", shapes=shapes, rows=rows, summary=summary, notes=notes)


def _fmt_time(seconds: float) -> str:
  h, rem = divmod(int(round(seconds)), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_gen.benchmark", description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="smaller runs (~20 s) for a smoke check")
  p.add_argument("--sam-med2d-root", type=Path, default=FIXTURE)
  p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
  p.add_argument("--scaling", action="store_true",
                 help="run(): masks/s/core and images/s with 1 vs 2 workers (alternating runs, medians), as a "
                      "BenchResult table; with --quick the toy size")
  a = p.parse_args(argv)
  if a.scaling:
    result = run(toy=a.quick)
    print(report(result))
    if a.json:
      a.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  q = a.quick
  results: dict[str, Any] = {"cores": cores}

  print(f"data_gen benchmark on {cores} core(s){' (quick)' if q else ''}")
  b = bench_boxes(200 if q else 1000)
  results["boxes_256"] = b
  print(f"  mask->box 256x256, 1 core: {b['with_cc']:8.0f} masks/s with connected components, "
        f"{b['without_cc']:8.0f} without")

  from data_gen.sources.phantom import PhantomSource

  runs: dict[str, tuple[Callable[[], Any], int, int]] = {
    "phantom_128": (lambda: PhantomSource(num_cases=20 if q else 100, image_size=128), 1, 1 if q else 2),
    "phantom_512": (lambda: PhantomSource(num_cases=4 if q else 20, image_size=512), 1, 1),
  }
  if cores > 1:
    runs[f"phantom_128_x{cores}"] = (lambda: PhantomSource(num_cases=20 if q else 100, image_size=128), cores, 1)
  if (a.sam_med2d_root / "images").is_dir():
    from data_gen.sources.sam_med2d import SamMed2DSource

    runs["sam_med2d_demo"] = (lambda: SamMed2DSource(a.sam_med2d_root), 1, 3 if q else 10)
  tmp_msd = Path(tempfile.mkdtemp(prefix="dg_bench_msd_"))
  try:
    from data_gen.sources.nifti import MsdSource

    msd_root = _msd_fixture(tmp_msd / "Task03_Bench", 2 if q else 4, (256, 256, 48))
    runs["msd_ct_256x256x48"] = (lambda: MsdSource(msd_root, max_slices_per_case=None), 1, 1)
    for name, (make, workers, repeats) in runs.items():
      r = bench_pipeline(make, workers=workers, repeats=repeats)
      results[name] = r
      print(f"  pipeline {name:22s} workers={workers}: {r['images_per_s']:7.1f} images/s "
            f"({r['images']} images in {r['seconds']:.2f}s, {r['qa_per_image']:.2f} QA/image)")
    if "sam_med2d_demo" in runs:
      r = bench_per_image(runs["sam_med2d_demo"][0], 10 if q else 50)
      results["sam_med2d_demo_per_image"] = r
      runs["sam_med2d_demo_per_image"] = runs["sam_med2d_demo"]
      print(f"  per-image sam_med2d_demo        workers=1: {r['images_per_s']:7.1f} images/s "
            f"({r['images']} images in {r['seconds']:.2f}s; no per-run overhead)")
  finally:
    shutil.rmtree(tmp_msd, ignore_errors=True)

  qa_per_image = results["phantom_128"]["qa_per_image"]
  n_images = TARGET_QA / qa_per_image
  results["projection"] = {"qa_pairs": TARGET_QA, "qa_per_image": qa_per_image, "images": n_images}
  print(f"\nprojection for a {TARGET_QA:,}-QA build at {qa_per_image:.2f} QA pairs/image (measured on the phantom "
        f"run: test_fraction 0.2, train 1..3 turns, test 4 one-turn records) = {n_images:,.0f} images:")
  for name in runs:
    r = results[name]
    secs = n_images / r["images_per_s"]
    results["projection"][name] = secs
    print(f"  at {name:22s} rate: {_fmt_time(secs):>8s}")
  if a.json:
    a.json.write_text(json.dumps(results, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
