"""Source -> validated samples -> images + facts -> split by case -> Med-GRIT records -> dataset folder.

Pass 1 streams the source once: each sample is validated, its PNG written and its per-object facts kept
(a few hundred bytes per image; masks are dropped). Pass 2 splits by case and builds the records. Bad
samples and instances are skipped with counted reasons (manifest["skipped"]); they never stop the run.
With workers > 1 the per-image part of pass 1 (reading/rendering, boxes, PNG) runs in worker processes and the
folder written is byte for byte the one workers=1 writes (`_pass1_parallel`).

Determinism: records for an image come from an RNG seeded by (seed, image id), so they do not depend on
worker count, source order or `limit`; the split depends only on the set of cases and the seed.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import multiprocessing
import os
import pickle
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_gen import tasks as T
from data_gen.boxes import label_to_name, mask_to_pixel_boxes, min_area_for
from data_gen.sources.base import MODALITIES, Sample, SkipReport, is_safe_id, modality_from_id
from data_gen.split import split_cases
from data_gen.templates import build_records
from data_gen.writer import (
  MANIFEST,
  TEST_FILES,
  TRAIN_FILE,
  make_temp_dir,
  publish,
  read_manifest,
  write_json,
  write_png,
  write_records,
)

if TYPE_CHECKING:
  from data_gen.llm.client import LLMConfig

FORMAT_VERSION = "1.0"
MIN_IMAGE_SIDE = 8


# ---- pass 1: one sample -------------------------------------------------------------------------------
def _as_image(image: Any) -> tuple[np.ndarray | None, str]:
  arr = np.asarray(image)
  if arr.dtype == bool or arr.dtype.kind not in "ui":
    return None, f"dtype {arr.dtype}; sources must give uint8 (window/scale to 0..255 first)"
  if arr.dtype != np.uint8:
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      return None, f"dtype {arr.dtype} with values outside 0..255"
    arr = arr.astype(np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  elif arr.ndim == 3 and arr.shape[-1] == 4:
    arr = arr[..., :3]  # alpha carries nothing for grounding
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
    return None, f"shape {arr.shape}; expected HxW or HxWx3"
  return arr, ""


def process_sample(sample: Sample, images_dir: str, min_area: int | None, connected_components: bool,
                   png_name: str | None = None) -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
  """Validates one sample, writes its PNG (as `png_name` in images_dir, default `<image id>.png`); returns
  (ImageFacts dict or None, [(where, reason, detail)])."""
  sid = getattr(sample, "image_id", "?")
  skips: list[tuple[str, str, str]] = []
  try:
    image, why = _as_image(sample.image)
    if image is None:
      return None, [(sid, "bad image array", why)]
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
      return None, [(sid, "image too small", f"{w}x{h}, need >= {MIN_IMAGE_SIDE} px")]
    if int(image.max()) == int(image.min()):
      return None, [(sid, "blank image", f"constant value {int(image.max())}")]
    gray = T._gray(image)
    thr = min_area_for(h, w) if min_area is None else min_area
    dataset = sample.meta.get("dataset") if isinstance(sample.meta, dict) else None
    objects: list[T.ObjectFacts] = []
    for j, inst in enumerate(sample.instances):
      where = f"{sid} instance {j} ({getattr(inst, 'label', '?')})"
      label = str(getattr(inst, "label", "") or "").strip()
      if not label:
        skips.append((where, "instance: empty label", ""))
        continue
      mask = np.asarray(inst.mask)
      if mask.shape != (h, w):
        skips.append((where, "instance: mask size mismatch", f"mask {mask.shape} vs image {(h, w)}"))
        continue
      mask = mask > 0 if mask.dtype != bool else mask
      if not mask.any():
        skips.append((where, "instance: empty mask", ""))
        continue
      pboxes = mask_to_pixel_boxes(mask, min_area=thr, connected_components=connected_components)
      if not pboxes:
        skips.append((where, "instance: below tiny-object threshold", f"{int(mask.sum())} px < {thr} px"))
        continue
      meta = inst.meta if isinstance(getattr(inst, "meta", None), dict) else {}
      objects.extend(T.object_facts(label_to_name(label, dataset), mask, image, pboxes,
                                    meta_shape=meta.get("shape"), gray=gray))
    if not objects:
      skips.append((sid, "no usable instances", f"{len(sample.instances)} given"))
      return None, skips
    write_png(Path(images_dir) / (png_name or f"{sid}.png"), image)
    facts = T.ImageFacts(image_id=sid, case_id=str(sample.case_id), modality=sample.modality, width=w,
                         height=h, plane=sample.meta.get("plane") if isinstance(sample.meta, dict) else None,
                         objects=objects)
    return facts.to_dict(), skips
  except Exception as e:  # one broken sample must not kill a long run; the reason is counted
    return None, skips + [(sid, "error while processing", f"{type(e).__name__}: {e}")]


def _process_star(args: tuple) -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
  return process_sample(*args)


def _check_sample(s: Any) -> tuple[str, str, str] | None:
  """The id-level checks of one sample (all but duplicates): None, or the (where, reason, detail) skip."""
  sid = getattr(s, "image_id", None)
  if not isinstance(s, Sample) or not isinstance(sid, str):
    return repr(sid), "not a Sample", type(s).__name__
  if not is_safe_id(sid):
    return sid, "unsafe image id", "ids become file names: use [A-Za-z0-9._+-], no '..' or '/'"
  if s.modality not in MODALITIES:
    return sid, "unknown modality", f"{s.modality!r} not in {MODALITIES}"
  if modality_from_id(sid) != s.modality:
    return sid, "id prefix does not give the modality", f"prefix {modality_from_id(sid)!r} vs modality {s.modality!r}"
  if not s.case_id:
    return sid, "missing case id", ""
  return None


def _checked(samples: Iterable[Sample], skips: SkipReport) -> Iterator[Sample]:
  """Id-level checks that must happen in one place (duplicates) before a worker writes a PNG."""
  seen: set[str] = set()
  for s in samples:
    bad = _check_sample(s)
    if bad is not None:
      skips.add(*bad)
      continue
    if s.image_id in seen:
      skips.add(s.image_id, "duplicate image id", "")
      continue
    seen.add(s.image_id)
    yield s


# ---- pass 1 in worker processes (workers > 1) ---------------------------------------------------------
# Reading, decoding or rendering a sample is most of its cost (and a Sample carries its image and one full-size
# mask per instance), so it must not happen in the parent. The parent walks the source's own __iter__ on a copy
# whose per-item loader (`_Loader.method`: the call that reads, decodes or renders) is swapped for a recorder:
# each call becomes a `_Unit` holding only the call's arguments (a case number, file paths). Workers replay the
# call on their own copy of the source, check and process the samples, and write each PNG under a temporary
# name; only facts dicts (a few hundred bytes an image) and skip lines come back. The parent takes results in
# source order: it alone rejects duplicate ids (in order, first wins), renames accepted PNGs into place and
# applies `limit`, so the records, files, skips and counts are those of workers=1.
@dataclasses.dataclass
class _Unit:
  """A recorded call of the source's loader, or (ready=True) an item the source yielded itself."""

  args: tuple = ()
  kwargs: dict = dataclasses.field(default_factory=dict)
  ready: bool = False
  item: Any = None


@dataclasses.dataclass(frozen=True)
class _Loader:
  method: str  # the source method whose calls become units
  many: bool  # it returns a list of samples (else one sample or None)
  run: Callable[[Any, _Unit], list] | None = None  # how a worker replays a unit (default: call `method`)


def _run_nifti_case(src: Any, unit: _Unit) -> list:
  # The source's own __iter__ over this one case, so its SkipError handling and stats apply as in a serial run.
  src._cases = lambda: iter(unit.args[:1])
  return list(src)


def _loader_for(source: Any) -> _Loader | None:
  """How to split the built-in sources into units; None: the parent iterates the source (other sources)."""
  from data_gen.sources.nifti import _NiftiSource
  from data_gen.sources.phantom import PhantomSource
  from data_gen.sources.sam_med2d import SamMed2DSource

  if isinstance(source, PhantomSource):
    return _Loader("case", many=True)
  if isinstance(source, SamMed2DSource):
    return _Loader("_load_sample", many=False)
  if isinstance(source, _NiftiSource):
    return _Loader("_case_samples", many=True, run=_run_nifti_case)
  return None


def _skips_delta(report: SkipReport, counts: Counter, lengths: dict[str, int]) -> SkipReport | None:
  """What `report` gained since (counts, lengths) were taken, as a report merge() can replay in order."""
  if report.total == sum(counts.values()):
    return None
  out = SkipReport()
  for reason, n in report.counts.items():
    if n > counts.get(reason, 0):
      out.counts[reason] = n - counts.get(reason, 0)
      out.examples[reason] = list(report.examples.get(reason, [])[lengths.get(reason, 0):])
  return out


def _plan(source: Any, loader: _Loader | None) -> Iterator[tuple[_Unit | None, SkipReport | None]]:
  """(unit, the source's skips recorded just before it) in source order; last (None, skips recorded after the
  last unit). Without a loader the source's items themselves become ready units."""
  walker = source
  if loader is not None:
    walker = copy.copy(source)

    def record(*args: Any, **kwargs: Any) -> Any:
      u = _Unit(args, kwargs)
      return [u] if loader.many else u

    setattr(walker, loader.method, record)
  report = getattr(walker, "skips", None)
  counts: Counter = Counter(report.counts) if isinstance(report, SkipReport) else Counter()
  lengths = {k: len(v) for k, v in report.examples.items()} if isinstance(report, SkipReport) else {}
  it = iter(walker)
  while True:
    item = next(it, _END)
    cur = getattr(walker, "skips", None)
    delta = None
    if isinstance(cur, SkipReport):
      if cur is not report:  # the source's __iter__ started a fresh report
        report, counts, lengths = cur, Counter(), {}
      delta = _skips_delta(cur, counts, lengths)
      if delta is not None:
        counts, lengths = Counter(cur.counts), {k: len(v) for k, v in cur.examples.items()}
    if item is _END:
      yield None, delta
      return
    yield (item if isinstance(item, _Unit) else _Unit(ready=True, item=item)), delta


_END = object()
_W: dict[str, Any] = {}  # a worker's source copy and settings (set by _worker_init)


def _worker_init(blob: bytes | None, loader: _Loader | None, images_dir: str, min_area: int | None,
                 connected_components: bool) -> None:
  try:
    _W.update(source=pickle.loads(blob) if blob is not None else None, loader=loader, images_dir=images_dir,
              min_area=min_area, cc=connected_components, error=None)
  except Exception as e:  # raising here would make the pool restart the worker forever; report it per task
    _W["error"] = f"{type(e).__name__}: {e}"


def _run_unit(n: int, unit: _Unit) -> tuple[list[tuple], SkipReport | None, Counter | None]:
  """One unit in a worker -> ([(id, check skip, facts dict, skips, temp PNG name)] per item, source skips,
  source stats)."""
  src_skips = src_stats = None
  if unit.ready:
    items = [unit.item]
  else:
    loader: _Loader = _W["loader"]
    src = copy.copy(_W["source"])
    if isinstance(getattr(src, "skips", None), SkipReport):
      src.skips = SkipReport()
    if isinstance(getattr(src, "stats", None), Counter):
      src.stats = Counter()
    if loader.run is not None:
      items = loader.run(src, unit)
    else:
      got = getattr(src, loader.method)(*unit.args, **unit.kwargs)
      items = list(got) if loader.many else ([] if got is None else [got])
    sk, st = getattr(src, "skips", None), getattr(src, "stats", None)
    src_skips = sk if isinstance(sk, SkipReport) and sk.total else None
    src_stats = st if isinstance(st, Counter) and st else None
  images_dir = _W["images_dir"]
  out = []
  for j, s in enumerate(items):
    bad = _check_sample(s)
    if bad is not None:
      out.append((None, bad, None, [], None))
      continue
    name = f".part-{n}-{j}.png"  # hidden from *.png globs; renamed or removed by the parent
    fd, sk = process_sample(s, images_dir, _W["min_area"], _W["cc"], png_name=name)
    if fd is None:
      Path(images_dir, name).unlink(missing_ok=True)
    out.append((s.image_id, None, fd, sk, name if fd is not None else None))
  return out, src_skips, src_stats


def _run_units(task: list[tuple[int, _Unit]]) -> tuple[list, float]:
  if _W.get("error"):
    raise RuntimeError(f"data_gen worker could not load the source: {_W['error']}")
  t0 = time.perf_counter()
  return [_run_unit(n, u) for n, u in task], time.perf_counter() - t0


def _pass1_parallel(source: Any, images_dir: Path, *, workers: int, limit: int | None, min_area: int | None,
                    connected_components: bool, skips: SkipReport, on_facts: Callable[[dict], None],
                    bar: Any = None) -> None:
  """Pass 1 with `workers` processes; fills `skips` and calls on_facts in source order, like the serial loop.
  Sets source.skips (and a nifti source's stats) to what a serial run would have left there."""
  loader = _loader_for(source)
  blob = None
  if loader is not None:
    try:
      blob = pickle.dumps(source)  # also what a spawn/forkserver worker needs
    except Exception:
      loader = None
  src_report, src_stats = SkipReport(), Counter()
  plan = _plan(source, loader)
  trailing: SkipReport | None = None
  state = {"chunk": 1, "units": 0, "seconds": 0.0, "n": 0, "done": False}
  target_s = 0.03  # per task: amortises the per-task IPC, small enough to balance a few slow units

  def next_task() -> list[tuple[int, _Unit, SkipReport | None]]:
    nonlocal trailing
    batch = []
    while len(batch) < state["chunk"] and not state["done"]:
      unit, pre = next(plan)
      if unit is None:
        trailing, state["done"] = pre, True
        break
      batch.append((state["n"], unit, pre))
      state["n"] += 1
    return batch

  seen: set[str] = set()
  taken = 0
  full = lambda: limit is not None and taken >= limit

  def drop(name: str | None) -> None:
    if name:
      (images_dir / name).unlink(missing_ok=True)

  with multiprocessing.get_context().Pool(
      workers, initializer=_worker_init,
      initargs=(blob, loader, str(images_dir), min_area, connected_components)) as pool:
    pending: deque = deque()
    while True:
      while not full() and not state["done"] and len(pending) < 2 * workers:
        batch = next_task()
        if batch:
          pending.append(([pre for _, _, pre in batch],
                          pool.apply_async(_run_units, ([(n, u) for n, u, _ in batch],))))
      if not pending:
        break
      pres, res = pending.popleft()
      results, seconds = res.get()
      state["units"] += len(results)
      state["seconds"] += seconds
      state["chunk"] = max(1, min(32, int(target_s * state["units"] / max(state["seconds"], 1e-6))))
      for pre, (items, unit_skips, unit_stats) in zip(pres, results, strict=True):
        if full():  # a serial run stopped reading the source before this unit
          for *_, name in items:
            drop(name)
          continue
        for rep in (pre, unit_skips):
          if rep is not None:
            src_report.merge(rep)
        if unit_stats:
          src_stats.update(unit_stats)
        for sid, bad, fd, sk, name in items:
          if full():
            drop(name)
            continue
          taken += 1
          if bad is not None:
            skips.add(*bad)
            continue
          if sid in seen:
            skips.add(sid, "duplicate image id", "")
            drop(name)
            continue
          seen.add(sid)
          for where, reason, detail in sk:
            skips.add(where, reason, detail)
          if fd is not None:
            os.replace(images_dir / name, images_dir / f"{sid}.png")
          on_facts(fd)
          if bar is not None:
            bar.update(1)
  if trailing is not None and not full():
    src_report.merge(trailing)
  if isinstance(getattr(source, "skips", None), SkipReport):
    source.skips = src_report
  if loader is not None and isinstance(getattr(source, "stats", None), Counter):
    source.stats = src_stats


# ---- driver -------------------------------------------------------------------------------------------
def _source_params(source: Any) -> dict[str, Any]:
  p = getattr(source, "params", None)
  return p() if callable(p) else {}


def generate_dataset(source: Any, out_dir: str | Path, *, seed: int = 0, test_fraction: float = 0.2,
                     max_turns: int = 3, workers: int = 1, limit: int | None = None, overwrite: bool = False,
                     records_per_image: int = 1, min_area: int | None = None,
                     connected_components: bool = True, progress: bool = False,
                     write_stats: bool = True, llm: LLMConfig | None = None,
                     task_weights: dict[str, float] | None = None, llm_dry_run: bool = False) -> dict[str, Any]:
  """Builds the dataset folder at out_dir and returns its manifest.

  task_weights: how often each task is drawn for a training turn (default data_gen.tasks.TASK_WEIGHTS);
  the one-turn test files always hold every task.

  llm: write the records with an LLM (data_gen.llm; manifest["llm"] gets its stats) instead of templates.
  llm_dry_run: read the source, then return {"llm_estimate": data_gen.llm.estimate.estimate(...)} without
  sending anything or writing out_dir (no API key needed).

  Idempotent: if out_dir already holds a complete folder made with the same parameters, nothing is done and
  its manifest is returned; different parameters or a non-dataset folder raise unless overwrite=True.
  """
  out = Path(out_dir)
  if max_turns < 1:
    raise ValueError(f"max_turns must be >= 1, got {max_turns}")
  if records_per_image < 1:
    raise ValueError(f"records_per_image must be >= 1, got {records_per_image}")
  params = {
    "source": getattr(source, "name", type(source).__name__), "source_params": _source_params(source),
    "seed": seed, "test_fraction": test_fraction, "max_turns": max_turns, "limit": limit,
    "records_per_image": records_per_image, "min_area": min_area,
    "connected_components": connected_components, "format_version": FORMAT_VERSION,
  }
  if task_weights is not None:
    params["task_weights"] = dict(sorted(task_weights.items()))
  if llm is not None:
    from data_gen.llm.stage import llm_params

    params["llm"] = llm_params(llm)
  if llm_dry_run:
    if llm is None:
      raise ValueError("--llm-dry-run needs --llm-base-url (the endpoint whose requests it estimates)")
    tmp = make_temp_dir(out)
    try:
      return _generate_into(source, tmp, params, seed=seed, test_fraction=test_fraction, max_turns=max_turns,
                            workers=workers, limit=limit, records_per_image=records_per_image, min_area=min_area,
                            connected_components=connected_components, progress=progress,
                            write_stats=False, llm=llm, task_weights=task_weights, llm_dry_run=True)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  if out.exists() and not overwrite:
    old = read_manifest(out)
    if old is None:
      raise FileExistsError(f"{out} exists but has no {MANIFEST}; remove it or pass overwrite=True "
                            "(--overwrite)")
    if old.get("params") == params:
      return old
    raise FileExistsError(f"{out} holds a dataset made with other parameters; pass overwrite=True "
                          "(--overwrite) or choose another output folder")
  if llm is not None:
    llm.require_key()

  tmp = make_temp_dir(out)
  try:
    manifest = _generate_into(source, tmp, params, seed=seed, test_fraction=test_fraction,
                              max_turns=max_turns, workers=workers, limit=limit,
                              records_per_image=records_per_image, min_area=min_area,
                              connected_components=connected_components,
                              progress=progress, write_stats=write_stats, llm=llm, task_weights=task_weights)
    publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _generate_into(source: Any, tmp: Path, params: dict, *, seed: int, test_fraction: float, max_turns: int,
                   workers: int, limit: int | None, records_per_image: int, min_area: int | None,
                   connected_components: bool, progress: bool, write_stats: bool,
                   llm: LLMConfig | None = None, task_weights: dict[str, float] | None = None,
                   llm_dry_run: bool = False) -> dict[str, Any]:
  skips = SkipReport()
  total = None
  try:
    total = len(source) if limit is None else min(limit, len(source))
  except TypeError:
    total = limit
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"data_gen {params['source']}", unit="img", file=sys.stderr)

  facts: list[T.ImageFacts] = []

  def on_facts(fd: dict[str, Any] | None) -> None:
    if fd is not None:
      facts.append(T.ImageFacts.from_dict(fd))

  if workers > 1:
    _pass1_parallel(source, tmp / "images", workers=workers, limit=limit, min_area=min_area,
                    connected_components=connected_components, skips=skips, on_facts=on_facts, bar=bar)
  else:
    samples: Iterable[Sample] = iter(source)
    if limit is not None:
      samples = itertools.islice(samples, limit)
    jobs = ((s, str(tmp / "images"), min_area, connected_components) for s in _checked(samples, skips))
    for fd, sk in map(_process_star, jobs):
      for where, reason, detail in sk:
        skips.add(where, reason, detail)
      on_facts(fd)
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  src_skips = getattr(source, "skips", None)
  if isinstance(src_skips, SkipReport):
    skips.merge(src_skips)
  if not facts:
    raise ValueError(f"source {params['source']!r} produced no usable samples; skipped: "
                     + "; ".join(f"{n} {r}" for r, n in skips.counts.most_common(5)))

  train_cases, test_cases = split_cases(((f.case_id, f.modality) for f in facts), test_fraction, seed)
  llm_info = None
  if llm_dry_run:
    from data_gen.llm.estimate import estimate

    return {"llm_estimate": estimate(facts, llm, train_cases=train_cases, test_cases=test_cases, seed=seed,
                                     max_turns=max_turns, records_per_image=records_per_image)}
  if llm is None:
    train, test, qa_counts = build_records(facts, train_cases, test_cases, seed=seed, max_turns=max_turns,
                                           records_per_image=records_per_image, task_weights=task_weights)
  else:
    from data_gen.llm.stage import llm_records

    train, test, qa_counts, llm_info = llm_records(facts, llm, train_cases=train_cases, test_cases=test_cases,
                                                   seed=seed, max_turns=max_turns,
                                                   records_per_image=records_per_image)
  write_records(tmp / TRAIN_FILE, train)
  for task, recs in test.items():
    write_records(tmp / TEST_FILES[task], recs)

  def by_mod(items: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))

  split_of = {c: "train" for c in train_cases} | {c: "test" for c in test_cases}
  case_mod = {f.case_id: f.modality for f in facts}
  counts = {
    "cases": {s: by_mod(m for c, m in case_mod.items() if split_of[c] == s) for s in ("train", "test")},
    "images": {s: by_mod(f.modality for f in facts if split_of[f.case_id] == s) for s in ("train", "test")},
    "records": {"train": by_mod(T.modality_of(r) for r in train)}
    | {f"test_{t}": by_mod(T.modality_of(r) for r in recs) for t, recs in test.items()},
    "qa": qa_counts,
    "train_turns": dict(sorted(Counter(str(len(r["conversations"])) for r in train).items())),
    "objects": sum(len(f.objects) for f in facts),
  }
  manifest = {
    "source": params["source"],
    "version": FORMAT_VERSION,
    "seed": seed,
    "params": params,
    "counts": counts,
    "skipped": skips.to_dict(),
    "files": {"train": TRAIN_FILE, "test": dict(TEST_FILES), "images": "images/"},
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  if llm_info is not None:
    manifest["llm"] = llm_info
  if write_stats:
    from data_gen.stats import write_stats as _write_stats
    manifest["stats"] = _write_stats(tmp, llm=llm_info)
  write_json(tmp / MANIFEST, manifest)  # last: its presence marks the folder complete
  return manifest
