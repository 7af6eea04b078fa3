"""Med-GRIT evaluation: score prediction files the way the official BiRD scripts do, print and save tables.

Scoring mode works on any predictions JSONL in the official layout, e.g. one written by the original
PaddleMIX `tests/models/BiRD/infer.py`: one JSON object per line with id, image, question, annotation,
response.

  python -m bird_jax.eval --predictions=preds_VG.jsonl [--predictions=...] [--task VG|RO|GC|MII] (ROC = RO) [--out DIR]
      [--skip_metrics=METEOR] [--gallery_images=DATASET/images]

The task of a record is its `task` field, else --task, else a VG/RO/GC/MII tag in the file name
(`..._VG_...`, `test_VG.jsonl`). Writes DIR/metrics.json, DIR/metrics.csv and DIR/per_sample_<TASK>.jsonl
(processed responses and per-sample IoU / correctness); with --gallery_images also DIR/gallery/index.html.

Model-running mode restores a training checkpoint, generates greedily (max_new_tokens 80, 100 for MII) and
scores config.eval.tasks, next to the image-blind baselines of the training split: constant answers (the mean
box, the majority class) and the class prior (the named class's mean box; the class whose mean box is nearest):

  python -m bird_jax.eval --config=cpu_demo --checkpoint=runs/cpu_demo/checkpoints [--split=test]
      [--config.eval.tasks="('VG','RO','GC','MII')"] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bird_jax import metrics as M

# The scoring library lives in bird_jax.scoring (below this CLI and bird_jax.inference); its names stay
# importable from here because `from bird_jax import eval as E; E.score_predictions(...)` is public usage.
from bird_jax.scoring import (
  MEAN_NONEMPTY_LABEL,
  MEAN_OFFICIAL_LABEL,
  RECORD_KEYS,
  TASK_ALIASES,
  format_table,
  normalize_task,
  per_sample_details,
  read_predictions_jsonl,
  record_name,
  records_from_triples,
  records_to_samples,
  results_to_rows,
  score_and_report,
  score_predictions,
  score_triples,
  split_by_task,
  task_from_filename,
  write_predictions_jsonl,
  write_results,
)

__all__ = [
  "MEAN_NONEMPTY_LABEL", "MEAN_OFFICIAL_LABEL", "RECORD_KEYS", "TASK_ALIASES", "build_parser",
  "folder_image_loader", "format_table", "main", "normalize_task", "per_sample_details",
  "read_predictions_jsonl", "record_name", "records_from_triples", "records_to_samples", "results_to_rows",
  "run_model_eval", "run_scoring", "score_and_report", "score_predictions", "score_triples", "split_by_task",
  "task_from_filename", "write_predictions_jsonl", "write_results",
]

# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bird_jax.eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", action="append", default=[],
                 help="predictions JSONL (official layout), repeatable; switches to scoring mode")
  p.add_argument("--task", choices=M.TASKS, type=normalize_task,
                 help="task of records without a `task` field (ROC, the paper's name, is read as RO)")
  p.add_argument("--out", help="output folder (default: <first predictions file without .jsonl>_scores)")
  p.add_argument("--skip_metrics", default="", help="comma list of caption metrics to skip, e.g. METEOR")
  p.add_argument("--gallery_images", help="folder holding the images (by `image` name or id + .png): "
                 "also write an HTML gallery")
  p.add_argument("--max_gallery", type=int, default=48)
  # Model-running mode, wired by the trainer (see run_model_eval).
  p.add_argument("--config", help="model-running mode: training config")
  p.add_argument("--checkpoint", help="model-running mode: checkpoint to evaluate")
  p.add_argument("--split", default="test", help="model-running mode: dataset split")
  return p


def folder_image_loader(root: str | os.PathLike) -> Callable[[Mapping[str, Any]], Path | None]:
  """Looks a record's image up in `root` by its `image` basename, else `<id>.png`."""
  root = Path(root)

  def load(rec: Mapping[str, Any]) -> Path | None:
    names = [os.path.basename(str(rec["image"]))] if rec.get("image") else []
    names.append(f"{rec.get('id')}.png")
    for n in names:
      if (root / n).exists():
        return root / n
    return None

  return load


def run_scoring(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
  by_task: dict[str, list[dict[str, Any]]] = {}
  for path in args.predictions:
    if not Path(path).is_file():
      raise FileNotFoundError(f"predictions file {path} does not exist; pass --predictions=FILE.jsonl (one JSON "
                              "object per line: id, image, annotation, response)")
  for path in args.predictions:
    for task, recs in split_by_task(read_predictions_jsonl(path), args.task, path).items():
      by_task.setdefault(task, []).extend(recs)
  first = Path(args.predictions[0])
  out = Path(args.out) if args.out else first.with_name(first.name.removesuffix(".jsonl") + "_scores")
  loader = folder_image_loader(args.gallery_images) if args.gallery_images else None
  skip = [s.strip() for s in args.skip_metrics.split(",") if s.strip()]
  return score_and_report(by_task, out, skip_metrics=skip, sources=list(args.predictions),
                          image_loader=loader, max_gallery=args.max_gallery)


def run_model_eval(args: argparse.Namespace, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Restores a training checkpoint, generates greedily on the split and scores it (bird_jax.inference)."""
  from bird_jax.config_util import parse_config_flags
  from bird_jax.inference import evaluate_checkpoint

  if not (args.config and args.checkpoint):
    raise ValueError("model-running mode needs both --config=NAME and --checkpoint=<workdir>/checkpoints")
  config, name, _ = parse_config_flags([f"--config={args.config}", *overrides])
  result = evaluate_checkpoint(config, name, args.checkpoint, split=args.split,
                               out_dir=Path(args.out) if args.out else None)
  print(format_table(result["results"]))
  print(result["table"])
  return result


def main(argv: Sequence[str] | None = None) -> int:
  args, extra = build_parser().parse_known_args(argv)
  overrides = [a for a in extra if a.startswith("--config.")]
  if len(overrides) != len(extra):
    build_parser().error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides)}")
  try:
    if args.predictions:
      run_scoring(args)
    elif args.config or args.checkpoint:
      run_model_eval(args, overrides)
    else:
      build_parser().error("pass --predictions=FILE.jsonl (scoring) or --config/--checkpoint (model mode)")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
