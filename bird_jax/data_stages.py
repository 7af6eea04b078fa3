"""The trainer's input streams: the main set's batches, and with data stages (data.curriculum) a first-stage set
read for the first `steps` optimizer steps and, with `keep`, on a share of the later steps.

`DataStages` opens, resumes, switches and checkpoints these Grain iterators; `bird_jax.train` asks it which
stream each step reads. Checkpoints store {"stage", "iterator"} (plus "kept_iterator" while a first-stage stream
is kept), so a resumed run reads the same batches as an unbroken one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import ml_collections

from bird_jax.config_util import ConfigError

log = logging.getLogger("bird_jax")


def make_train_dataset_or_exit(*args, **kwargs):
  """make_train_dataset, with "no record fits data.seq_len" as a one-line config error."""
  from bird_jax.data.pipeline import NoRecordFits, make_train_dataset

  try:
    return make_train_dataset(*args, **kwargs)
  except NoRecordFits as e:
    raise ConfigError(str(e)) from None


def reads_kept_set(step: int, keep: float) -> bool:
  """Whether optimizer step `step` (0-based) of the main stage reads the first-stage set: a pure function of
  the step, `keep` of the steps spread evenly (keep=0.25: every 4th step), so a resumed run picks the same."""
  return math.floor((step + 1) * keep) > math.floor(step * keep)


class DataStages:
  """The batches of a run, stage by stage ("curriculum", then "main"), each stream with its own position."""

  def __init__(self, config: ml_collections.ConfigDict, data: Any, model_cfg: Any, train_source: Any,
               per_process: int) -> None:
    self.config, self.data, self.model_cfg = config, data, model_cfg
    self.train_source, self.per_process = train_source, per_process
    self.curriculum_steps = config.data.curriculum.steps if data.curriculum_tfds_dir else 0
    self.keep = config.data.curriculum.keep if self.curriculum_steps else 0.0
    self.stage = "main"
    self.batches = None
    self.kept = None  # the first-stage stream the main stage keeps reading from (data.curriculum.keep)

  def seq_len(self, stage: str) -> int:
    c = self.config.data
    return (c.curriculum.seq_len or c.seq_len) if stage == "curriculum" else c.seq_len

  def open(self, stage: str, iterator_state: dict | None):
    """Batches of one data stage ("curriculum" or "main"), resumed from `iterator_state` when given."""
    from bird_jax.data.pipeline import load_split

    config = self.config
    source, seq_len = self.train_source, self.seq_len(stage)
    if stage == "curriculum":
      source = load_split(self.data.curriculum_tfds_dir, "train", config.data.builder_config)
    it = iter(make_train_dataset_or_exit(
      source, self.data.tokenizer, seq_len=seq_len, image_size=self.model_cfg.image_size,
      batch_size=self.per_process, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), packing=config.data.packing,
      max_images_per_row=config.data.images_per_row or None, worker_count=config.data.worker_count,
      loss_on=config.data.loss_on, system=config.data.system_prompt or None,
    ))
    if iterator_state:
      it.set_state(iterator_state)
    return it

  def start(self, start_step: int, data_state: dict | None, total_steps: int) -> None:
    """Opens the streams step `start_step` reads, at the positions a checkpoint's `data_state` saved."""
    # Older checkpoints hold the main stream's iterator state alone.
    if data_state and "stage" not in data_state:
      data_state = {"stage": "main", "iterator": data_state}
    self.stage = "curriculum" if start_step < self.curriculum_steps else "main"
    same_stage = bool(data_state) and data_state["stage"] == self.stage
    self.batches = self.open(self.stage, data_state["iterator"] if same_stage else None)
    if self.keep and self.stage == "main":
      # A checkpoint of the main stage holds the kept stream's position; one saved at the last first-stage step
      # holds it as its own iterator: either way the first-stage stream goes on from there, as in an unbroken run.
      kept_position = (data_state or {}).get("kept_iterator")
      if kept_position is None and data_state and data_state["stage"] == "curriculum":
        kept_position = data_state["iterator"]
      self.kept = self.open("curriculum", kept_position)
    if self.curriculum_steps:
      log.info("data stages: steps [0, %d) on %s, then %s", self.curriculum_steps, self.data.curriculum_tfds_dir,
               self.data.tfds_dir)
      if self.curriculum_steps >= total_steps:
        log.warning("data.curriculum.steps=%d >= train.steps=%d: this run never reaches the main set",
                    self.curriculum_steps, total_steps)

  def for_step(self, step: int) -> tuple[Any, str, int]:
    """(iterator, data set label for metrics.jsonl, row length) of optimizer step `step` (0-based); moves on to
    the main stage when the first one is done."""
    if self.stage == "curriculum" and step >= self.curriculum_steps:
      self.kept = self.batches if self.keep else None  # the first-stage stream goes on from where it is
      self.stage, self.batches = "main", self.open("main", None)
      log.info("step %d: curriculum stage done, training on the main set%s", step,
               f" ({self.keep:.0%} of the steps still on the first-stage set)" if self.keep else "")
    from_kept = self.kept is not None and reads_kept_set(step, self.keep)
    first = self.stage == "curriculum" or from_kept
    return (self.kept if from_kept else self.batches), ("first" if first else "main"), \
      self.seq_len("curriculum" if first else "main")

  def position(self) -> dict[str, Any]:
    """What a checkpoint stores to resume these streams."""
    data_position = {"stage": self.stage, "iterator": self.batches.get_state()}
    if self.kept is not None:
      data_position["kept_iterator"] = self.kept.get_state()
    return data_position
