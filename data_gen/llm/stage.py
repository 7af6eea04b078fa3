"""The LLM stage: image facts -> LLM-written Med-GRIT records (checked against the masks) + stats.

Two request rounds (Batch API mode: one batch per round):
  1. (a) a global description for every train and test image;
  2. (b) region descriptions + overall answer for every test image, and (c) `records_per_image` multi-turn
     conversations for every train image; both get the facts and the verified description.
What is written:
  train.json   the verified conversation; if it was refused (or its request failed) the template conversation
               the template path would have written for that (image, record) instead;
  test_VG/RO   template (fully determined by the masks, nothing for an LLM to add);
  test_GC      same target box and question as the template path; answer = the verified LLM description of
               that box, else the template sentence;
  test_MII     same question; answer = the verified LLM overall answer, else the template paragraph.
Refused answers are never written; each is counted under stats.rejected["<stage>: <reason>"], each template
stand-in under stats.fallback. Turn counts per record come from the same RNG stream as the template path, so an
LLM dataset and a template dataset with one seed have the same images, split and turn-count draws.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from data_gen import tasks as T
from data_gen.boxes import Box, parse_boxes
from data_gen.llm import prompts, verify
from data_gen.llm.client import LLMClient, LLMConfig, LLMError

log = logging.getLogger("data_gen.llm")


def llm_params(config: LLMConfig) -> dict[str, Any]:
  """Dataset params for an LLM run (what decides the text; never the key or the endpoint's credentials)."""
  return {**config.params(), "prompt_version": prompts.PROMPT_VERSION}


def _id_seed(seed: int, image_id: str, stream: int) -> list[int]:
  from data_gen.pipeline import _id_seed as pipeline_id_seed  # the template path's streams, on purpose

  return pipeline_id_seed(seed, image_id, stream)


def _api_seed(seed: int, image_id: str, stage: str, variant: int) -> int:
  h = hashlib.sha256(f"{seed}\x00{image_id}\x00{stage}\x00{variant}".encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _n_turns(seed: int, image_id: str, record: int, max_turns: int) -> int:
  rng = np.random.default_rng(_id_seed(seed, image_id, record))
  return int(rng.integers(1, max_turns + 1))


def _check_round(name: str, results: list[Any], client: LLMClient) -> None:
  failed = sum(r is None for r in results)
  if results and failed > client.config.max_failed_fraction * len(results):
    reasons = ", ".join(f"{n} {r}" for r, n in client.stats.failed.most_common(3))
    where = client.cache.root if client.cache is not None else "memory (no --llm-cache)"
    raise LLMError(f"LLM round '{name}': {failed} of {len(results)} requests failed ({reasons}); completed "
                   f"answers are cached in {where}: fix the endpoint and rerun, or raise "
                   "--llm-max-failed-fraction")


async def _generate(facts_list: list[T.ImageFacts], client: LLMClient, *, train_cases: set[str],
                    test_cases: set[str], seed: int, max_turns: int, records_per_image: int) -> dict[str, Any]:
  stats = client.stats
  train_f = [f for f in facts_list if f.case_id in train_cases]
  test_f = [f for f in facts_list if f.case_id in test_cases]
  desc: dict[str, str] = {}
  regions: dict[str, dict[Box, str]] = {}
  overall: dict[str, str] = {}
  convs: dict[tuple[str, int], list[list[str]]] = {}
  async with client:
    used = train_f + test_f
    bodies = [client.build_request(prompts.description_messages(f),
                                   seed=_api_seed(seed, f.image_id, "description", 0)) for f in used]
    log.info("LLM round 1 (description): %d requests", len(bodies))
    res = await client.complete_many(bodies)
    _check_round("description", res, client)
    for f, c in zip(used, res, strict=True):
      if c is None:
        continue
      text, why = verify.check_description(c.content, f)
      if text is None:
        stats.rejected[f"description: {why}"] += 1
      else:
        desc[f.image_id] = text
        stats.accepted["description"] += 1

    jobs: list[tuple[str, T.ImageFacts, int]] = []
    bodies = []
    for f in test_f:
      if f.image_id in desc:
        jobs.append(("regions", f, 0))
        bodies.append(client.build_request(prompts.regions_messages(f, desc[f.image_id]),
                                           seed=_api_seed(seed, f.image_id, "regions", 0), json_mode=True))
    for f in train_f:
      if f.image_id in desc:
        for r in range(records_per_image):
          n = _n_turns(seed, f.image_id, r, max_turns)
          jobs.append(("conversation", f, r))
          bodies.append(client.build_request(prompts.conversation_messages(f, desc[f.image_id], n, r),
                                             seed=_api_seed(seed, f.image_id, "conversation", r), json_mode=True))
    log.info("LLM round 2 (regions + conversation): %d requests", len(bodies))
    res = await client.complete_many(bodies)
    _check_round("regions + conversation", res, client)

  for (kind, f, r), c in zip(jobs, res, strict=True):
    if c is None:
      continue
    if kind == "regions":
      boxes, ov, reasons = verify.check_regions(c.content, f)
      for why in reasons:
        stats.rejected[f"regions: {why}"] += 1
      regions[f.image_id] = boxes
      stats.accepted["region"] += len(boxes)
      if ov is not None:
        overall[f.image_id] = ov
        stats.accepted["overall"] += 1
    else:
      turns, why = verify.check_conversation(c.content, f, max_turns)
      if turns is None:
        stats.rejected[f"conversation: {why}"] += 1
      else:
        convs[(f.image_id, r)] = turns
        stats.accepted["conversation"] += 1
  return {"regions": regions, "overall": overall, "conversations": convs}


def _task_of(turns: list[list[str]]) -> str:
  kinds = {T.classify_turn(q, a) for q, a in turns}
  return kinds.pop() if len(kinds) == 1 else "mixed"


def llm_records(facts_list: list[T.ImageFacts], client: LLMClient | LLMConfig, *, train_cases: set[str],
                test_cases: set[str], seed: int, max_turns: int, records_per_image: int
                ) -> tuple[list[dict], dict[str, list[dict]], dict, dict[str, Any]]:
  """-> (train records, {task: test records}, per-turn task counts, LLM stats) -- build_records' shape + stats.

  Raises LLMError for a run-stopping problem (bad key/model/URL, too many failed requests, batch timeout);
  everything completed before it is in the cache, so a rerun continues where this one stopped.
  """
  if isinstance(client, LLMConfig):
    client = LLMClient(client)
  got = asyncio.run(_generate(facts_list, client, train_cases=train_cases, test_cases=test_cases, seed=seed,
                              max_turns=max_turns, records_per_image=records_per_image))
  stats = client.stats
  train: list[dict] = []
  test: dict[str, list[dict]] = {t: [] for t in T.TASKS}
  qa: dict[str, dict[str, Counter]] = {"train": defaultdict(Counter), "test": defaultdict(Counter)}
  for f in facts_list:
    if f.case_id in train_cases:
      for r in range(records_per_image):
        turns = got["conversations"].get((f.image_id, r))
        if turns is None:
          from data_gen.pipeline import template_conversation

          turns, kind = template_conversation(f, seed, r, max_turns)
          stats.fallback["train conversation"] += 1
        else:
          turns = [list(t) for t in turns]
          turns[0][0] = T.image_prefix(f.image_id) + turns[0][0]
          kind = _task_of(turns)
        train.append(T.record(f, turns, kind))
        for q, a in turns:
          qa["train"][T.classify_turn(q, a)][f.modality] += 1
    elif f.case_id in test_cases:
      for ti, task in enumerate(T.TASKS):
        rng = np.random.default_rng(_id_seed(seed, f.image_id, 1000 + ti))
        conv = T.one_turn(f, task, rng)
        if task == "GC":
          box = parse_boxes(conv[0][0])[0]
          text = got["regions"].get(f.image_id, {}).get(box)
          if text is None:
            stats.fallback["test GC"] += 1
          else:
            conv[0][1] = text
        elif task == "MII":
          text = got["overall"].get(f.image_id)
          if text is None:
            stats.fallback["test MII"] += 1
          else:
            conv[0][1] = text
        test[task].append(T.record(f, conv, task))
        qa["test"][task][f.modality] += 1
  counts = {s: {t: dict(c) for t, c in d.items()} for s, d in qa.items()}
  info = {"config": client.config.describe(), "prompt_version": prompts.PROMPT_VERSION,
          "stats": stats.to_dict()}
  log.info("LLM stage: %d requests, %d cache hits, %d HTTP calls, rejected %s", stats.requests,
           stats.cache_hits, stats.http_calls, dict(stats.rejected))
  return train, test, counts, info
