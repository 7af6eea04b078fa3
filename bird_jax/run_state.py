"""A training run's state, for whoever needs it after (or beside) training: evaluation, export, the API,
the probes. `load_checkpoint` rebuilds a run's model config, abstract state and shardings exactly as the
trainer did (from bird_jax.train_step) and restores the params.

It sits below train, eval, inference, export and api and imports none of them, so none depends on another's
internals for this.
"""

from __future__ import annotations

from pathlib import Path


def load_checkpoint(config, checkpoint: str | Path):
  """(model, params, tokenizer, prepared data, mesh, meta) from a training checkpoint: a run's `checkpoints/`
  folder (→ newest step) or one step folder inside it. The run's data/tokenizer are found (or rebuilt) from
  config.workdir exactly as training did."""

  from bird_jax import sharding as shd
  from bird_jax.checkpoint import Checkpointer
  from bird_jax.model import QwenVL
  from bird_jax.prepare import prepare
  from bird_jax.train_step import build_optimizer, create_state_shardings, model_config_from

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
  _, _, abstract_state, shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(config.train, p, config.train.steps), mesh,
    shd.rules_from_config(config.mesh.rules), config.seed)
  target = shd.abstract_with_shardings(abstract_state, shardings)
  ckpt = Checkpointer(path)
  state, _, meta = ckpt.restore(target, step)
  ckpt.close()
  return QwenVL(model_cfg), state["params"], data.tokenizer, data, mesh, meta
