"""Scoring of prediction records the way the official BiRD scripts do: the records' JSONL layout, task
grouping, the official metrics per task, per-sample details, the text/CSV/JSON tables.

The library under `python -m bird_jax.eval` (the CLI) and `bird_jax.inference` (held-out evaluation of a
model); it imports neither, so both can build on it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bird_jax import metrics as M

# Keys written by the official infer.py, in its order; `task` is ours and optional.
RECORD_KEYS = ("id", "image", "question", "annotation", "response")
_TASK_IN_NAME = re.compile(r"(?:^|[_\-.])(VG|ROC|RO|GC|MII)(?=[_\-.]|$)")
# The paper and the official records call the region-classification task ROC; our code and files say RO.
TASK_ALIASES = {"ROC": "RO"}


def normalize_task(task: str) -> str:
  """Upper-cased task name with aliases resolved (ROC -> RO); unknown names pass through for the caller
  to reject with its own message."""
  task = str(task).upper()
  return TASK_ALIASES.get(task, task)


# ------------------------------------------------------------------------------------------ records io


def read_predictions_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Official predictions layout, one JSON object per line; blank lines ignored."""
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); write one JSON object per line") from e
      if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with id, image, annotation, response")
      _check_record(rec, f"{path}:{lineno}")
      records.append(rec)
  return records


def write_predictions_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
  """Write records in the official layout (id, image, question, annotation, response first, extras after)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for i, rec in enumerate(records):
      _check_record(rec, f"record {i}")
      ordered = {k: rec[k] for k in RECORD_KEYS if k in rec}
      ordered.update({k: v for k, v in rec.items() if k not in ordered})
      f.write(json.dumps(ordered) + "\n")
  return path


def _check_record(rec: Mapping[str, Any], where: str) -> None:
  missing = [k for k in ("annotation", "response") if k not in rec]
  if "image" not in rec and "id" not in rec:
    missing.append("image or id")
  if missing:
    raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; each record needs id/image (whose "
                     "prefix gives the modality), annotation (the reference) and response")


def record_name(rec: Mapping[str, Any]) -> str:
  """The string the modality is read from: `image`'s basename (as the official scripts), else `id`."""
  image = rec.get("image")
  return os.path.basename(str(image)) if image else str(rec["id"])


def records_to_samples(records: Sequence[Mapping[str, Any]]) -> list[M.Sample]:
  return [M.Sample(record_name(r), str(r["annotation"]), str(r["response"])) for r in records]


def records_from_triples(triples: Iterable[Sequence[Any]], task: str | None = None) -> list[dict[str, Any]]:
  """(id, reference, response) triples -> records in the official layout (image = id + '.png')."""
  out = []
  for t in triples:
    id_, ref, resp = t
    rec = {"id": str(id_), "image": f"{os.path.basename(str(id_))}.png", "question": "",
           "annotation": ref, "response": resp}
    if task:
      rec["task"] = task
    out.append(rec)
  return out


def task_from_filename(path: str | os.PathLike) -> str | None:
  found = _TASK_IN_NAME.findall(Path(path).name)
  return normalize_task(found[-1]) if found else None


def split_by_task(records: Sequence[Mapping[str, Any]], task_flag: str | None = None,
                  source: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
  """Group records by task: their `task` field, else `task_flag`, else a tag in `source`'s file name."""
  task_flag = normalize_task(task_flag) if task_flag else None
  default = task_flag if task_flag else (task_from_filename(source) if source else None)
  groups: dict[str, list[dict[str, Any]]] = {}
  for i, rec in enumerate(records):
    task = rec.get("task")
    where = f"{source or 'records'}: record {i}"
    if task is not None:
      task = normalize_task(task)
      if task_flag and task != task_flag:
        raise ValueError(
          f"{where}: task field {task!r} contradicts --task {task_flag}; drop --task or fix the field")
    else:
      task = default
    if task not in M.TASKS:
      raise ValueError(f"{where}: cannot tell the task (got {task!r}); add a `task` field (VG/RO/GC/MII), "
                       "pass --task, or name the file like preds_VG.jsonl")
    groups.setdefault(task, []).append(dict(rec))
  return groups


# --------------------------------------------------------------------------------------------- scoring


def score_predictions(records: Sequence[Mapping[str, Any]], task: str, *,
                      skip_metrics: Iterable[str] = (), meteor: Any = None) -> dict[str, Any]:
  """Official metrics for one task's records (dicts with id/image, annotation, response).

  skip_metrics: caption metrics to leave out (e.g. ["METEOR"] for fast in-training evals); meteor: a running
  pycocoevalcap Meteor() to reuse across calls instead of starting a JVM each time.
  """
  task = normalize_task(task)
  for i, rec in enumerate(records):
    _check_record(rec, f"record {i}")
  result = M.score_samples(records_to_samples(records), task, skip_metrics=skip_metrics, meteor=meteor)
  result["n_records"] = len(records)
  return result


def score_triples(triples: Iterable[Sequence[Any]], task: str, **kw: Any) -> dict[str, Any]:
  """Convenience: score (id, reference, response) triples."""
  return score_predictions(records_from_triples(triples), task, **kw)


def per_sample_details(records: Sequence[Mapping[str, Any]], task: str) -> list[dict[str, Any]]:
  """Each record plus `processed_response` and its own score (VG: best IoU per reference box and hits;
  RO: correct)."""
  out = []
  for rec in records:
    d = dict(rec)
    d["task"] = task
    d["modality"] = M.modality_of(record_name(rec))
    if task == "VG":
      v = M.vg_sample(str(rec["annotation"]), str(rec["response"]), sample_id=record_name(rec))
      d.update(processed_response=v["processed_response"], ious=v["ious"], hits=v["hits"],
               n_ref_boxes=len(v["ref_boxes"]), fallback=v["fallback"],
               pred_boxes=[list(b) if b is not None else None for b in v["pred_boxes"]])
    else:
      d["processed_response"] = M.postprocess_response(str(rec["response"]))
      if task == "RO":
        d["correct"] = M.roc_correct(str(rec["annotation"]), str(rec["response"]))
    out.append(d)
  return out


# ------------------------------------------------------------------------------------------- reporting

MEAN_OFFICIAL_LABEL = "mean (official: 8 modalities, empty = 0)"
MEAN_NONEMPTY_LABEL = "mean (non-empty modalities only)"


def _fmt(v: Any) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  return f"{v:.4f}"


def _as_task_map(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  return {results["task"]: dict(results)} if "task" in results else {k: dict(v) for k, v in results.items()}


def format_table(results: Mapping[str, Any]) -> str:
  """Text table per task x modality with both means. `results`: one score dict or {task: score dict}."""
  lines: list[str] = []
  for task, r in _as_task_map(results).items():
    metrics = list(r["metrics"])
    unit = "reference boxes" if task == "VG" else "samples"
    head = f"== {task}: {', '.join(metrics) or 'no metric available'}  (n = {unit})"
    if task == "VG":
      head += "; hit = any predicted box with IoU > 0.5"
    lines.append(head)
    label_w = len(MEAN_OFFICIAL_LABEL)
    col_w = max([9] + [len(k) + 1 for k in metrics])
    lines.append(f"{'modality':<{label_w}} {'n':>6}" + "".join(f"{k:>{col_w}}" for k in metrics))
    per = r["per_modality"]
    for m in M.MODALITIES:
      row = per[m]
      lines.append(f"{m:<{label_w}} {row['n']:>6}" + "".join(f"{_fmt(row.get(k)):>{col_w}}" for k in metrics))
    total = sum(per[m]["n"] for m in M.MODALITIES)
    mean_rows = ((MEAN_OFFICIAL_LABEL, r["mean_official"]), (MEAN_NONEMPTY_LABEL, r["mean_nonempty"]))
    for label, means in mean_rows:
      cells = "".join(f"{(_fmt(means[k]) if k in means else 'n/a'):>{col_w}}" for k in metrics)
      lines.append(f"{label:<{label_w}} {total:>6}" + cells)
    left_out = [k for k in metrics if k not in r.get("mean_metrics", metrics)]
    if left_out:
      lines.append(f"  ({', '.join(left_out)} left out of the {task} means, as the official script does)")
    for k, why in r.get("unavailable", {}).items():
      lines.append(f"  {k}: unavailable ({why})")
    if task == "VG" and r.get("info"):
      i = r["info"]
      lines.append(f"  skipped (reference has no box): {i['skipped_no_reference_box']}; responses without "
                   f"a box: {i['no_predicted_box']}; fallback pattern used: {i['fallback_used']}; "
                   f"unparsable predicted boxes: {i['unparsable_predicted_boxes']}")
    lines.append("")
  return "\n".join(lines)


def results_to_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Long format: task, modality, n, metric, value (modality mean_official / mean_nonempty for the means)."""
  rows = []
  for task, r in _as_task_map(results).items():
    per = r["per_modality"]
    for m in M.MODALITIES:
      for k in r["metrics"]:
        rows.append({"task": task, "modality": m, "n": per[m]["n"], "metric": k, "value": per[m].get(k)})
    total = sum(per[m]["n"] for m in M.MODALITIES)
    for label in ("mean_official", "mean_nonempty"):
      for k, v in r[label].items():
        rows.append({"task": task, "modality": label, "n": total, "metric": k, "value": v})
  return rows


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike,
                  sources: Sequence[str] = ()) -> tuple[Path, Path]:
  """metrics.json (full score dicts) and metrics.csv (long format); returns both paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  task_map = _as_task_map(results)
  json_path, csv_path = out / "metrics.json", out / "metrics.csv"
  payload = {"sources": list(sources), "labels": {"mean_official": MEAN_OFFICIAL_LABEL,
                                                  "mean_nonempty": MEAN_NONEMPTY_LABEL}, "results": task_map}
  json_path.write_text(json.dumps(payload, indent=2) + "\n")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["task", "modality", "n", "metric", "value"])
    w.writeheader()
    for row in results_to_rows(task_map):
      w.writerow({**row, "value": "" if row["value"] is None else row["value"]})
  return json_path, csv_path


def score_and_report(records_by_task: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike,
                     *, skip_metrics: Iterable[str] = (), sources: Sequence[str] = (),
                     image_loader: Callable[[Mapping[str, Any]], Any] | None = None,
                     max_gallery: int = 48, stream=None) -> dict[str, dict[str, Any]]:
  """Score every task, print the table, write metrics.json/csv, per-sample files and optionally a gallery."""
  stream = stream or sys.stdout
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  skip_metrics = list(skip_metrics)
  results: dict[str, dict[str, Any]] = {}
  details: list[dict[str, Any]] = []
  for task in [t for t in M.TASKS if t in records_by_task]:
    records = records_by_task[task]
    results[task] = score_predictions(records, task, skip_metrics=skip_metrics)
    task_details = per_sample_details(records, task)
    details.extend(task_details)
    with open(out / f"per_sample_{task}.jsonl", "w", encoding="utf-8") as f:
      for d in task_details:
        f.write(json.dumps(d) + "\n")
  print(format_table(results), file=stream)
  json_path, csv_path = write_results(results, out, sources)
  print(f"wrote {json_path} and {csv_path}", file=stream)
  if image_loader is not None:
    from bird_jax.report import write_gallery
    html = write_gallery(details, image_loader, out / "gallery", max_samples=max_gallery, results=results)
    print(f"wrote {html}", file=stream)
  return results
