"""The template path's records: each image's seeded RNG streams, its templated training conversations and its
one-turn test records (pass 2 of data_gen.pipeline).

The LLM stage (data_gen.llm.stage) draws its turn counts from the same streams and falls back to the same
template conversations, so it builds on this module, as the pipeline does; this module imports neither.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np

from data_gen import tasks as T


def id_seed(seed: int, image_id: str, stream: int) -> list[int]:
  """The RNG seed of one image's stream: records of an image never depend on worker count, source order or
  `limit`; stream r < 1000 is train record r, 1000 + i the test record of task i."""
  h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
  return [seed, h, stream]


def template_conversation(f: T.ImageFacts, seed: int, record: int, max_turns: int,
                          task_weights: dict[str, float] | None = None) -> tuple[list[list[str]], str]:
  """The templated training conversation number `record` of an image: 1..max_turns turns, its own seeded stream."""
  rng = np.random.default_rng(id_seed(seed, f.image_id, record))
  n = int(rng.integers(1, max_turns + 1))
  return T.conversation(f, n, rng, task_weights)


def test_conversation(f: T.ImageFacts, seed: int, task_index: int) -> list[list[str]]:
  """The templated one-turn test record of task T.TASKS[task_index] for an image, from its own seeded stream."""
  rng = np.random.default_rng(id_seed(seed, f.image_id, 1000 + task_index))
  return T.one_turn(f, T.TASKS[task_index], rng)


def count_turns(qa: dict[str, dict[str, Counter]], f: T.ImageFacts, turns: list[list[str]]) -> None:
  """Adds a training record's turns to the manifest's per-turn task counts (qa["train"][task][modality])."""
  for q, a in turns:
    qa["train"][T.classify_turn(q, a)][f.modality] += 1


def build_records(facts: list[T.ImageFacts], train_cases: set[str], test_cases: set[str], *, seed: int,
                  max_turns: int, records_per_image: int, task_weights: dict[str, float] | None = None
                  ) -> tuple[list[dict], dict[str, list[dict]], dict]:
  """-> (train records, {task: test records}, per-turn task counts {split: {task: {modality: n}}})."""
  train: list[dict] = []
  test: dict[str, list[dict]] = {t: [] for t in T.TASKS}
  qa: dict[str, dict[str, Counter]] = {"train": defaultdict(Counter), "test": defaultdict(Counter)}
  for f in facts:
    if f.case_id in train_cases:
      for r in range(records_per_image):
        turns, kind = template_conversation(f, seed, r, max_turns, task_weights)
        train.append(T.record(f, turns, kind))
        count_turns(qa, f, turns)
    elif f.case_id in test_cases:
      for ti, task in enumerate(T.TASKS):
        test[task].append(T.record(f, test_conversation(f, seed, ti), task))
        qa["test"][task][f.modality] += 1
  counts = {s: {t: dict(c) for t, c in d.items()} for s, d in qa.items()}
  return train, test, counts
