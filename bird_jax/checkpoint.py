"""Orbax checkpoints of the train state plus the input iterator's position, verified on restore.

One `CheckpointManager` per run directory holding three items per step: `state` (the sharded
pytree, restored straight into the target shardings), `data` (the Grain iterator state as JSON, so
a resumed run sees exactly the batches it would have seen) and `meta` (step, config name, mesh shape,
process count — checked on restore, since a silently different layout is the classic resume bug).

Integrity: Orbax makes a step appear only once it is completely written (atomic rename of its
`*.orbax-checkpoint-tmp*` folder), but it has no checksum of the data, so flipped bytes are restored
silently. `meta` therefore also holds a checksum of every array of `state` (computed on the devices, so it
costs one pass over the state and no host copy) and a SHA-256 of `data`; `restore` recomputes both and goes
down the steps, newest first, to the newest one that restores and verifies. Damaged steps are skipped with
one warning naming them, and (`set_aside=True`, the trainer) moved to `<dir>.damaged/` so the run can write
that step again — never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath


def checkpoint_path(directory: str | Path) -> Path | epath.Path:
  """A local folder made absolute, or a URL (gs://bucket/...) kept intact for Orbax's epath layer
  (pathlib would fold "gs://b" into "gs:/b")."""
  if "://" in str(directory):
    return epath.Path(str(directory))
  return Path(directory).absolute()

log = logging.getLogger("bird_jax")


class CheckpointMismatch(ValueError):
  """The checkpoint is intact but was written by another setup (expect_meta differs); one line with the fix."""


class DamagedCheckpoint(RuntimeError):
  """No step could be restored and verified; the message is one line naming each step and why."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * (2i + 1) mod 2^32 over the flat index i: any single flipped bit changes it (an odd weight
  times ±2^k is never 0 mod 2^32), and integer addition makes it independent of the sharding and device count.
  The flat index is built from per-axis iotas, so no reshape (which could gather a sharded array) is needed."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte types get a trailing axis of 2
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _tree_checksums(tree: Any) -> Any:
  return jax.tree.map(_leaf_checksum, tree)


def state_checksums(state: Any) -> dict[str, int]:
  """{leaf path: checksum} of a pytree of arrays (see _leaf_checksum)."""
  sums = jax.device_get(_tree_checksums(state))
  return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def data_digest(data_state: dict) -> str:
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Checkpointer:
  def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = checkpoint_path(directory)
    options = ocp.CheckpointManagerOptions(
      # cleanup_tmp_directories: a step killed mid-write leaves a `*.orbax-checkpoint-tmp*` folder; Orbax never
      # lists it as a step, and this removes it when the manager opens.
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: dict | None, meta: dict) -> None:
    data_state = data_state or {}
    # Checksums are computed before the save starts; the state's buffers may be donated to the next step after.
    integrity = {"checksums": state_checksums(state), "data_sha256": data_digest(data_state)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave({**meta, "step": int(step), "integrity": integrity}),
    )
    self.manager.save(step, args=args, force=True)

  def _restore_step(self, abstract_state: Any, step: int, expect_meta: dict | None):
    # The metadata first: a checkpoint of another setup (scan_layers, LoRA) is refused before its state is read
    # into a target of another shape, which would fail like a damaged step and be set aside.
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise ValueError(f"meta is {str(meta)[:80]!r}, not this step's metadata")
    meta = dict(meta)
    for key, want in (expect_meta or {}).items():
      have = meta.get(key)
      if have is not None and json.dumps(have) != json.dumps(want):
        raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} was written with {key}={have}, this run has {key}={want}; "
          f"use a fresh --config.workdir or the same setting"
        )
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    data_state = restored.data
    if not isinstance(data_state, dict):
      raise ValueError(f"data is a {type(data_state).__name__}, not the iterator state")
    integrity = meta.get("integrity")
    if integrity is not None:  # checkpoints written before the checksums existed restore unverified
      if data_digest(dict(data_state)) != integrity["data_sha256"]:
        raise ValueError("the data (iterator state) item does not match its SHA-256")
      have = state_checksums(restored.state)
      bad = [k for k, v in integrity["checksums"].items() if have.get(k) != v]
      if bad or set(have) != set(integrity["checksums"]):
        raise ValueError(f"array checksums differ ({len(bad)} arrays, e.g. {(bad or sorted(have))[0]})")
    return restored.state, dict(data_state), meta

  def restore(self, abstract_state: Any, step: int | None = None, *, expect_meta: dict | None = None,
              set_aside: bool = False):
    """Returns (state, data_state, meta) of `step`, or of the newest step that restores and verifies when `step`
    is None (damaged newer ones skipped with one warning). `abstract_state` carries the target shardings, which
    may differ from the ones saved (Orbax reshards). set_aside=True moves skipped steps to `<dir>.damaged/`.
    Raises DamagedCheckpoint (one line) if nothing verifies, CheckpointMismatch if expect_meta differs."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    skipped: list[tuple[int, str]] = []
    for s in steps:
      try:
        state, data_state, meta = self._restore_step(abstract_state, s, expect_meta)
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 — any failure of a damaged step (Orbax, TensorStore, JSON) is skipped
        skipped.append((s, _one_line(e)))
        continue
      if skipped:
        where = self._set_aside([s for s, _ in skipped]) if set_aside else None
        log.warning("checkpoint: skipped damaged step(s) %s%s; resumed from step %d",
                    "; ".join(f"{k} ({why})" for k, why in skipped),
                    f", moved to {where}" if where else "", s)
      return state, data_state, meta
    raise DamagedCheckpoint(
      f"no valid checkpoint in {self.directory}: " + "; ".join(f"step {k}: {why}" for k, why in skipped)
      + "; move that folder away to start from scratch, or restore a backup of it")

  def _set_aside(self, steps: list[int]) -> Path | None:
    """Moves damaged step folders out of the manager's directory (process 0; never deletes them) so the resumed
    run can save those steps again and the rotation (max_to_keep) counts only good ones."""
    aside = self.directory.parent / f"{self.directory.name}.damaged"
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for s in steps:
        src, dst = self.directory / str(s), aside / str(s)
        k = 1
        while dst.exists():
          dst, k = aside / f"{s}.{k}", k + 1
        if src.exists():
          src.rename(dst)  # a rename in the same folder: local or gs:// (epath)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("bird_jax.checkpoint.set_aside")
    self.manager.reload()
    return aside

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
