"""Source -> validated samples -> images + facts -> split by case -> Med-GRIT records -> dataset folder.

Pass 1 streams the source once: each sample is validated, its PNG written and its per-object facts kept
(a few hundred bytes per image; masks are dropped). Pass 2 splits by case and builds the records. Bad
samples and instances are skipped with counted reasons (manifest["skipped"]); they never stop the run.

Determinism: records for an image come from an RNG seeded by (seed, image id), so they do not depend on
worker count, source order or `limit`; the split depends only on the set of cases and the seed.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import multiprocessing
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_gen import tasks as T
from data_gen.boxes import label_to_name, mask_to_pixel_boxes, min_area_for
from data_gen.sources.base import MODALITIES, Sample, SkipReport, is_safe_id, modality_from_id
from data_gen.split import split_cases
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


def _id_seed(seed: int, image_id: str, stream: int) -> list[int]:
  h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
  return [seed, h, stream]


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


def process_sample(sample: Sample, images_dir: str, min_area: int | None, connected_components: bool
                   ) -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
  """Validates one sample, writes its PNG; returns (ImageFacts dict or None, [(where, reason, detail)])."""
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
    write_png(Path(images_dir) / f"{sid}.png", image)
    facts = T.ImageFacts(image_id=sid, case_id=str(sample.case_id), modality=sample.modality, width=w,
                         height=h, plane=sample.meta.get("plane") if isinstance(sample.meta, dict) else None,
                         objects=objects)
    return facts.to_dict(), skips
  except Exception as e:  # one broken sample must not kill a long run; the reason is counted
    return None, skips + [(sid, "error while processing", f"{type(e).__name__}: {e}")]


def _process_star(args: tuple) -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
  return process_sample(*args)


def _checked(samples: Iterable[Sample], skips: SkipReport) -> Iterator[Sample]:
  """Id-level checks that must happen in one place (duplicates) before a worker writes a PNG."""
  seen: set[str] = set()
  for s in samples:
    sid = getattr(s, "image_id", None)
    if not isinstance(s, Sample) or not isinstance(sid, str):
      skips.add(repr(sid), "not a Sample", type(s).__name__)
      continue
    if not is_safe_id(sid):
      skips.add(sid, "unsafe image id", "ids become file names: use [A-Za-z0-9._+-], no '..' or '/'")
      continue
    if s.modality not in MODALITIES:
      skips.add(sid, "unknown modality", f"{s.modality!r} not in {MODALITIES}")
      continue
    if modality_from_id(sid) != s.modality:
      skips.add(sid, "id prefix does not give the modality",
                f"prefix {modality_from_id(sid)!r} vs modality {s.modality!r}")
      continue
    if not s.case_id:
      skips.add(sid, "missing case id", "")
      continue
    if sid in seen:
      skips.add(sid, "duplicate image id", "")
      continue
    seen.add(sid)
    yield s


def template_conversation(f: T.ImageFacts, seed: int, record: int, max_turns: int,
                          task_weights: dict[str, float] | None = None) -> tuple[list[list[str]], str]:
  """The templated training conversation number `record` of an image: 1..max_turns turns, its own seeded stream."""
  rng = np.random.default_rng(_id_seed(seed, f.image_id, record))
  n = int(rng.integers(1, max_turns + 1))
  return T.conversation(f, n, rng, task_weights)


# ---- pass 2: records ----------------------------------------------------------------------------------
def build_records(facts: list[T.ImageFacts], train_cases: set[str], test_cases: set[str], *, seed: int,
                  max_turns: int, records_per_image: int, task_weights: dict[str, float] | None = None
                  ) -> tuple[list[dict], dict[str, list[dict]], dict]:
  """-> (train records, {task: test records}, per-turn task counts {split: {task: {modality: n}}})."""
  train: list[dict] = []
  test: dict[str, list[dict]] = {t: [] for t in T.TASKS}
  qa: dict[str, dict[str, Counter]] = {"train": defaultdict(Counter), "test": defaultdict(Counter)}
  for f in facts:
    if f.case_id in train_cases:
      for r in range(records_per_image):
        turns, kind = template_conversation(f, seed, r, max_turns, task_weights)
        train.append(T.record(f, turns, kind))
        for q, a in turns:
          qa["train"][T.classify_turn(q, a)][f.modality] += 1
    elif f.case_id in test_cases:
      for ti, task in enumerate(T.TASKS):
        rng = np.random.default_rng(_id_seed(seed, f.image_id, 1000 + ti))
        test[task].append(T.record(f, T.one_turn(f, task, rng), task))
        qa["test"][task][f.modality] += 1
  counts = {s: {t: dict(c) for t, c in d.items()} for s, d in qa.items()}
  return train, test, counts


# ---- driver -------------------------------------------------------------------------------------------
def _source_params(source: Any) -> dict[str, Any]:
  p = getattr(source, "params", None)
  return p() if callable(p) else {}


def generate_dataset(source: Any, out_dir: str | Path, *, seed: int = 0, test_fraction: float = 0.2,
                     max_turns: int = 3, workers: int = 1, limit: int | None = None, overwrite: bool = False,
                     records_per_image: int = 1, min_area: int | None = None,
                     connected_components: bool = True, progress: bool = False,
                     write_stats: bool = True, llm: LLMConfig | None = None,
                     task_weights: dict[str, float] | None = None) -> dict[str, Any]:
  """Builds the dataset folder at out_dir and returns its manifest.

  task_weights: how often each task is drawn for a training turn (default data_gen.tasks.TASK_WEIGHTS);
  the one-turn test files always hold every task.

  llm: write the records with an LLM (data_gen.llm; manifest["llm"] gets its stats) instead of templates.

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
                   llm: LLMConfig | None = None, task_weights: dict[str, float] | None = None) -> dict[str, Any]:
  skips = SkipReport()
  samples: Iterable[Sample] = iter(source)
  if limit is not None:
    samples = itertools.islice(samples, limit)
  jobs = ((s, str(tmp / "images"), min_area, connected_components) for s in _checked(samples, skips))
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

  def consume(results: Iterable) -> None:
    for fd, sk in results:
      for where, reason, detail in sk:
        skips.add(where, reason, detail)
      if fd is not None:
        facts.append(T.ImageFacts.from_dict(fd))
      if bar is not None:
        bar.update(1)

  if workers > 1:
    with multiprocessing.get_context().Pool(workers) as pool:
      consume(pool.imap(_process_star, jobs, chunksize=8))
  else:
    consume(map(_process_star, jobs))
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
    manifest["stats"] = _write_stats(tmp)
  write_json(tmp / MANIFEST, manifest)  # last: its presence marks the folder complete
  return manifest
