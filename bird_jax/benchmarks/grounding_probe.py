"""Does a trained model carry *where* through its vision path? Three numbers for a training checkpoint.

  python -m bird_jax.benchmarks.grounding_probe --config=cpu_demo --config.workdir=runs/cpu_demo

- query spread: std of the resampler's outputs across its queries within an image, next to the std across
  images. Near zero means the cross-attention pools the image permutation-invariantly: position is lost.
- digit NLL: next-token NLL of the coordinate digits of held-out VG answers with the real image and with a
  blank one. Equal values mean the boxes are written without looking at the image.
- box probe: R² of a ridge regression from the image features (n_queries × hidden) to the reference box.
- box errors (from the run's eval/predictions_VG.jsonl): recall@0.5 and mean edge error by reference-box
  size, how often each coordinate's hundreds digit is right, and the error of the last two digits when it
  is (uniform guessing gives ~33). Tells "cannot find the structure" from "finds it, writes it coarsely".
- box landing (the same file, with every structure of each test image: regenerated for a phantom set, else
  as far as the test records name them): per number of structures in the image, how many answers hit the
  named structure (IoU >= 0.5), hit another one instead, or hit none. Tells "cannot bind the name to a
  structure" (on another) from "cannot read a structure's box out at all" (on none).

These are the diagnostics behind docs/demo_findings.md.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def query_spread(features: np.ndarray) -> dict[str, float]:
  """features [N, n_queries, E] -> mean std across queries (within an image) and across images."""
  f = np.asarray(features, np.float64)
  return {"std_across_queries": float(f.std(axis=1).mean()), "std_across_images": float(f.std(axis=0).mean())}


def ridge_r2(x: np.ndarray, y: np.ndarray, *, train_fraction: float = 0.67, lam: float = 10.0) -> np.ndarray:
  """Held-out R² per target column of a ridge regression (features standardised on the training part)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64)
  n = int(len(x) * train_fraction)
  if n < 2 or len(x) - n < 2:
    raise ValueError(f"need at least 4 samples for a train/test split, got {len(x)}")
  mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
  a, b = (x[:n] - mu) / sd, (x[n:] - mu) / sd
  w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[:n] - y[:n].mean(0)))
  pred = b @ w + y[:n].mean(0)
  return 1.0 - ((pred - y[n:]) ** 2).sum(0) / ((y[n:] - y[n:].mean(0)) ** 2).sum(0)


def box_errors(predictions: list[dict[str, Any]],
               size_edges: tuple[float, ...] = (0, 150, 250, 350, 1000)) -> dict[str, Any]:
  """VG predictions ({"annotation", "response"} per line of predictions_VG.jsonl) -> where the boxes go wrong.

  Pairs each reference's first box with the response's first box (a missing box counts as a miss with
  error 1000 per edge). Size = sqrt(area) of the reference box in the [0, 1000) frame."""
  from bird_jax.metrics import box_iou, parse_boxes

  buckets = {f"{lo:g}-{hi:g}": {"n": 0, "hits": 0, "edge_error_sum": 0.0}
             for lo, hi in zip(size_edges, size_edges[1:], strict=False)}
  names = list(buckets)
  hundreds, low_err = [], []
  for p in predictions:
    ref = next((b for b in parse_boxes(p["annotation"]) if b is not None), None)
    if ref is None:
      continue
    pred = next((b for b in parse_boxes(p["response"]) if b is not None), None)
    if pred is not None:
      for r, q in zip(ref, pred, strict=True):
        hundreds.append(int(r) // 100 == int(q) // 100)
        if hundreds[-1]:
          low_err.append(abs(int(r) % 100 - int(q) % 100))
    side = math.sqrt(max(0.0, (ref[2] - ref[0]) * (ref[3] - ref[1])))
    bucket = buckets[names[min(max(bisect.bisect_right(size_edges, side) - 1, 0), len(names) - 1)]]
    bucket["n"] += 1
    bucket["hits"] += box_iou(pred, ref) > 0.5  # the official hit test
    bucket["edge_error_sum"] += 1000.0 if pred is None else float(np.mean(np.abs(np.subtract(ref, pred))))
  n = sum(b["n"] for b in buckets.values())
  if not n:
    raise ValueError("no VG prediction with a parsable reference box; pass a run's eval/predictions_VG.jsonl")
  return {
    "n": n,
    "hundreds_digit_right": float(np.mean(hundreds)) if hundreds else 0.0,
    "last_two_digits_error": float(np.mean(low_err)) if low_err else None,
    "by_size": {k: {"n": b["n"], "recall@0.5": b["hits"] / b["n"], "mean_edge_error": b["edge_error_sum"] / b["n"]}
                for k, b in buckets.items() if b["n"]},
  }


def image_key(question: str) -> str:
  """The image a question is about: the path inside its `<img>` span (the whole text if there is none)."""
  m = re.search(r"<img>(.*?)</img>", question)
  return m.group(1) if m else question


def structure_boxes(conversations: Iterable[tuple[str, str]]) -> dict[str, list[tuple[float, ...]]]:
  """(question with its `<img>` span, whole conversation text) per test record -> image -> the distinct boxes
  its records name (each structure appears in some record: its VG answer, RO question or GC caption)."""
  from bird_jax.metrics import parse_boxes

  found: dict[str, set[tuple[float, ...]]] = {}
  for question, text in conversations:
    found.setdefault(image_key(question), set()).update(b for b in parse_boxes(text, fallback=False) if b)
  return {k: sorted(v) for k, v in found.items()}


def phantom_structure_boxes(manifest: dict[str, Any], images: set[str] | None = None
                            ) -> dict[str, list[tuple[float, ...]]]:
  """Every structure's box per image of a phantom Med-GRIT folder, regenerated from its manifest's parameters
  (the phantom is deterministic) with data_gen's own mask-to-box rule. Keys as in the questions:
  "images/<image_id>.png"; `images` limits the result to those keys. The test records alone may not name
  every structure of an image (one question per task)."""
  from data_gen.boxes import mask_to_boxes, min_area_for
  from data_gen.sources.phantom import PhantomSource

  params = manifest["params"]
  if params.get("source") != "phantom":
    raise ValueError(f"manifest of a {params.get('source')!r} set: only phantom sets can be regenerated")
  out: dict[str, list[tuple[float, ...]]] = {}
  for sample in PhantomSource(**params["source_params"]):
    key = f"images/{sample.image_id}.png"
    if images is not None and key not in images:
      continue
    h, w = sample.image.shape[:2]
    area = min_area_for(h, w) if params.get("min_area") is None else params["min_area"]
    out[key] = sorted({tuple(b) for inst in sample.instances for b in mask_to_boxes(
      inst.mask, min_area=area, connected_components=params.get("connected_components", True))})
  return out


def box_landing(predictions: list[dict[str, Any]], structures: dict[str, list[tuple[float, ...]]]) -> dict:
  """VG predictions ({"question", "annotation", "response"}) -> per structure count: {n, named, other, none,
  no_box}: where the first predicted box lands (IoU >= 0.5 with the named structure, with another one of
  the image, with none; or no parsable box)."""
  from bird_jax.metrics import box_iou, parse_boxes

  out: dict[int, dict[str, int]] = {}
  for p in predictions:
    ref = next((b for b in parse_boxes(p["annotation"]) if b is not None), None)
    if ref is None:
      continue
    others = [b for b in structures.get(image_key(p["question"]), []) if b != tuple(ref)]
    row = out.setdefault(len(others) + 1, {"n": 0, "named": 0, "other": 0, "none": 0, "no_box": 0})
    row["n"] += 1
    pred = next((b for b in parse_boxes(p["response"]) if b is not None), None)
    if pred is None:
      row["no_box"] += 1
    elif box_iou(pred, ref) >= 0.5:
      row["named"] += 1
    elif any(box_iou(pred, b) >= 0.5 for b in others):
      row["other"] += 1
    else:
      row["none"] += 1
  return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from bird_jax.config_util import parse_config_flags
  from bird_jax.data.image import preprocess_image
  from bird_jax.data.pipeline import as_turn_pairs, eval_examples, load_split, make_train_dataset
  from bird_jax.model import encode_images
  from bird_jax.run_state import load_checkpoint
  from bird_jax.train_step import token_nll

  config, _, rest = parse_config_flags(sys.argv[1:] if argv is None else argv)
  n_images = int(rest[0].split("=", 1)[1]) if rest and rest[0].startswith("--images=") else 300
  model, params, tok, data, mesh, meta = load_checkpoint(config, config.workdir + "/checkpoints")
  cfg = model.config
  test = load_split(str(data.tfds_dir), "test", config.data.builder_config)
  examples = list(itertools.islice(eval_examples(test, "VG"), n_images))
  pixels = np.stack([preprocess_image(e["image"], cfg.image_size) for e in examples])
  encode = jax.jit(lambda p, px: encode_images(cfg, p, px))
  feats = np.concatenate([np.asarray(encode(params["visual"], jnp.asarray(pixels[i:i + 64])))
                          for i in range(0, len(pixels), 64)])
  boxes = np.array([[int(v) for v in re.findall(r"\d+", e["reference"].split("<box>", 1)[1])[:4]]
                    for e in examples], np.float64) / 1000.0

  batch = next(iter(make_train_dataset(test, tok, seq_len=config.data.seq_len, image_size=cfg.image_size,
                                       batch_size=32, seed=1, system=config.data.system_prompt or None)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  digit_ids = np.array([i for i in range(tok.vocab_size) if tok.decode([i]) in "0123456789" and tok.decode([i])])
  digits = jnp.asarray(np.isin(np.asarray(batch["labels"]), digit_ids)) * batch["loss_mask"]
  nll = jax.jit(lambda p, b: token_nll(model, p, b))
  real = nll(params, dict(batch, loss_mask=digits))
  blank = nll(params, dict(batch, loss_mask=digits, pixel_values=jnp.zeros_like(batch["pixel_values"])))
  result = {
    "step": meta["step"],
    **query_spread(feats),
    "digit_nll_real_image": float(real[0] / jnp.maximum(real[1], 1)),
    "digit_nll_blank_image": float(blank[0] / jnp.maximum(blank[1], 1)),
    "box_probe_r2": [round(float(v), 3) for v in ridge_r2(feats, boxes)],
  }
  preds_file = Path(config.workdir) / "eval" / "predictions_VG.jsonl"
  if preds_file.exists():
    preds = [json.loads(line) for line in preds_file.read_text().splitlines()]
    result["box_errors"] = box_errors(preds)
    manifest_file = data.raw_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    if manifest.get("params", {}).get("source") == "phantom":
      structures = phantom_structure_boxes(manifest, {image_key(p["question"]) for p in preds})
    else:  # only the structures the test records name
      pairs = (as_turn_pairs(test[i]["conversations"]) for i in range(len(test)))
      structures = structure_boxes((turns[0][0], " ".join(f"{q} {a}" for q, a in turns)) for turns in pairs)
    result["box_landing"] = box_landing(preds, structures)
  for k, v in result.items():
    print(f"{k:24s} {v}")
  return result


if __name__ == "__main__":
  main()
