"""Orbax checkpoints of the train state plus the input iterator's position.

One `CheckpointManager` per run directory holding three items per step: `state` (the sharded
pytree, restored straight into the target shardings), `data` (the Grain iterator state as JSON, so
a resumed run sees exactly the batches it would have seen) and `meta` (step, config name, mesh shape,
process count — checked on restore, since a silently different layout is the classic resume bug).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


def checkpoint_path(directory: str | Path) -> Path | epath.Path:
  """A local folder made absolute, or a URL (gs://bucket/...) kept intact for Orbax's epath layer
  (pathlib would fold "gs://b" into "gs:/b")."""
  if "://" in str(directory):
    return epath.Path(str(directory))
  return Path(directory).absolute()


class Checkpointer:
  def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = checkpoint_path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: dict | None, meta: dict) -> None:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state or {}),
      meta=ocp.args.JsonSave({**meta, "step": int(step)}),
    )
    self.manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None, *, expect_meta: dict | None = None):
    """Returns (state, data_state, meta). `abstract_state` carries the target shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    meta = dict(restored.meta)
    for key, want in (expect_meta or {}).items():
      have = meta.get(key)
      if have is not None and json.dumps(have) != json.dumps(want):
        raise ValueError(
          f"checkpoint {self.directory}/{step} was written with {key}={have}, this run has {key}={want}; "
          f"use a fresh --config.workdir or the same setting"
        )
    return restored.state, dict(restored.data), meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

