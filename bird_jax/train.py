"""Trains BiRD (Qwen-VL fine-tuned on Med-GRIT) with one jitted, sharded train step.

  python -m bird_jax.train --config=cpu_demo
  python -m bird_jax.train --config=tpu_v4 --config.init_from=/ckpt/Qwen-VL-Chat --config.data.raw_dir=/data/med_grit

Read top to bottom: config → data on disk (generate / tokenizer / `tfds build`) → mesh → shapes-first
state placed straight into its target shardings (or restored from the newest checkpoint) → Grain
iterator → train loop (logs, Orbax checkpoints) → held-out evaluation → summary.

Multi-host: set BIRD_COORDINATOR=host:port, BIRD_NUM_PROCESSES and BIRD_PROCESS_ID (or run on a TPU pod
slice, where `jax.distributed.initialize()` finds its peers itself with BIRD_DISTRIBUTED=auto).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bird_jax import sharding as shd
from bird_jax.config_util import ConfigError, exit_on_config_error, parse_config_flags

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


def model_config_from(config: ml_collections.ConfigDict, tokenizer) -> Any:
  """The QwenVLConfig of this run; a demo tokenizer decides the vocab and the image token ids."""
  from bird_jax.model import QwenVLConfig

  fields = config.model.to_dict()
  if config.init_from:
    hf = json.loads((Path(config.init_from) / "config.json").read_text())
    keep = {k: fields[k] for k in ("dtype", "param_dtype", "scan_layers", "remat_policy", "vision_remat_policy")}
    return QwenVLConfig.from_hf_config(hf, **keep)
  if not config.data.tokenizer:
    fields["vocab_size"] = max(fields["vocab_size"], tokenizer.vocab_size)
    fields["image_start_id"] = tokenizer.special["img_start"]
  cfg = QwenVLConfig(**fields)
  if tokenizer.special["img_start"] != cfg.image_start_id or tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer (vocab {tokenizer.vocab_size}, <img> {tokenizer.special['img_start']}) does not "
                     f"fit the model (vocab {cfg.vocab_size}, image_start_id {cfg.image_start_id})")
  return cfg


def build_optimizer(tc: ml_collections.ConfigDict, params: Any, total_steps: int) -> optax.GradientTransformation:
  from bird_jax.model import trainable_mask

  warmup = max(1, int(round(tc.warmup_ratio * total_steps)))
  if tc.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  elif tc.schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), optax.constant_schedule(tc.lr)], [warmup])
  else:
    raise ValueError(f"config.train.schedule={tc.schedule!r}; use 'cosine' or 'constant'")
  # Decay matrices and embeddings only; norms, biases and the fixed sin-cos tables are left alone.
  decay = jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.chain(
    optax.clip_by_global_norm(tc.grad_clip),
    optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay),
  )
  trainable = trainable_mask(params, train_vit=tc.train_vit, train_resampler=tc.train_resampler,
                             train_llm=tc.train_llm)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def token_nll(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over supervised tokens, number of supervised tokens), in float32."""
  logits = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                       positions=batch["positions"], segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
  weights = batch["loss_mask"].astype(jnp.float32)
  return (nll * weights).sum(), weights.sum()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, grad_accum: int):
  """One optimizer step; with grad_accum > 1 the batch is split into micro-batches scanned in-step and the
  gradients are weighted by supervised-token counts, so the result equals the big-batch gradient."""
  grad_fn = jax.value_and_grad(lambda p, b: token_nll(model, p, b), has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    params = state["params"]
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

      def body(carry, mb):
        g_acc, l_acc, n_acc = carry
        (loss, n), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, n_acc + n), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
    metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics

  return train_step


def create_state_shardings(model_cfg, tx_builder, mesh, rules, seed: int):
  """Shapes first: abstract boxed params → logical specs → NamedShardings; init jitted into those shardings."""
  from bird_jax.model import init_params

  boxed = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(seed)))
  param_shardings = shd.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  tx = tx_builder(abstract_params)
  # Optimizer-state shardings follow from the params' through XLA's propagation (moments are zeros_like).
  compiled = jax.jit(tx.init, in_shardings=(param_shardings,)).lower(abstract_params).compile()
  opt_shardings = jax.tree.map(
    lambda s: s if isinstance(s, jax.sharding.NamedSharding) else shd.replicated(mesh), compiled.output_shardings)
  state_shardings = {"step": shd.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}

  def init_state():
    params = nn.unbox(init_params(model_cfg, jax.random.key(seed)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state)
  return tx, init_state, abstract_state, state_shardings


def fresh_state(init_from: str, model_cfg, tx: optax.GradientTransformation, init_state, state_shardings):
  """Step-0 state in its target shardings: the Hugging Face checkpoint's weights when `init_from` is set
  (loaded tensor by tensor straight into the shardings, never random-initialised first), else random."""
  if not init_from:
    return jax.jit(init_state, out_shardings=state_shardings)()
  from bird_jax.model.convert import load_params

  params = load_params(init_from, model_cfg, shardings=state_shardings["params"])
  return jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                 out_shardings=state_shardings, donate_argnums=(0,))(params)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


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
  from tqdm import tqdm

  from bird_jax.checkpoint import Checkpointer
  from bird_jax.data.pipeline import load_split, make_train_dataset
  from bird_jax.model import QwenVL, param_count
  from bird_jax.prepare import prepare

  if not 0.0 <= config.data.curriculum.keep < 1.0:
    raise ConfigError(f"data.curriculum.keep={config.data.curriculum.keep}: use a fraction in [0, 1)")
  workdir = Path(config.workdir).absolute()
  _setup_logging(workdir)
  t_start = time.time()
  is_main = jax.process_index() == 0

  # ---- data on disk --------------------------------------------------------------------------------
  if jax.process_count() > 1:  # one writer; the others find everything in place after the barrier
    from jax.experimental import multihost_utils

    if is_main:
      prepare(config, workdir)
    multihost_utils.sync_global_devices("bird_jax.prepare")
  data = prepare(config, workdir)
  model_cfg = model_config_from(config, data.tokenizer)
  model = QwenVL(model_cfg)
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---- mesh and state ------------------------------------------------------------------------------
  mesh = shd.make_mesh(config.mesh.shape)
  rules = shd.rules_from_config(config.mesh.rules)
  tc = config.train
  if tc.batch_size % (jax.process_count() * tc.grad_accum):
    raise ValueError(f"train.batch_size {tc.batch_size} must divide by processes×grad_accum "
                     f"({jax.process_count()}×{tc.grad_accum})")
  tx, init_state, abstract_state, state_shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(tc, p, tc.steps), mesh, rules, config.seed)
  n_params = param_count(abstract_state["params"])
  log.info("model: %s params (visual %s, llm %s) on mesh %s over %d device(s) [%s]", f"{n_params:,}",
           f"{param_count(abstract_state['params']['visual']):,}", f"{param_count(abstract_state['params']['llm']):,}",
           dict(mesh.shape), jax.device_count(), jax.devices()[0].platform)

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=tc.max_to_keep)
  meta = {"config": config_name, "mesh": list(mesh.devices.shape), "processes": jax.process_count(),
          "scan_layers": model_cfg.scan_layers}
  data_state = None
  with jax.set_mesh(mesh):
    if ckpt.latest_step() is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_shardings)
      state, data_state, _ = ckpt.restore(target, expect_meta={k: meta[k] for k in ("scan_layers",)})
      log.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
    else:
      state = fresh_state(config.init_from, model_cfg, tx, init_state, state_shardings)
  start_step = int(state["step"])

  # ---- input ---------------------------------------------------------------------------------------
  train_source = load_split(data.tfds_dir, "train", config.data.builder_config)
  per_process = tc.batch_size // jax.process_count()
  curriculum_steps = config.data.curriculum.steps if data.curriculum_tfds_dir else 0

  def open_stream(stage: str, iterator_state: dict | None):
    """Batches of one data stage ("curriculum" or "main"), resumed from `iterator_state` when given."""
    source, seq_len = train_source, config.data.seq_len
    if stage == "curriculum":
      source = load_split(data.curriculum_tfds_dir, "train", config.data.builder_config)
      seq_len = config.data.curriculum.seq_len or seq_len
    it = iter(make_train_dataset(
      source, data.tokenizer, seq_len=seq_len, image_size=model_cfg.image_size,
      batch_size=per_process, seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
      packing=config.data.packing, worker_count=config.data.worker_count, loss_on=config.data.loss_on,
      system=config.data.system_prompt or None,
    ))
    if iterator_state:
      it.set_state(iterator_state)
    return it

  # Checkpoints store {"stage", "iterator"}; older ones hold the main stream's iterator state alone.
  if data_state and "stage" not in data_state:
    data_state = {"stage": "main", "iterator": data_state}
  stage = "curriculum" if start_step < curriculum_steps else "main"
  same_stage = bool(data_state) and data_state["stage"] == stage
  batches = open_stream(stage, data_state["iterator"] if same_stage else None)
  keep = config.data.curriculum.keep if curriculum_steps else 0.0
  # The first-stage stream the main stage keeps reading from (data.curriculum.keep), with its own position.
  kept = None
  if keep and stage == "main":
    kept = open_stream("curriculum", (data_state or {}).get("kept_iterator"))
  if curriculum_steps:
    log.info("data stages: steps [0, %d) on %s, then %s", curriculum_steps, data.curriculum_tfds_dir, data.tfds_dir)
    if curriculum_steps >= tc.steps:
      log.warning("data.curriculum.steps=%d >= train.steps=%d: this run never reaches the main set",
                  curriculum_steps, tc.steps)

  # ---- train loop ----------------------------------------------------------------------------------
  # Batches arrive as global arrays already laid out by `to_global`; jit takes their sharding as given.
  step_fn = jax.jit(make_train_step(model, tx, tc.grad_accum), donate_argnums=(0,),
                    in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))
  history: list[dict[str, float]] = []
  metrics_file = open(workdir / "metrics.jsonl", "a", buffering=1) if is_main else None
  # A live bar on terminals; logs and CI get the step lines only.
  progress = tqdm(total=tc.steps, initial=start_step, desc="train", dynamic_ncols=True,
                  disable=not (is_main and sys.stderr.isatty()))
  pending = None
  t_train = time.time()
  t_last, tokens_since = time.time(), 0.0

  def report(at_step: int, device_metrics: dict[str, jax.Array], data_set: str) -> None:
    nonlocal t_last, tokens_since
    m = jax.device_get(device_metrics)
    if not math.isfinite(float(m["loss"])):
      raise FloatingPointError(f"loss became {m['loss']} at step {at_step}; lower --config.train.lr")
    tokens_since += float(m["tokens"])
    record = {"step": at_step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "data": data_set}
    history.append(record)
    if at_step % tc.log_every == 0 or at_step == 1:
      dt = time.time() - t_last
      record.update(step_time_s=dt / max(1, tc.log_every), supervised_tokens_per_s=tokens_since / max(dt, 1e-9))
      t_last, tokens_since = time.time(), 0.0
      line = (f"step {at_step:6d}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
              f"{record['step_time_s'] * 1000:.0f} ms/step  {record['supervised_tokens_per_s']:.0f} target tok/s")
      if progress.disable:
        log.info(line)
      else:
        progress.write(line)
    if metrics_file:
      metrics_file.write(json.dumps(record) + "\n")
    progress.set_postfix(loss=f"{record['loss']:.3f}")

  eval_curve: list[dict[str, Any]] = []

  def evaluate_during_training(at_step: int) -> dict[str, Any]:
    """A quick held-out evaluation (eval.every_max_examples per task), appended to eval_curve.jsonl."""
    from bird_jax.inference import evaluate_on_test

    point = evaluate_on_test(model, state["params"], data.tokenizer, data.tfds_dir, config, train_source,
                             out_dir=workdir / "eval" / f"step_{at_step}",
                             max_examples=config.eval.every_max_examples, full_report=False)
    record = {"step": at_step, **{task: s["model"] for task, s in point["summary"].items()}}
    if is_main:
      with open(workdir / "eval_curve.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
      log.info("step %d held-out: %s", at_step, format_scores(point["summary"]))
    return record

  step = start_step
  stopped_early = False
  with jax.set_mesh(mesh):
    while step < tc.steps:
      if stage == "curriculum" and step >= curriculum_steps:
        kept = batches if keep else None  # the first-stage stream goes on from where it is
        stage, batches = "main", open_stream("main", None)
        log.info("step %d: curriculum stage done, training on the main set%s", step,
                 f" ({keep:.0%} of the steps still on the first-stage set)" if keep else "")
      from_kept = kept is not None and reads_kept_set(step, keep)
      batch = to_global(next(kept if from_kept else batches), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      # Read the previous step's metrics so the host never waits on the step it just dispatched.
      if pending is not None:
        report(*pending)
      pending = (step, metrics, "first" if stage == "curriculum" or from_kept else "main")
      progress.update(1)
      out_of_time = tc.max_minutes > 0 and (time.time() - t_train) > tc.max_minutes * 60
      if step % tc.checkpoint_every == 0 or step == tc.steps or out_of_time:
        data_position = {"stage": stage, "iterator": batches.get_state()}
        if kept is not None:
          data_position["kept_iterator"] = kept.get_state()
        ckpt.save(step, state, data_state=data_position, meta=meta)
      if out_of_time and step < tc.steps:
        log.info("stopping at step %d: train.max_minutes=%.1f reached", step, tc.max_minutes)
        stopped_early = True
        break
      if config.eval.every and step % config.eval.every == 0 and step < tc.steps:
        t_eval = time.time()
        eval_curve.append(evaluate_during_training(step))
        # Held-out evaluation is not training time: neither max_minutes nor the step-time log count it.
        spent = time.time() - t_eval
        t_train, t_last = t_train + spent, t_last + spent
    if pending is not None:
      report(*pending)
  progress.close()
  if metrics_file:
    metrics_file.close()
  ckpt.wait()
  train_minutes = (time.time() - t_train) / 60

  # ---- evaluation ----------------------------------------------------------------------------------
  results: dict[str, Any] = {}
  if config.eval.at_end:
    from bird_jax.inference import evaluate_on_test

    with jax.set_mesh(mesh):
      results = evaluate_on_test(model, state["params"], data.tokenizer, data.tfds_dir, config, train_source,
                                 out_dir=workdir / "eval")
  ckpt.close()

  summary = {
    "config": config_name, "workdir": str(workdir), "steps": step, "stopped_early": stopped_early,
    "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
    "train_minutes": round(train_minutes, 2), "total_minutes": round((time.time() - t_start) / 60, 2),
    "params": n_params, "checkpoints": str(ckpt.directory), "eval": results.get("summary", {}),
    **({"eval_curve": eval_curve} if eval_curve else {}),
  }
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary, results), flush=True)
  return summary


def reads_kept_set(step: int, keep: float) -> bool:
  """Whether optimizer step `step` (0-based) of the main stage reads the first-stage set: a pure function of
  the step, `keep` of the steps spread evenly (keep=0.25: every 4th step), so a resumed run picks the same."""
  return math.floor((step + 1) * keep) > math.floor(step * keep)


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
  init_distributed()
  train_and_evaluate(config, name)


if __name__ == "__main__":
  main()
