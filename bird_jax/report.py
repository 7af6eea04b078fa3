"""Self-contained HTML gallery of evaluation samples and a per-modality bar chart.

Reference boxes are drawn in green, predicted boxes in red (VG: boxes of the annotation and of the
post-processed response; RO/GC: the region the question refers to is the reference). Images are embedded as
base64 PNG, so the HTML file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bird_jax import metrics as M

REF_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 20, 20)
# Metric plotted per task in the bar chart.
CHART_METRIC = {"VG": M.VG_METRIC, "RO": M.RO_METRIC, "GC": "CIDEr", "MII": "CIDEr"}

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def _to_pil(img: ImageLike) -> Image.Image:
  if isinstance(img, Image.Image):
    return img.convert("RGB")
  if isinstance(img, (str, os.PathLike)):
    with Image.open(img) as f:
      return f.convert("RGB")
  arr = np.asarray(img)
  if arr.dtype != np.uint8:  # float images (e.g. [0, 1]) are rescaled for display only
    lo, hi = float(arr.min()), float(arr.max())
    arr = ((arr - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr).convert("RGB")


def _to_pixels(box: Sequence[float], w: int, h: int, unit: bool) -> tuple[float, float, float, float]:
  # Med-GRIT boxes are integers in [0, 1000) relative to the image; 0..1 floats are accepted too.
  s = 1.0 if unit else 1000.0
  return (box[0] / s * w, box[1] / s * h, box[2] / s * w, box[3] / s * h)


def draw_boxes(img: ImageLike, ref_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float]],
               min_size: int = 320) -> Image.Image:
  """Copy of the image (upscaled to at least `min_size`) with reference and predicted boxes drawn."""
  im = _to_pil(img)
  if min(im.size) < min_size:
    f = min_size / min(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.NEAREST)
  coords = [v for b in list(ref_boxes) + list(pred_boxes) for v in b]
  unit = bool(coords) and max(abs(v) for v in coords) <= 1.0
  d = ImageDraw.Draw(im)
  width = max(2, min(im.size) // 160)
  # Predictions first and thicker: where a prediction coincides with the reference, both stay visible (PIL
  # grows the outline inwards).
  for boxes, colour, wd in ((pred_boxes, PRED_COLOUR, 2 * width), (ref_boxes, REF_COLOUR, width)):
    for b in boxes:
      x1, y1, x2, y2 = _to_pixels(b, im.width, im.height, unit)
      d.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=wd)
  return im


def _png_b64(im: Image.Image) -> str:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _sample_boxes(rec: Mapping[str, Any], task: str) -> tuple[list, list, str]:
  """Reference boxes, predicted boxes and a per-sample score line."""
  ref_text = str(rec.get("annotation", ""))
  resp = rec.get("processed_response")
  resp = str(resp) if resp is not None else M.postprocess_response(str(rec.get("response", "")))
  pred = [b for b in M.parse_boxes(resp) if b is not None]
  if task == "VG":
    ref = [b for b in M.parse_boxes(ref_text, fallback=False) if b is not None]
    ious = [max((M.box_iou(p, r) for p in pred), default=0.0) for r in ref]
    score = ("IoU per reference box: " + ", ".join(f"{v:.3f}{' (hit)' if v > 0.5 else ''}" for v in ious)
             if ious else "reference has no box (skipped by the metric)")
  else:
    ref = [b for b in M.parse_boxes(str(rec.get("question", "")), fallback=False) if b is not None]
    if task == "RO":
      ok = M.roc_correct(ref_text, resp, postprocess=False)
      score = "correct" if ok else "wrong"
    else:
      score = ""
  return ref, pred, score


def _task_of(rec: Mapping[str, Any], default: str | None) -> str:
  task = str(rec.get("task") or default or "").upper()
  if task not in M.TASKS:
    raise ValueError(f"gallery record {rec.get('id')!r}: no task; add a `task` field or pass task=")
  return task


def _spread(records: Sequence[Mapping[str, Any]], max_samples: int, task: str | None) -> list:
  # Round-robin over (task, modality) so a small gallery still shows every task and modality.
  groups: dict[tuple[str, str], list] = {}
  for rec in records:
    name = os.path.basename(str(rec.get("image") or rec.get("id")))
    key = (_task_of(rec, task), name.split("_")[0])
    groups.setdefault(key, []).append(rec)
  out: list = []
  queues = [list(g) for _, g in sorted(groups.items())]
  while len(out) < max_samples and any(queues):
    for q in queues:
      if q and len(out) < max_samples:
        out.append(q.pop(0))
  return out


def box_images(records: Sequence[Mapping[str, Any]], image_loader: Callable[[Mapping[str, Any]], ImageLike | None],
               max_samples: int, *, task: str | None = None, size: int = 256) -> list[tuple[str, np.ndarray]]:
  """(image name, uint8 HxWx3) of up to max_samples records spread over tasks and modalities, reference boxes in
  green and predicted in red (what TensorBoard shows beside the scores)."""
  out = []
  for rec in _spread(records, max_samples, task):
    src = image_loader(rec)
    if src is None:
      continue
    ref, pred, _ = _sample_boxes(rec, _task_of(rec, task))
    im = draw_boxes(src, ref, pred, min_size=size)
    out.append((os.path.basename(str(rec.get("image") or rec.get("id"))), np.asarray(im.convert("RGB"), np.uint8)))
  return out


def write_modality_chart(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
  """Grouped bars: per-modality score of each task (VG recall, RO accuracy, GC/MII CIDEr). None if empty."""
  # Drawn on a bare Figure (Agg canvas), not through pyplot: no global backend switch in the caller's process
  # (a notebook that trains and evaluates in-process keeps showing its own figures).
  from matplotlib.figure import Figure

  series = []
  for task, r in results.items():
    k = CHART_METRIC.get(task)
    if k and k in r.get("metrics", []):
      series.append((f"{task} {k}", [r["per_modality"][m].get(k) or 0.0 for m in M.MODALITIES]))
  if not series:
    return None
  fig = Figure(figsize=(10, 4))
  ax = fig.subplots()
  x = np.arange(len(M.MODALITIES))
  w = 0.8 / len(series)
  for i, (label, vals) in enumerate(series):
    ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label)
  ax.set_xticks(x, M.MODALITIES)
  ax.set_ylabel("score")
  ax.set_title("Per-modality scores (empty modality = 0)")
  ax.legend()
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)
  return path


def write_gallery(records: Sequence[Mapping[str, Any]],
                  image_loader: Callable[[Mapping[str, Any]], ImageLike | None],
                  out_dir: str | os.PathLike, max_samples: int = 48, *, task: str | None = None,
                  results: Mapping[str, Mapping[str, Any]] | None = None,
                  title: str = "Med-GRIT evaluation samples") -> Path:
  """Write out_dir/index.html (+ modality_scores.png); returns the HTML path.

  records: dicts with id/image, question, annotation, response (optionally processed_response and task).
  image_loader(record) -> PIL image, uint8 array, or image path; None leaves the sample without a picture.
  results: {task: score dict}; when omitted, VG and RO are scored from the records (captions need Java).
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if results is None:
    by_task: dict[str, list] = {}
    for rec in records:
      by_task.setdefault(_task_of(rec, task), []).append(rec)
    results = {}
    for t, recs in by_task.items():
      if t in ("VG", "RO"):
        samples = [M.Sample(os.path.basename(str(r.get("image") or r["id"])), str(r["annotation"]),
                            str(r["response"])) for r in recs]
        results[t] = M.score_samples(samples, t)
  chart = write_modality_chart(results, out / "modality_scores.png") if results else None

  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1em} .s{display:inline-block;vertical-align:top;"
           "width:360px;margin:6px;padding:6px;border:1px solid #ccc;font-size:12px} .s img{max-width:100%}"
           " .ref{color:#080} .pred{color:#c00} pre{white-space:pre-wrap;margin:2px 0}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           "<p><span class='ref'>&#9632; reference box</span> &nbsp; <span class='pred'>&#9632; predicted box"
           "</span></p>"]
  if chart is not None:
    parts.append(f"<img alt='per-modality scores' src='data:image/png;base64,{_png_b64(Image.open(chart))}'>")
  for rec in _spread(records, max_samples, task):
    t = _task_of(rec, task)
    ref, pred, score = _sample_boxes(rec, t)
    name = os.path.basename(str(rec.get("image") or rec.get("id")))
    src = image_loader(rec)
    img_html = "<p><i>image not found</i></p>"
    if src is not None:
      b64 = _png_b64(draw_boxes(src, ref, pred))
      img_html = f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
    resp = rec.get("processed_response", M.postprocess_response(str(rec.get("response", ""))))
    parts.append(
      f"<div class='s'><b>{t}</b> &middot; {html.escape(name)}<br>{img_html}"
      f"<pre><b>Q:</b> {html.escape(str(rec.get('question', '')))}</pre>"
      f"<pre class='ref'><b>reference:</b> {html.escape(str(rec.get('annotation', '')))}</pre>"
      f"<pre class='pred'><b>response:</b> {html.escape(str(resp))}</pre>"
      + (f"<p><b>{html.escape(score)}</b></p>" if score else "") + "</div>")
  parts.append("</body></html>")
  path = out / "index.html"
  path.write_text("\n".join(parts), encoding="utf-8")
  return path
