"""The trainer's paths beyond the train step, at toy size and with exact checks: model-mode evaluation (its
predictions rescored by hand; the constant and class-prior baselines recomputed from the training file), export
(the exported weights and logits are the trained ones), resume (1 -> 2 -> 3 -> 6 steps equals 6 steps: same
batches, losses and state), the curriculum switch (which set each step's rows come from) and eval.every (scores at
exactly the configured steps, equal to a standalone evaluation of that step's checkpoint).

One toy run (6 steps, batch 8, a 2-layer model, the phantom set at 8 cases) is shared by the tests; the resume
test adds one run stopped and resumed three times. All in-process, Grain without workers, the data prepared once
and copied per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from bird_jax.config_util import parse_config_flags

N_STEPS = 6
EVERY = 2  # eval.every
EVERY_EXAMPLES = 3  # eval.every_max_examples
# data.curriculum.steps=2 then keep=0.5: main-stage steps 3..6 alternate main / first-stage set (reads_kept_set:
# 0-based step s reads the first-stage set when floor((s + 1) / 2) > floor(s / 2), i.e. s odd).
EXPECTED_DATA = ["first", "first", "main", "first", "main", "first"]

TOY = [
  "--config.data.phantom.cases=8", "--config.data.phantom.slices=2",
  # classes around their own homes: the class prior then scores above 0 on this tiny test split (else its
  # check would compare zeros with zeros)
  "--config.data.phantom.layout=anatomical", "--config.data.worker_count=0",
  "--config.model.hidden_size=64", "--config.model.num_layers=2", "--config.model.num_heads=2",
  "--config.model.intermediate_size=128", "--config.model.vision_width=32", "--config.model.vision_layers=1",
  "--config.model.vision_heads=2", "--config.model.image_size=32", "--config.model.patch_size=8",
  "--config.model.vision_pos_grid=4", "--config.model.n_queries=16", "--config.model.resampler_heads=2",
  "--config.train.batch_size=8", f"--config.train.steps={N_STEPS}", "--config.train.log_every=1",
  "--config.train.checkpoint_every=2", "--config.train.max_to_keep=10", "--config.train.max_minutes=0.0",
  # a constant rate: a 1-step run resumed to 2, 3 and 6 steps then has the 6-step run's schedule
  "--config.train.schedule=constant", "--config.train.warmup_ratio=0.0",
  "--config.data.curriculum.steps=2", "--config.data.curriculum.keep=0.5",
  "--config.eval.max_examples=0", "--config.eval.batch_size=16", "--config.eval.max_new_tokens=24",
  f"--config.eval.every_max_examples={EVERY_EXAMPLES}",
]
PREPARED = ("data", "tokenizer", "tfds", "tfds_curriculum")


def toy_flags(workdir: Path, *extra: str) -> list[str]:
  return [f"--config.workdir={workdir}", *TOY, *extra]


def toy_config(workdir: Path, *extra: str):
  config, name, rest = parse_config_flags(["--config=cpu_demo", *toy_flags(workdir, *extra)])
  assert not rest
  return config, name


@contextlib.contextmanager
def restored_logging():
  """train_and_evaluate sets up logging for a CLI process (root handlers, a train.log handler); undo it."""
  root, ours = logging.getLogger(), logging.getLogger("bird_jax")
  root_handlers, root_level, our_handlers = list(root.handlers), root.level, list(ours.handlers)
  try:
    yield
  finally:
    for handler in ours.handlers:
      if handler not in our_handlers:
        handler.close()
    root.handlers[:], ours.handlers[:] = root_handlers, our_handlers
    root.setLevel(root_level)


def train(workdir: Path, prepared: Path, *extra: str) -> dict[str, Any]:
  """One in-process `python -m bird_jax.train --config=cpu_demo <TOY> <extra>`, recording what the step is
  given: {"summary", "batches" (the pipeline's host batches, one per step), "state" (the live state after the
  last step)}."""
  import bird_jax.train as T

  for sub in PREPARED:  # the prepared set in place: prepare() finds it and skips every step
    if not (workdir / sub).exists():
      shutil.copytree(prepared / sub, workdir / sub)
  seen: dict[str, Any] = {"batches": []}
  real_build, real_host_batch = T.build_train_step, T.host_batch

  def build(*args, **kwargs):
    parts = real_build(*args, **kwargs)
    step = parts.step

    def recording_step(state, batch):
      seen["state"], metrics = step(state, batch)
      return seen["state"], metrics

    return dataclasses.replace(parts, step=recording_step)

  def host_batch(batch, model_cfg):
    seen["batches"].append({k: np.array(v) for k, v in batch.items()})
    return real_host_batch(batch, model_cfg)

  config, name = toy_config(workdir, *extra)
  with pytest.MonkeyPatch.context() as mp, restored_logging():
    mp.setattr(T, "build_train_step", build)
    mp.setattr(T, "host_batch", host_batch)
    seen["summary"] = T.train_and_evaluate(config, name)
  seen["state"] = jax.device_get(seen["state"])
  return seen


def read_jsonl(path: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(workdir: Path) -> list[tuple]:
  return [(m["step"], m["loss"], m["grad_norm"], m["data"]) for m in read_jsonl(workdir / "metrics.jsonl")]


def restore_state(workdir: Path, step: int):
  """(state as numpy, data_state, meta) of checkpoint `step` of a toy run, restored as training does."""
  from bird_jax import sharding as shd
  from bird_jax.checkpoint import Checkpointer
  from bird_jax.prepare import prepare
  from bird_jax.train_step import build_optimizer, create_state_shardings, model_config_from

  config, _ = toy_config(workdir)
  model_cfg = model_config_from(config, prepare(config, workdir, for_training=False).tokenizer)
  mesh = shd.make_mesh(config.mesh.shape)
  _, _, abstract, shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(config.train, p, config.train.steps), mesh,
    shd.rules_from_config(config.mesh.rules), config.seed)
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=10)
  try:
    state, data_state, meta = ckpt.restore(shd.abstract_with_shardings(abstract, shardings), step)
  finally:
    ckpt.close()
  return jax.device_get(state), data_state, meta


def assert_trees_equal(a, b) -> None:
  """Same structure, dtypes and values, bit for bit."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------- scoring by hand (no bird_jax.metrics rules)

MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")  # the official order
BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
REF = re.compile(r"<ref>(.*?)</ref>")


def int_boxes(text: str) -> list[tuple[float, ...]]:
  return [tuple(float(v) for v in m) for m in BOX.findall(text)]


def iou(a, b) -> float:
  inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def modality(record_id: str) -> str:
  return record_id.split("_")[0]


def hand_scores(task: str, rows: list[tuple[str, str, str]]) -> dict[str, Any]:
  """(id, reference, response) rows -> {"per_modality", "mean_official", "mean_nonempty"} by the official
  rules: VG recall = reference boxes hit by some predicted box with IoU > 0.5 (strict) / reference boxes,
  predicted boxes read from the cleaned-up response; RO accuracy = every space-separated word of the
  reference in the lowercased response."""
  from bird_jax.metrics import parse_boxes, postprocess_response

  metric = "recall@0.5" if task == "VG" else "accuracy"
  n, good = dict.fromkeys(MODALITIES, 0), dict.fromkeys(MODALITIES, 0)
  for record_id, reference, response in rows:
    m = modality(record_id)
    if task == "VG":
      preds = [b for b in parse_boxes(postprocess_response(response)) if b is not None]
      for ref in int_boxes(reference):
        n[m] += 1
        good[m] += any(iou(p, ref) > 0.5 for p in preds)
    else:
      n[m] += 1
      good[m] += all(word in postprocess_response(response).lower() for word in reference.lower().split(" "))
  per = {m: {"n": n[m], metric: good[m] / n[m] if n[m] else None} for m in MODALITIES}
  present = [per[m][metric] for m in MODALITIES if n[m]]
  return {"per_modality": per,
          "mean_official": {metric: sum(per[m][metric] or 0.0 for m in MODALITIES) / len(MODALITIES)},
          "mean_nonempty": {metric: sum(present) / len(present) if present else None}}


def scores_of(result: dict[str, Any]) -> dict[str, Any]:
  """The parts of a metrics.json task result that hand_scores recomputes."""
  return {k: result[k] for k in ("per_modality", "mean_official", "mean_nonempty")}


def mean_score(scores: dict[str, Any]) -> float:
  return next(iter(scores["mean_nonempty"].values()))


def raw_records(workdir: Path, name: str) -> list[dict[str, Any]]:
  return json.loads((workdir / "data" / "med_grit_phantom" / name).read_text())


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
  from bird_jax.prepare import prepare

  where = tmp_path_factory.mktemp("prepared")
  config, _ = toy_config(where)
  with restored_logging():
    prepare(config, where)
  return where


@pytest.fixture(scope="module")
def ref(tmp_path_factory, prepared) -> dict[str, Any]:
  """The 6-step toy run with the curriculum (2 steps, keep 0.5), eval.every=2 and the final evaluation."""
  workdir = tmp_path_factory.mktemp("ref")
  run = train(workdir, prepared, f"--config.eval.every={EVERY}")
  run["workdir"] = workdir
  return run


@pytest.fixture(scope="module")
def model_eval(tmp_path_factory, ref) -> Path:
  """`python -m bird_jax.eval --config=cpu_demo <TOY> --checkpoint=<ref>/checkpoints --out=DIR` (newest step)."""
  from bird_jax import eval as E

  out = tmp_path_factory.mktemp("model_eval")
  with restored_logging():
    rc = E.main(["--config=cpu_demo", *toy_flags(ref["workdir"]), f"--checkpoint={ref['workdir'] / 'checkpoints'}",
                 f"--out={out}"])
  assert rc == 0
  return out


# ------------------------------------------------------------------------------------------------- tests


def test_model_mode_eval_predictions_rescore_to_its_metrics(ref, model_eval):
  from bird_jax import eval as E

  results = json.loads((model_eval / "metrics.json").read_text())["results"]
  assert set(results) == {"VG", "RO"}
  for task in ("VG", "RO"):
    preds = E.read_predictions_jsonl(model_eval / f"predictions_{task}.jsonl")
    # every held-out question of the task (eval.max_examples=0), each with its own reference
    raw = raw_records(ref["workdir"], f"test_{task}.json")
    assert sorted((p["id"], p["question"], p["annotation"]) for p in preds) == sorted(
      (r["id"], *r["conversations"][0]) for r in raw)
    assert all(p["task"] == task and p["image"] == p["id"] + ".png" for p in preds)
    # the file rescored by the scorer and by hand gives exactly what metrics.json says
    assert json.loads(json.dumps(E.score_predictions(preds, task))) == results[task]
    assert scores_of(results[task]) == hand_scores(task, [(p["id"], p["annotation"], p["response"]) for p in preds])
    # the newest checkpoint is the run's last state: the same answers as the evaluation at the end of training
    assert preds == E.read_predictions_jsonl(ref["workdir"] / "eval" / f"predictions_{task}.jsonl")
  assert json.loads((ref["workdir"] / "eval" / "metrics.json").read_text())["results"] == results
  # what the run's summary reports is these files' non-empty-modality means
  refs = {d: json.loads((model_eval / d / "metrics.json").read_text())["results"]
          for d in ("baseline", "baseline_class_prior")}
  assert ref["summary"]["eval"] == {
    t: {"model": results[t]["mean_nonempty"], "baseline": refs["baseline"][t]["mean_nonempty"],
        "class_prior": refs["baseline_class_prior"][t]["mean_nonempty"]} for t in ("VG", "RO")}


def test_each_evaluation_draws_its_vg_boxes_into_tensorboard(ref):
  """eval.every=2 over 6 steps: evaluations at steps 2 and 4, each with eval.tensorboard_images VG samples drawn
  (green reference box, red prediction) under one tag per slot, with the image's name beside it."""
  from bird_jax.metric_writer import read_events, read_images
  from bird_jax.report import REF_COLOUR

  images = read_images(ref["workdir"] / "tensorboard")
  slots = sorted(t for t in images if t.startswith("eval_boxes/VG_"))
  assert slots and len(slots) <= 4
  for tag in slots:
    assert [s for s, _ in images[tag]] == [2, 4]
    for _, im in images[tag]:
      assert im.ndim == 3 and min(im.shape[:2]) >= 256
      colours = {tuple(c) for c in im.reshape(-1, 3)}
      assert REF_COLOUR in colours  # the reference box is always drawn
    # tensorboardX files text under "<tag>/text_summary"
    assert [s for s, _ in read_events(ref["workdir"] / "tensorboard")[tag + "_image/text_summary"]] == [2, 4]


def test_model_mode_eval_baselines_are_recomputed_from_the_training_file(ref, model_eval):
  """The constant answers (mean training box; most frequent class) and the class prior (VG: the named class's
  mean training box; RO: the class of the image's modality whose mean training box centre is nearest the asked
  box's), built here from train.json and scored by hand on the test files, equal eval/baseline*/metrics.json."""
  from collections import Counter

  train_records = raw_records(ref["workdir"], "train.json")
  all_vg_boxes, ro_answers = [], []
  by_class: dict[str, list] = {}
  by_modality: dict[str, dict[str, list]] = {}
  for r in train_records:
    (question, answer), = r["conversations"]  # one turn per record (data.phantom.max_turns=1)
    if r["task"] == "VG":
      name, box = REF.findall(answer)[0], int_boxes(answer)[0]
      all_vg_boxes += int_boxes(answer)
    elif r["task"] == "RO":
      name, box = answer, int_boxes(question)[0]
      ro_answers.append(answer.strip().lower())
    else:
      continue
    name = name.strip().lower()
    by_class.setdefault(name, []).append(box)
    by_modality.setdefault(modality(r["id"]), {}).setdefault(name, []).append(box)

  def mean(boxes):  # integer coordinates: the sums are exact, so the order of the records does not matter
    return tuple(sum(b[i] for b in boxes) / len(boxes) for i in range(4))

  def box_text(b):
    return "<box>({},{}),({},{})</box>".format(*(int(round(v)) for v in b))

  def centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2

  def prior_answer(task, record_id, question, reference):
    if task == "VG":
      name = REF.findall(reference)[0].strip().lower()  # the class the question asks for
      return f"<ref>{name}</ref>{box_text(mean(by_class[name]))}" if name in by_class else ""
    (cx, cy), classes = centre(int_boxes(question)[0]), by_modality.get(modality(record_id), {})
    dist = {n: (centre(mean(b))[0] - cx) ** 2 + (centre(mean(b))[1] - cy) ** 2 for n, b in classes.items()}
    return min(dist, key=dist.get) if dist else ""

  counts = Counter(ro_answers)
  majority = [c for c, k in counts.items() if k == max(counts.values())]  # ties: any (first seen in the split)
  constant = {"VG": [box_text(mean(all_vg_boxes))], "RO": majority}
  reported = {d: json.loads((model_eval / d / "metrics.json").read_text())["results"]
              for d in ("baseline", "baseline_class_prior")}
  for task in ("VG", "RO"):
    rows = [(r["id"], *r["conversations"][0]) for r in raw_records(ref["workdir"], f"test_{task}.json")]
    prior = hand_scores(task, [(i, a, prior_answer(task, i, q, a)) for i, q, a in rows])
    assert scores_of(reported["baseline_class_prior"][task]) == prior
    constant_scores = [hand_scores(task, [(i, a, answer) for i, _, a in rows]) for answer in constant[task]]
    assert scores_of(reported["baseline"][task]) in constant_scores
    # both score above 0 here, so a wrong answer would show (not 0 == 0)
    assert mean_score(prior) > 0 and mean_score(reported["baseline"][task]) > 0, task


def test_class_prior_names_the_class_the_question_asks_not_one_in_its_image_path():
  """SA-Med2D ids hold class names (`ct_00--MSD_Pancreas--pancreas_001`), and the question holds the id in its
  `<img>` path: the class prior must answer for the class the question asks about."""
  from bird_jax import metrics as M
  from bird_jax.inference import prior_answer

  prior = M.class_prior([("ct", "pancreas", (100, 100, 300, 300)), ("ct", "tumor", (600, 600, 800, 800))])
  path = "Picture 1: <img>images/ct_00--MSD_Pancreas--pancreas_001--z_0040.png</img>\n"
  for name, box in (("tumor", "(600,600),(800,800)"), ("pancreas", "(100,100),(300,300)")):
    example = {"question": f"{path}Where is the {name}?", "modality": "ct"}
    assert prior_answer("VG", example, prior) == f"<ref>{name}</ref><box>{box}</box>"
  assert prior_answer("VG", {"question": f"{path}Where is the liver?", "modality": "ct"}, prior) == ""


def test_eval_every_scores_the_checkpoint_of_exactly_those_steps(ref, tmp_path):
  from bird_jax import eval as E
  from bird_jax.inference import evaluate_checkpoint

  workdir = ref["workdir"]
  curve = read_jsonl(workdir / "eval_curve.jsonl")
  # every EVERY steps, not at the last one (the final evaluation's)
  assert [c["step"] for c in curve] == list(range(EVERY, N_STEPS, EVERY)) == [2, 4]
  assert sorted(p.name for p in (workdir / "eval").glob("step_*")) == ["step_2", "step_4"]
  assert ref["summary"]["eval_curve"] == curve
  config, name = toy_config(workdir, f"--config.eval.max_examples={EVERY_EXAMPLES}")
  standalone = {}
  for point in curve:
    step = point["step"]
    with restored_logging():
      alone = evaluate_checkpoint(config, name, workdir / "checkpoints" / str(step), out_dir=tmp_path / str(step))
    standalone[step] = {}
    for task in ("VG", "RO"):
      during = E.read_predictions_jsonl(workdir / "eval" / f"step_{step}" / f"predictions_{task}.jsonl")
      assert len(during) == EVERY_EXAMPLES
      # the same questions and answers as the checkpoint of that step evaluated on its own...
      standalone[step][task] = E.read_predictions_jsonl(tmp_path / str(step) / f"predictions_{task}.jsonl")
      assert during == standalone[step][task], (step, task)
      # ...and the logged score is that evaluation's, and the rescored file's
      rescored = E.score_predictions(during, task)
      assert point[task] == alone["results"][task]["mean_nonempty"] == rescored["mean_nonempty"]
      saved = json.loads((workdir / "eval" / f"step_{step}" / "metrics.json").read_text())["results"][task]
      assert saved == json.loads(json.dumps(rescored))
  # the two checkpoints answer differently, so an evaluation of the wrong step could not pass the above
  assert standalone[2] != standalone[4]


def test_curriculum_switch_reads_the_first_stage_set_at_exactly_its_steps(ref):
  from bird_jax.data.image import preprocess_image
  from bird_jax.data.pipeline import decode_image, load_split, make_train_dataset, tokenize_record
  from bird_jax.prepare import prepare

  workdir = ref["workdir"]
  config, _ = toy_config(workdir)
  data = prepare(config, workdir)
  assert data.curriculum_tfds_dir is not None and data.curriculum_tfds_dir != data.tfds_dir
  sources = {"first": load_split(str(data.curriculum_tfds_dir), "train"),
             "main": load_split(str(data.tfds_dir), "train")}
  size, seq_len = config.model.image_size, config.data.seq_len

  # Each row of each step's batch, found among the records of the two sets by its tokens and its pixels.
  where: dict[bytes, tuple[str, str, str]] = {}
  for label, source in sources.items():
    for i in range(len(source)):
      record = source[i]
      (ids, _), _ = tokenize_record(record, data.tokenizer, seq_len, system=None)
      key = np.asarray(ids, np.int32).tobytes() + preprocess_image(decode_image(record["image"]), size).tobytes()
      assert key not in where
      where[key] = (label, record["id"].decode(), record["task"].decode())
  rows_of_step = []
  for batch in ref["batches"]:
    rows = []
    for r in range(batch["input_ids"].shape[0]):
      ids = batch["input_ids"][r][batch["segment_ids"][r] > 0]
      rows.append(where[ids.tobytes() + batch["pixel_values"][r, 0].astype(np.float32).tobytes()])
    rows_of_step.append(rows)
  assert len(rows_of_step) == N_STEPS
  assert [{label for label, _, _ in rows} for rows in rows_of_step] == [{d} for d in EXPECTED_DATA]
  assert [m["data"] for m in read_jsonl(workdir / "metrics.jsonl")] == EXPECTED_DATA
  # the first-stage set is the one-object VG set; the main set also asks ROC questions
  assert {task for rows in rows_of_step[:2] for _, _, task in rows} == {"VG"}
  assert "RO" in {task for step in (2, 4) for _, _, task in rows_of_step[step]}
  # the first-stage stream goes on where it stopped (no record twice within its first epoch of 37)...
  first = [rid for rows, d in zip(rows_of_step, EXPECTED_DATA, strict=True) if d == "first" for _, rid, _ in rows]
  assert len(first) == len(set(first)) == 4 * config.train.batch_size <= len(sources["first"])
  # ...exactly: the steps on each set are that set's stream from its start, in order
  for label in ("first", "main"):
    stream = iter(make_train_dataset(sources[label], data.tokenizer, seq_len=seq_len, image_size=size,
                                     batch_size=config.train.batch_size, seed=config.seed, packing=False,
                                     system=None, worker_count=0))
    for batch, d in zip(ref["batches"], EXPECTED_DATA, strict=True):
      if d == label:
        want = next(stream)
        assert set(want) == set(batch)
        for k in want:
          np.testing.assert_array_equal(batch[k], want[k], err_msg=k)
  log_text = (workdir / "train.log").read_text()
  assert log_text.count("step 2: curriculum stage done, training on the main set (50% of the steps") == 1


def test_export_gives_back_the_trained_weights_and_logits(ref, tmp_path):
  from bird_jax import export as X
  from bird_jax.model import QwenVL
  from bird_jax.model.convert import load_pretrained
  from bird_jax.prepare import prepare
  from bird_jax.tokenizer import load_tokenizer
  from bird_jax.train_step import model_config_from

  workdir = ref["workdir"]
  config, _ = toy_config(workdir)
  tokenizer = prepare(config, workdir, for_training=False).tokenizer
  train_cfg = model_config_from(config, tokenizer)
  trained = ref["state"]["params"]
  # the newest checkpoint is the live state after the last step
  assert_trees_equal(restore_state(workdir, N_STEPS)[0], ref["state"])

  out = tmp_path / "hf"
  with restored_logging():
    assert X.main(["--config=cpu_demo", *toy_flags(workdir), f"--out={out}"]) == 0
  cfg, exported = load_pretrained(out)
  assert dataclasses.replace(cfg, resampler_init=train_cfg.resampler_init) == train_cfg  # the init is no weight
  exported = jax.device_get(exported)
  assert_trees_equal(exported, trained)
  # the model rebuilt from the export computes the trained model's logits
  batch = {k: v[:2] for k, v in ref["batches"][-1].items()}
  args = (batch["input_ids"], batch["pixel_values"].astype(np.float32))
  kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  want = np.asarray(QwenVL(train_cfg).apply({"params": trained}, *args, **kw))
  got = np.asarray(QwenVL(cfg).apply({"params": exported}, *args, **kw))
  assert want.shape == (2, config.data.seq_len, train_cfg.vocab_size)
  np.testing.assert_array_equal(got, want)
  # the tokenizer the run trained with goes along
  again = load_tokenizer(out / "tokenizer.json")
  texts = [re.sub(r"<img>.*?</img>", "<img>a.png</img>", t)  # a path of at most n_queries bytes
           for r in raw_records(workdir, "train.json") for t in r["conversations"][0]]
  assert [again.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
  assert again.special == tokenizer.special

  # --checkpoint picks an older step; a non-empty folder is refused before anything is written
  with restored_logging():
    assert X.main(["--config=cpu_demo", *toy_flags(workdir), f"--checkpoint={workdir / 'checkpoints' / '2'}",
                   f"--out={tmp_path / 'hf2'}"]) == 0
    assert X.main(["--config=cpu_demo", *toy_flags(workdir), f"--out={out}"]) == 2
  step2 = jax.device_get(load_pretrained(tmp_path / "hf2")[1])
  assert_trees_equal(step2, restore_state(workdir, 2)[0]["params"])
  assert not np.array_equal(step2["llm"]["lm_head"], trained["llm"]["lm_head"])


def test_resumed_runs_take_exactly_the_uninterrupted_steps(ref, prepared, tmp_path):
  """Stopped and resumed inside the first stage (step 1), at the switch (step 2) and in the main stage with the
  kept first-stage stream (step 3), the run equals the 6-step run: the same batches, losses, gradient norms,
  weights, optimizer state and data position. (No eval.every here: evaluating during the reference run must not
  change its steps either.)"""
  workdir = tmp_path / "split"
  off = ("--config.eval.every=0", "--config.eval.at_end=false")
  stops = (1, 2, 3, N_STEPS)
  parts = [train(workdir, prepared, f"--config.train.steps={n}", *off) for n in stops]
  assert [len(p["batches"]) for p in parts] == [1, 1, 1, 3]
  batches = [b for p in parts for b in p["batches"]]
  for step, (got, want) in enumerate(zip(batches, ref["batches"], strict=True), 1):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"step {step}: {k}")
  assert losses(workdir) == losses(ref["workdir"])
  assert [s for s, *_ in losses(workdir)] == list(range(1, N_STEPS + 1))
  state, data_state, meta = restore_state(workdir, N_STEPS)
  want_state, want_data_state, _ = restore_state(ref["workdir"], N_STEPS)
  assert_trees_equal(state, want_state)
  assert_trees_equal(parts[-1]["state"], ref["state"])
  assert data_state == want_data_state and data_state["stage"] == "main" and "kept_iterator" in data_state
  assert meta["step"] == N_STEPS
  log_text = (workdir / "train.log").read_text()
  for step in stops[:-1]:
    assert log_text.count(f"resumed from {workdir / 'checkpoints'} at step {step}") == 1
