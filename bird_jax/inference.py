"""Held-out evaluation of a model on the med_grit test split: prompts → batched greedy generation → the
paper's metrics, next to the trivial baselines computed from the training split.

Used at the end of `bird_jax.train` and by `python -m bird_jax.eval --config=… --checkpoint=…`. Scoring is
`bird_jax.scoring`'s and a checkpoint is restored by `bird_jax.run_state`; neither imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bird_jax import metrics as M
from bird_jax import scoring
from bird_jax.data.image import preprocess_image
from bird_jax.data.pipeline import as_text, as_turn_pairs, eval_examples, load_split
from bird_jax.tokenizer import Tokenizer, chat_prompt_ids

log = logging.getLogger("bird_jax")

def training_baselines(train_source: Any) -> tuple[dict[str, str], M.ClassPrior | None]:
  """What a model that ignores the image would answer, from the training split's VG and RO turns:
  - constant answers: the mean training box (class-agnostic) for VG, the most frequent class for RO;
  - the class prior (reads the question, not the image): the named class's mean box for VG, the class of the
    image's modality whose mean box centre is nearest the asked box for RO. None without VG/RO turns."""
  from data_gen.tasks import classify_turn

  answers: dict[str, list[str]] = {"VG": [], "RO": []}
  labelled: list[tuple[str, str, M.Box]] = []
  for i in range(len(train_source)):
    record = train_source[i]
    modality = as_text(record["modality"])
    for user, answer in as_turn_pairs(record["conversations"]):
      task = classify_turn(user, answer)
      if task not in answers:
        continue
      answers[task].append(answer)
      boxes = [b for b in M.parse_boxes(answer if task == "VG" else user, fallback=False) if b is not None]
      name = (M.REF_PATTERN.findall(answer) or [""])[0] if task == "VG" else answer
      if boxes and name.strip():
        labelled.append((modality, name, boxes[0]))
  constant = {
    "VG": M.mean_box_baseline(answers["VG"]) if answers["VG"] else "",
    "RO": M.most_frequent_class_baseline(answers["RO"]) if answers["RO"] else "",
  }
  return constant, (M.class_prior(labelled) if labelled else None)


def prior_answer(task: str, example: dict[str, Any], prior: M.ClassPrior | None) -> str:
  if prior is None:
    return ""
  if task == "VG":
    return M.class_prior_vg_answer(example["question"], prior)
  if task == "RO":
    return M.class_prior_ro_answer(example["question"], example["modality"], prior)
  return ""


def _batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def generate_answers(model, params, tokenizer: Tokenizer, examples: Sequence[dict[str, Any]], *, image_size: int,
                     batch_size: int, max_new_tokens: int, system: str | None) -> list[str]:
  """Greedy answers (decoded with special tokens kept, as the official scripts do) for one-turn examples."""
  from bird_jax.generate import generate

  stop_ids = [tokenizer.special["im_end"], tokenizer.special["endoftext"]]
  answers: list[str] = []
  for chunk in _batched(list(examples), batch_size):
    prompts = [chat_prompt_ids(tokenizer, [], ex["question"], system=system) for ex in chunk]
    pixels = np.stack([preprocess_image(ex["image"], image_size) for ex in chunk])[:, None]
    if len(chunk) < batch_size:  # one compiled shape for every batch
      pad = batch_size - len(chunk)
      prompts = prompts + [prompts[-1]] * pad
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    new_tokens = generate(model, params, prompts, pixels, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                          pad_id=tokenizer.pad_id)
    answers += [tokenizer.decode(t) for t in new_tokens[:len(chunk)]]
  return answers


def evaluate_on_test(model, params, tokenizer: Tokenizer, tfds_dir: Path, config, train_source: Any, *,
                     out_dir: Path, split: str = "test", max_examples: int | None = None,
                     full_report: bool = True, box_images: int = 0) -> dict[str, Any]:
  """Scores config.eval.tasks on the held-out split; writes predictions/metrics under out_dir and returns
  {"results", "baselines", "table", "summary"}. MII gets config.eval.max_new_tokens_mii (the paper: 100).

  max_examples: per task, overriding config.eval.max_examples. full_report=False (the evaluations during
  training) skips the logged official tables and the HTML gallery. box_images > 0: the result's "box_images"
  holds that many VG samples drawn with their reference and predicted boxes, [(name, uint8 HxWx3)].
  """
  limit = config.eval.max_examples if max_examples is None else max_examples
  test_source = load_split(str(tfds_dir), split, config.data.builder_config)
  baseline_answers, prior = training_baselines(train_source)
  records_by_task: dict[str, list[dict[str, Any]]] = {}
  baseline_by_task: dict[str, list[dict[str, Any]]] = {}
  prior_by_task: dict[str, list[dict[str, Any]]] = {}
  for task in map(scoring.normalize_task, config.eval.tasks):
    examples = list(eval_examples(test_source, task))
    if limit:
      examples = examples[:limit]
    if not examples:
      log.warning("no %s records in the test split; skipping", task)
      continue
    log.info("evaluating %s on %d held-out examples", task, len(examples))
    max_new = config.eval.max_new_tokens_mii if task == "MII" else config.eval.max_new_tokens
    answers = generate_answers(model, params, tokenizer, examples, image_size=model.config.image_size,
                               batch_size=config.eval.batch_size, max_new_tokens=max_new,
                               system=config.data.system_prompt or None)
    records_by_task[task] = [
      {"id": ex["id"], "image": ex["id"] + ".png", "question": ex["question"], "annotation": ex["reference"],
       "response": ans, "task": task} for ex, ans in zip(examples, answers, strict=True)]
    if baseline_answers.get(task):
      baseline_by_task[task] = [dict(r, response=baseline_answers[task]) for r in records_by_task[task]]
    if task in ("VG", "RO") and prior is not None:
      prior_by_task[task] = [dict(r, response=prior_answer(task, ex, prior))
                             for ex, r in zip(examples, records_by_task[task], strict=True)]
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {t: scoring.score_predictions(recs, t) for t, recs in records_by_task.items()}
  baselines = {t: scoring.score_predictions(recs, t) for t, recs in baseline_by_task.items()}
  priors = {t: scoring.score_predictions(recs, t) for t, recs in prior_by_task.items()}
  for task, recs in records_by_task.items():
    scoring.write_predictions_jsonl(out_dir / f"predictions_{task}.jsonl", recs)
  scoring.write_results(results, out_dir)
  if baselines:
    scoring.write_results(baselines, out_dir / "baseline")
  if priors:
    scoring.write_results(priors, out_dir / "baseline_class_prior")
  if full_report:
    log.info("official tables:\n%s", scoring.format_table(results))
    _write_gallery(records_by_task, test_source, out_dir)
  table = format_comparison(results, baselines, baseline_answers, priors)
  summary = {t: {"model": r["mean_nonempty"], "baseline": baselines.get(t, {}).get("mean_nonempty"),
                 "class_prior": priors.get(t, {}).get("mean_nonempty")}
             for t, r in results.items()}
  out = {"results": results, "baselines": baselines, "class_prior": priors, "table": table, "summary": summary}
  if box_images and records_by_task.get("VG"):
    from bird_jax.report import box_images as draw

    images = {ex["id"]: ex["image"] for ex in eval_examples(test_source, "VG")}
    out["box_images"] = draw(records_by_task["VG"], lambda rec: images.get(rec["id"]), box_images, task="VG")
  return out


def _write_gallery(records_by_task: dict[str, list[dict[str, Any]]], test_source: Any, out_dir: Path) -> None:
  try:
    from bird_jax.report import write_gallery
  except ImportError:
    return
  images = {ex["id"]: ex["image"] for ex in eval_examples(test_source, "VG")}
  vg = records_by_task.get("VG", [])
  if vg:
    write_gallery(scoring.per_sample_details(vg, "VG"), lambda rec: images.get(rec["id"]), out_dir / "gallery",
                  max_samples=48)


def format_comparison(results: dict[str, Any], baselines: dict[str, Any], baseline_answers: dict[str, str],
                      priors: dict[str, Any] | None = None) -> str:
  """Per-modality model vs the constant baseline (and the class prior where scored), for the modalities
  present in the test split."""
  priors = priors or {}

  def cell(scores: dict[str, Any] | None, metric: str, modality: str | None = None, missing: str = "") -> str:
    if not scores:
      return missing
    value = (scores["per_modality"][modality] if modality else scores["mean_nonempty"]).get(metric)
    return f"{float('nan') if value is None else value:>10.3f}"

  nan = f"{'nan':>10}"
  lines = []
  for task, r in results.items():
    metric = M.VG_METRIC if task == "VG" else M.RO_METRIC if task == "RO" else "CIDEr"
    b, p = baselines.get(task), priors.get(task)
    lines.append(f"{task} {metric} on held-out cases (baseline: always answer {baseline_answers.get(task)!r}"
                 + ("; class prior: " + ("the named class's mean training box" if task == "VG" else
                                         "the class whose mean training box is nearest") if p else "") + ")")
    lines.append(f"  {'modality':<12}{'n':>6}{'model':>10}{'baseline':>10}" + (f"{'prior':>10}" if p else ""))
    for m in M.MODALITIES:
      row = r["per_modality"][m]
      if row["n"]:
        lines.append(f"  {m:<12}{row['n']:>6}{row[metric]:>10.3f}{cell(b, metric, m, nan)}{cell(p, metric, m)}")
    lines.append(f"  {'mean*':<12}{'':>6}{cell(r, metric)}{cell(b, metric, missing=nan)}{cell(p, metric)}"
                 + "   (*over the modalities present; the official 8-modality mean is in eval/metrics.json)")
  return "\n".join(lines)


def evaluate_checkpoint(config, config_name: str, checkpoint: str | Path, *, split: str = "test",
                        out_dir: Path | None = None) -> dict[str, Any]:
  """`python -m bird_jax.eval --config=… --checkpoint=…`: restore a training checkpoint and score
  config.eval.tasks on `split`."""
  import jax

  from bird_jax.run_state import load_checkpoint

  model, params, tokenizer, data, mesh, meta = load_checkpoint(config, checkpoint)
  log.info("evaluating %s step %d (%s) on split %r", checkpoint, meta["step"], meta.get("config"), split)
  train_source = load_split(str(data.tfds_dir), "train", config.data.builder_config)
  out_dir = out_dir or Path(config.workdir).absolute() / f"eval_step{meta['step']}"
  with jax.set_mesh(mesh):
    return evaluate_on_test(model, params, tokenizer, data.tfds_dir, config, train_source, out_dir=out_dir,
                            split=split)
