"""A training run's state, for whoever needs it after (or beside) training: evaluation, export, the API,
the probes. `load_checkpoint` rebuilds a run's model config, abstract state and shardings exactly as the
trainer did (from bird_jax.train_step) and restores the params.

It sits below train, eval, inference, export and api and imports none of them, so none depends on another's
internals for this.
"""

from __future__ import annotations

from pathlib import Path

import jax


def load_checkpoint(config, checkpoint: str | Path, *, merge_lora: bool = True):
  """(model, params, tokenizer, prepared data, mesh, meta) from a training checkpoint: a run's `checkpoints/`
  folder (→ newest step) or one step folder inside it. The run's data/tokenizer are found (or rebuilt) from
  config.workdir exactly as training did. A LoRA run's checkpoint holds the adapters and the resampler: they go
  on the base it names (config.init_from, or the seed's random init) and, with `merge_lora`, are folded into it
  (the model is then the plain Qwen-VL one)."""
  import dataclasses

  from bird_jax import sharding as shd
  from bird_jax.checkpoint import Checkpointer
  from bird_jax.model import QwenVL
  from bird_jax.model.lora import merge_adapters
  from bird_jax.prepare import prepare
  from bird_jax.train_step import build_train_step, fresh_state, lora_base, lora_fields, model_config_from

  path = Path(checkpoint).absolute()
  step = None
  if path.name.isdigit() and not (path / "checkpoints").exists():
    path, step = path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint folder {path} does not exist; pass <workdir>/checkpoints or a step in it")
  workdir = Path(config.workdir).absolute()
  data = prepare(config, workdir, for_training=False)
  model_cfg = model_config_from(config, data.tokenizer)
  mesh = shd.make_mesh(config.mesh.shape)
  parts = build_train_step(config, model_cfg, mesh)  # the state layout training wrote (the step is not compiled)
  ckpt = Checkpointer(path)
  with jax.set_mesh(mesh):
    # a LoRA checkpoint goes on the base it was trained on: another one is refused (CheckpointMismatch)
    expect = {"lora": lora_fields(config), "base": lora_base(config)} if parts.trained_only else None
    state, _, meta = ckpt.restore(parts.checkpoint_target(), step, expect_meta=expect)
    ckpt.close()
    if parts.trained_only:
      state = parts.from_checkpoint(state, fresh_state(config.init_from, model_cfg, parts.tx, parts.init_state,
                                                       parts.state_shardings))
    params = state["params"]
    if merge_lora and model_cfg.lora_rank:
      params = merge_adapters(params, model_cfg)
      model_cfg = dataclasses.replace(model_cfg, lora_rank=0)
  return QwenVL(model_cfg), params, data.tokenizer, data, mesh, meta
