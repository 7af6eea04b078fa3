"""Trains BiRD (Qwen-VL fine-tuned on Med-GRIT) with one jitted, sharded train step.

  python -m bird_jax.train --config=cpu_demo
  python -m bird_jax.train --config=tpu_v4 --config.init_from=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

`_train_and_evaluate` reads top to bottom, one section of this file per step: config checks and data on disk
(`prepare_data`: generate / tokenizer / `tfds build`) → mesh and the jitted step (`build_mesh_and_step`) → the
state, shapes first, placed straight into its target shardings or restored from the newest checkpoint
(`restore_or_init`) → the Grain streams of each data stage (`bird_jax.data_stages`) → the train loop with its
logs, Orbax checkpoints and evaluations (`_TrainRun`) → held-out evaluation and summary (`evaluate_and_summarize`).

Multi-host: set BIRD_COORDINATOR=host:port, BIRD_NUM_PROCESSES and BIRD_PROCESS_ID (or run on a TPU pod
slice, where `jax.distributed.initialize()` finds its peers itself with BIRD_DISTRIBUTED=auto).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bird_jax import sharding as shd
from bird_jax.config_util import ConfigError, exit_on_config_error, parse_config_flags
from bird_jax.data_stages import DataStages
from bird_jax.flops import peak_flops, train_step_flops
from bird_jax.host_memory import current_setting, reuse_if_cpu
from bird_jax.train_step import (
  build_train_step,
  fresh_state,
  host_batch,
  images_per_row,
  lora_base,
  lora_fields,
  model_config_from,
  prune,
  to_global,
  tree_bytes,
)

log = logging.getLogger("bird_jax")


def init_distributed() -> None:
  """Must run before anything touches a device (and before Grain workers fork)."""
  if os.environ.get("BIRD_COORDINATOR"):
    jax.distributed.initialize(
      coordinator_address=os.environ["BIRD_COORDINATOR"],
      num_processes=int(os.environ["BIRD_NUM_PROCESSES"]),
      process_id=int(os.environ["BIRD_PROCESS_ID"]),
    )
  elif os.environ.get("BIRD_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def _setup_logging(workdir: Path) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stdout, force=True)
  workdir.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(workdir / "train.log")
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  log.addHandler(handler)
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def train_and_evaluate(config: ml_collections.ConfigDict, config_name: str) -> dict[str, Any]:
  # The SIGTERM handler goes in first: a preemption during data preparation or compilation then ends the run
  # cleanly after its first step instead of killing it with nothing saved.
  preemption = Preemption()
  try:
    return _train_and_evaluate(config, config_name, preemption)
  finally:
    preemption.restore()


def _train_and_evaluate(config: ml_collections.ConfigDict, config_name: str, preemption: Preemption
                        ) -> dict[str, Any]:
  from bird_jax.data.pipeline import load_split

  _check_config(config)
  workdir = Path(config.workdir).absolute()
  _setup_logging(workdir)
  t_start = time.time()
  is_main = jax.process_index() == 0
  data, model_cfg = prepare_data(config, workdir, is_main)
  mesh, parts, n_params = build_mesh_and_step(config, model_cfg)
  ckpt, meta, state, data_state = restore_or_init(config, config_name, model_cfg, mesh, parts, workdir)
  train_source = load_split(data.tfds_dir, "train", config.data.builder_config)
  stages = DataStages(config, data, model_cfg, train_source, config.train.batch_size // jax.process_count())
  stages.start(int(state["step"]), data_state, config.train.steps)
  run = _TrainRun(config, workdir, is_main, data, model_cfg, mesh, parts, ckpt, meta, stages, train_source)
  state = run.loop(state, preemption)
  if run.preempted:
    ckpt.close()
    if is_main:
      print(f"bird-jax: {preemption.signal_name} at step {run.step}: checkpoint saved in {ckpt.directory}; rerun "
            "the same command to resume", flush=True)
    return {"config": config_name, "workdir": str(workdir), "steps": run.step, "preempted": True}
  return evaluate_and_summarize(config, config_name, workdir, is_main, run, state, n_params, t_start)


# ---- config and data on disk ---------------------------------------------------------------------------------
def _check_config(config: ml_collections.ConfigDict) -> None:
  if not 0.0 <= config.data.curriculum.keep < 1.0:
    raise ConfigError(f"data.curriculum.keep={config.data.curriculum.keep}: use a fraction in [0, 1)")
  if "://" in config.workdir:
    raise ConfigError(f"workdir={config.workdir}: the workdir (logs, metrics, evaluation) is a local folder; put "
                      "checkpoints and TensorBoard on the bucket with --config.train.checkpoint_dir=gs://... and "
                      "--config.train.tensorboard_dir=gs://... (launch/tpu_vm.sh --bucket does)")


def prepare_data(config: ml_collections.ConfigDict, workdir: Path, is_main: bool):
  """(prepared data, model config): the Med-GRIT folder, tokenizer and TFDS build on disk, one writer."""
  from bird_jax.prepare import prepare

  if jax.process_count() > 1:  # one writer; the others find everything in place after the barrier
    from jax.experimental import multihost_utils

    if is_main:
      prepare(config, workdir)
    multihost_utils.sync_global_devices("bird_jax.prepare")
  data = prepare(config, workdir)
  model_cfg = model_config_from(config, data.tokenizer)
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return data, model_cfg


# ---- mesh, step and state ------------------------------------------------------------------------------------
def build_mesh_and_step(config: ml_collections.ConfigDict, model_cfg):
  """(mesh, the jitted step's parts, parameter count)."""
  from bird_jax.model import param_count

  log.info("host memory: %s", current_setting())
  mesh = shd.make_mesh(config.mesh.shape)
  tc = config.train
  if tc.batch_size % (jax.process_count() * tc.grad_accum):
    raise ValueError(f"train.batch_size {tc.batch_size} must divide by processes×grad_accum "
                     f"({jax.process_count()}×{tc.grad_accum})")
  parts = build_train_step(config, model_cfg, mesh)
  abstract_state = parts.abstract_state
  n_params = param_count(abstract_state["params"])
  log.info("model: %s params (visual %s, llm %s) on mesh %s over %d device(s) [%s]", f"{n_params:,}",
           f"{param_count(abstract_state['params']['visual']):,}", f"{param_count(abstract_state['params']['llm']):,}",
           dict(mesh.shape), jax.device_count(), jax.devices()[0].platform)
  return mesh, parts, n_params


def restore_or_init(config: ml_collections.ConfigDict, config_name: str, model_cfg, mesh, parts, workdir: Path):
  """(checkpointer, checkpoint meta, state, data position): the newest checkpoint that restores and verifies,
  else a fresh state (from config.init_from or random) placed straight into its shardings."""
  from bird_jax.checkpoint import Checkpointer, CheckpointMismatch, DamagedCheckpoint
  from bird_jax.model import param_count
  from bird_jax.model.lora import lora_mask

  tc = config.train
  tx, init_state, abstract_state, state_shardings = parts.tx, parts.init_state, parts.abstract_state, \
    parts.state_shardings
  ckpt = Checkpointer(tc.get("checkpoint_dir") or workdir / "checkpoints", max_to_keep=tc.max_to_keep)
  meta = {"config": config_name, "mesh": list(mesh.devices.shape), "processes": jax.process_count(),
          "scan_layers": model_cfg.scan_layers, "lora": lora_fields(config)}
  if parts.trained_only:  # the checkpoint holds the trained params only: this is the base they go on
    meta["base"] = lora_base(config)
    log.info("LoRA: %s trained params (adapters %s), optimizer state %.1f MiB; frozen base in %s",
             f"{param_count(parts.to_checkpoint(abstract_state)['params']):,}",
             f"{param_count(prune(abstract_state['params'], lora_mask(abstract_state['params']))):,}",
             tree_bytes(abstract_state["opt_state"]) / 2**20, config.lora.base_dtype)
  data_state = None
  with jax.set_mesh(mesh):
    if ckpt.latest_step() is not None:
      try:  # the newest step that restores and verifies; damaged newer ones are set aside with one warning
        expect = {k: meta[k] for k in ("scan_layers", "lora", "base") if k in meta}
        state, data_state, _ = ckpt.restore(parts.checkpoint_target(), expect_meta=expect,
                                            set_aside=True)
      except (DamagedCheckpoint, CheckpointMismatch) as e:
        raise ConfigError(str(e)) from None
      if parts.trained_only:
        state = parts.from_checkpoint(state, fresh_state(config.init_from, model_cfg, tx, init_state,
                                                         state_shardings))
      log.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
    else:
      state = fresh_state(config.init_from, model_cfg, tx, init_state, state_shardings)
  return ckpt, meta, state, data_state


# ---- the train loop ------------------------------------------------------------------------------------------
class _TrainRun:
  """The loop and what it logs: per-step metrics (metrics.jsonl, TensorBoard, the log line), checkpoints,
  preemption, max_minutes and the held-out evaluations of eval.every."""

  def __init__(self, config, workdir: Path, is_main: bool, data, model_cfg, mesh, parts, ckpt, meta,
               stages: DataStages, train_source) -> None:
    from bird_jax.metric_writer import MetricWriter
    from bird_jax.train_step import learning_rate

    self.config, self.workdir, self.is_main, self.data, self.model_cfg = config, workdir, is_main, data, model_cfg
    self.mesh, self.ckpt, self.meta, self.stages, self.train_source = mesh, ckpt, meta, stages, train_source
    self.parts, self.step_fn, self.model = parts, parts.step, parts.model
    tc = config.train
    self.history: list[dict[str, float]] = []
    self.eval_curve: list[dict[str, Any]] = []
    self.metrics_file = open(workdir / "metrics.jsonl", "a", buffering=1) if is_main else None
    self.tb = MetricWriter(tc.get("tensorboard_dir") or workdir / "tensorboard", enabled=is_main)
    self.lr_at = learning_rate(tc, tc.steps)
    self.data_wait_since = 0.0  # seconds the host waited for input since the last logged step
    self.clock_used = (tc.max_minutes > 0, tc.checkpoint_minutes > 0)
    self.n_devices = jax.device_count()
    self.peak = peak_flops(jax.devices()[0].device_kind)
    self.step = 0
    self.stopped_early = self.preempted = False
    self.train_minutes = 0.0
    self.step_flops = functools.lru_cache(maxsize=4)(self._step_flops)

  def _step_flops(self, seq_len: int) -> float:
    """Model FLOPs of one optimizer step at this row length (the first stage may use another)."""
    tc = self.config.train
    return train_step_flops(self.model_cfg, batch=tc.batch_size, seq_len=seq_len,
                            images_per_row=images_per_row(self.config, self.model_cfg.n_queries, seq_len),
                            train_vit=tc.train_vit, train_resampler=tc.train_resampler, train_llm=tc.train_llm).total

  def report(self, at_step: int, device_metrics: dict[str, jax.Array], data_set: str, seq_len: int) -> None:
    tc = self.config.train
    m = jax.device_get(device_metrics)
    if not math.isfinite(float(m["loss"])):
      good = [s for s in self.ckpt.all_steps() if s < at_step]
      raise FloatingPointError(f"loss became {m['loss']} at step {at_step}; stopped, the last good checkpoint is "
                               f"step {good[-1] if good else 'none'} in {self.ckpt.directory}; lower "
                               "--config.train.lr")
    self.tokens_since += float(m["tokens"])
    self.steps_since += 1
    self.flops_since += self.step_flops(seq_len)
    record = {"step": at_step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "data": data_set}
    self.history.append(record)
    if at_step % tc.log_every == 0 or at_step == 1:
      dt = max(time.time() - self.t_last, 1e-9)
      step_time = dt / self.steps_since
      n_devices, peak = self.n_devices, self.peak
      record.update(step_time_s=step_time, supervised_tokens_per_s=self.tokens_since / dt,
                    tokens_per_s_per_device=tc.batch_size * seq_len / step_time / n_devices,
                    tflops_per_device=self.flops_since / dt / n_devices / 1e12)
      if peak:
        record["mfu"] = self.flops_since / dt / n_devices / peak
      record["data_wait_s"] = self.data_wait_since / self.steps_since
      self.tb.scalars(at_step, {"train/learning_rate": float(self.lr_at(at_step - 1)), "perf/step_time_s": step_time,
                                "perf/tokens_per_s_per_device": record["tokens_per_s_per_device"],
                                "perf/supervised_tokens_per_s": record["supervised_tokens_per_s"],
                                "perf/tflops_per_device": record["tflops_per_device"], "perf/mfu": record.get("mfu"),
                                "perf/data_wait_s": record["data_wait_s"]})
      self.t_last, self.tokens_since, self.steps_since, self.flops_since, self.data_wait_since = \
        time.time(), 0.0, 0, 0.0, 0.0
      mfu = f"{record['mfu']:.1%}" if peak else "n/a"
      line = (f"step {at_step:6d}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
              f"{step_time * 1000:.0f} ms/step  {record['tokens_per_s_per_device']:.0f} tok/s/device  "
              f"{record['supervised_tokens_per_s']:.0f} target tok/s  "
              f"MFU {mfu}")
      if self.progress.disable:
        log.info(line)
      else:
        self.progress.write(line)
    self.tb.scalars(at_step, {"train/loss": record["loss"], "train/grad_norm": record["grad_norm"]})
    if self.metrics_file:
      self.metrics_file.write(json.dumps(record) + "\n")
    self.progress.set_postfix(loss=f"{record['loss']:.3f}")

  def evaluate_during_training(self, at_step: int, params) -> dict[str, Any]:
    """A quick held-out evaluation (eval.every_max_examples per task), appended to eval_curve.jsonl."""
    from bird_jax.inference import evaluate_on_test
    from bird_jax.metric_writer import eval_scalars

    config, workdir = self.config, self.workdir
    point = evaluate_on_test(self.model, params, self.data.tokenizer, self.data.tfds_dir, config, self.train_source,
                             out_dir=workdir / "eval" / f"step_{at_step}",
                             max_examples=config.eval.every_max_examples, full_report=False,
                             box_images=config.eval.get("tensorboard_images", 0))
    record = {"step": at_step, **{task: s["model"] for task, s in point["summary"].items()}}
    for i, (name, image) in enumerate(point.get("box_images", [])):
      # one tag per slot: TensorBoard's step slider then shows how the same sample's boxes move between evaluations
      self.tb.image(at_step, f"eval_boxes/VG_{i}", image)
      self.tb.text(at_step, f"eval_boxes/VG_{i}_image", name)
    if self.is_main:
      with open(workdir / "eval_curve.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
      log.info("step %d held-out: %s", at_step, format_scores(point["summary"]))
    self.tb.scalars(at_step, eval_scalars(point["summary"]))
    self.tb.flush()
    return record

  def agreed(self, step: int, *clock_flags: bool) -> tuple[bool, ...]:
    if not any(self.clock_used):
      return clock_flags
    return agree_on_clock(step, self.config.train.log_every, *clock_flags)

  def loop(self, state, preemption: Preemption):
    """Trains from the state's step to train.steps (or a stop); returns the last state."""
    from tqdm import tqdm

    config, tc, ckpt, stages, mesh = self.config, self.config.train, self.ckpt, self.stages, self.mesh
    start_step = int(state["step"])
    # A live bar on terminals; logs and CI get the step lines only.
    self.progress = tqdm(total=tc.steps, initial=start_step, desc="train", dynamic_ncols=True,
                         disable=not (self.is_main and sys.stderr.isatty()))
    pending = None
    t_train = time.time()
    self.t_last, self.tokens_since, self.steps_since, self.flops_since = time.time(), 0.0, 0, 0.0
    step = self.step = start_step
    last_save = time.time()  # train.checkpoint_minutes counts from the start (or the resumed checkpoint)
    preemption.ckpt = ckpt
    try:
      with jax.set_mesh(mesh):
        while step < tc.steps:
          batches, data_set, seq_len = stages.for_step(step)
          t_wait = time.time()
          host = next(batches)
          self.data_wait_since += time.time() - t_wait
          batch = to_global(host_batch(host, self.model_cfg), mesh)
          state, metrics = self.step_fn(state, batch)
          step = self.step = step + 1
          # Read the previous step's metrics so the host never waits on the step it just dispatched.
          if pending is not None:
            self.report(*pending)
          pending = (step, metrics, data_set, seq_len)
          self.progress.update(1)
          out_of_time = tc.max_minutes > 0 and (time.time() - t_train) > tc.max_minutes * 60
          save_due = tc.checkpoint_minutes > 0 and time.time() - last_save > tc.checkpoint_minutes * 60
          out_of_time, save_due = self.agreed(step, out_of_time, save_due)
          self.preempted = preemption.reached(step)
          if step % tc.checkpoint_every == 0 or step == tc.steps or out_of_time or save_due or self.preempted:
            # This step's loss is checked before its state is saved: a NaN step never becomes a checkpoint.
            self.report(*pending)
            pending = None
            ckpt.save(step, self.parts.to_checkpoint(state), data_state=stages.position(), meta=self.meta)
            last_save = time.time()
          if self.preempted:
            break
          if out_of_time and step < tc.steps:
            log.info("stopping at step %d: train.max_minutes=%.1f reached", step, tc.max_minutes)
            self.stopped_early = True
            break
          if config.eval.every and step % config.eval.every == 0 and step < tc.steps:
            t_eval = time.time()
            self.eval_curve.append(self.evaluate_during_training(step, state["params"]))
            # Held-out evaluation is not training time: neither max_minutes nor the step-time log count it.
            spent = time.time() - t_eval
            t_train, self.t_last = t_train + spent, self.t_last + spent
        if pending is not None:
          self.report(*pending)
    finally:
      self.progress.close()
      if self.metrics_file:
        self.metrics_file.close()
      self.tb.close()
      ckpt.wait()  # an exception (a NaN loss) still finishes the checkpoint being written
    self.train_minutes = (time.time() - t_train) / 60
    return state


# ---- held-out evaluation and summary -------------------------------------------------------------------------
def evaluate_and_summarize(config: ml_collections.ConfigDict, config_name: str, workdir: Path, is_main: bool,
                           run: _TrainRun, state, n_params: int, t_start: float) -> dict[str, Any]:
  results: dict[str, Any] = {}
  if config.eval.at_end:
    from bird_jax.inference import evaluate_on_test

    with jax.set_mesh(run.mesh):
      results = evaluate_on_test(run.model, state["params"], run.data.tokenizer, run.data.tfds_dir, config,
                                 run.train_source, out_dir=workdir / "eval")
  run.ckpt.close()

  history, eval_curve = run.history, run.eval_curve
  summary = {
    "config": config_name, "workdir": str(workdir), "steps": run.step, "stopped_early": run.stopped_early,
    "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
    "train_minutes": round(run.train_minutes, 2), "total_minutes": round((time.time() - t_start) / 60, 2),
    "params": n_params, "checkpoints": str(run.ckpt.directory), "eval": results.get("summary", {}),
    **({"eval_curve": eval_curve} if eval_curve else {}),
  }
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary, results), flush=True)
  return summary


def agree_on_clock(step: int, log_every: int, *flags: bool) -> tuple[bool, ...]:
  """Decisions read off a clock (train.max_minutes, train.checkpoint_minutes), made the same on every process:
  hosts' clocks differ, and a checkpoint some processes save and others do not hangs the run. One process: its
  flags. Several: process 0's, broadcast at logged steps only (one tiny collective; no wait on every step), and
  False at the other steps."""
  if jax.process_count() == 1:
    return flags
  if step % log_every:
    return (False,) * len(flags)
  from jax.experimental import multihost_utils

  return tuple(bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray(flags)))


class Preemption:
  """SIGTERM (what spot TPUs, SLURM and Kubernetes send before killing a job) -> `reached(step)` turns True, so the
  loop saves a checkpoint at that step, finishes the write and returns. One process: our own handler (the previous
  one comes back in `restore`). Several: Orbax's preemption sync point, which JAX's distributed service raises on
  every process at the same step, so all of them save the same step."""

  def __init__(self) -> None:
    self.ckpt, self.signal_name, self._got = None, "", False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook's worker thread): no handler, nothing to restore
        pass

  def _handle(self, signum, frame) -> None:
    self._got, self.signal_name = True, signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1 and not self._got and self.ckpt and self.ckpt.manager.reached_preemption(step):
      self._got, self.signal_name = True, "preemption notice"
    return self._got

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def format_scores(summary: dict[str, dict[str, Any]]) -> str:
  """{"VG": {"model": {"recall@0.5": .31}, "baseline": {...}, "class_prior": {...}}, ...} (the references optional)
  -> "VG recall@0.5 0.310 (baseline 0.004, class prior 0.110), ..."."""
  parts = []
  for task, s in summary.items():
    for metric, value in (s["model"] or {}).items():
      refs = [f"{label} {v:.3f}" for key, label in (("baseline", "baseline"), ("class_prior", "class prior"))
              if (v := (s.get(key) or {}).get(metric)) is not None]
      parts.append(f"{task} {metric} {value:.3f}" + (f" ({', '.join(refs)})" if refs else ""))
  return ", ".join(parts)


def format_summary(summary: dict[str, Any], results: dict[str, Any]) -> str:
  lines = ["", "=" * 72, f"bird-jax: {summary['config']} done in {summary['total_minutes']} min "
           f"({summary['steps']} steps, {summary['train_minutes']} min training)"]
  if summary["last_loss"] is not None:
    lines.append(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
  if summary.get("eval_curve"):
    lines += ["", "held-out during training (eval.every; the first eval.every_max_examples questions per task):"]
    lines += [f"  step {r['step']:6d}  " + format_scores({k: {"model": v} for k, v in r.items() if k != "step"})
              for r in summary["eval_curve"]]
  if results.get("table"):
    lines += ["", results["table"]]
  lines += ["", f"outputs in {summary['workdir']}:",
            "  checkpoints/   Orbax checkpoints (resume: rerun the same command)",
            "  metrics.jsonl  per-step loss", "  eval/          predictions, metrics, gallery", "  summary.json",
            *(["  eval_curve.jsonl  held-out scores during training"] if summary.get("eval_curve") else []),
            "=" * 72]
  return "\n".join(lines)


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, name, rest = parse_config_flags(argv)
  if rest:
    print(f"error: unknown arguments {rest}; use --config=NAME and --config.FIELD=VALUE", file=sys.stderr)
    raise SystemExit(2)
  reuse_if_cpu()  # before the backend starts (bird_jax/host_memory.py)
  init_distributed()
  try:
    train_and_evaluate(config, name)
  except FloatingPointError as e:  # a NaN/inf loss: the message names the step and the checkpoint kept
    log.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
