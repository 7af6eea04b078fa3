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
manifest["llm"]["stats"]["records"][file]["by_record"] says which record of each file the LLM wrote ("L") and
which a template ("T"); ["quality"] gives each stage's accepted / rejected-by-reason answers (one example each).
Quality gate: a stage whose share of verified answers is below config.min_accepted (--llm-min-accepted) stops the
run with LLMQualityError (round 1 is checked before round 2 is paid for). Refused answers are never written;
each is counted under stats.rejected["<stage>: <reason>"], each template
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
from data_gen.llm.client import LLMClient, LLMConfig, LLMError, LLMQualityError, redact

# The template path's streams and conversations, on purpose: the same seed gives the same turn counts.
from data_gen.templates import count_turns, id_seed, template_conversation, test_conversation

log = logging.getLogger("data_gen.llm")


def llm_params(config: LLMConfig) -> dict[str, Any]:
  """Dataset params for an LLM run (what decides the text; never the key or the endpoint's credentials)."""
  return {**config.params(), "prompt_version": prompts.PROMPT_VERSION}


def _api_seed(seed: int, image_id: str, stage: str, variant: int) -> int:
  h = hashlib.sha256(f"{seed}\x00{image_id}\x00{stage}\x00{variant}".encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _n_turns(seed: int, image_id: str, record: int, max_turns: int) -> int:
  rng = np.random.default_rng(id_seed(seed, image_id, record))
  return int(rng.integers(1, max_turns + 1))


class _Quality:
  """Per stage: answers asked for, accepted by verification, rejected by reason (with one example each)."""

  def __init__(self) -> None:
    self.stages: dict[str, dict[str, Any]] = {}

  def stage(self, name: str, round_no: int) -> dict[str, Any]:
    return self.stages.setdefault(name, {"round": round_no, "requests": 0, "answers": 0, "units": 0,
                                         "accepted": 0, "failed": 0, "rejected": Counter(), "examples": {}})

  def reject(self, st: dict[str, Any], why: str, content: str, n: int = 1) -> None:
    st["rejected"][why] += n
    if why not in st["examples"]:
      st["examples"][why] = redact(" ".join(content.split()))[:160]

  def to_dict(self) -> dict[str, Any]:
    out = {}
    for name, st in self.stages.items():
      # No examples: refused text (an invented box, say) must not reach the dataset folder, its manifest included.
      d = {k: v for k, v in st.items() if k != "examples"}
      d["rejected"] = dict(st["rejected"].most_common())
      d["acceptance"] = round(st["accepted"] / st["units"], 4) if st["units"] else None
      out[name] = d
    return out

  def gate(self, names: list[str], min_accepted: float, client: LLMClient) -> None:
    """LLMQualityError when a stage's acceptance is below min_accepted: the top reasons, one example each."""
    for name in names:
      st = self.stages.get(name)
      if not st or not st["units"] or st["accepted"] >= min_accepted * st["units"]:
        continue
      reasons = st["rejected"].most_common(3)
      if st["failed"]:
        reasons = sorted(reasons + [("request failed", st["failed"])], key=lambda kv: -kv[1])[:3]
      top = "; ".join(f"{n}x {why}" + (f" (e.g. {st['examples'][why]!r})" if why in st["examples"] else "")
                      for why, n in reasons)
      where = client.cache.root if client.cache is not None else "memory (no --llm-cache)"
      raise LLMQualityError(
        f"LLM quality gate: stage {name!r} (round {st['round']}) kept {st['accepted']} of {st['units']} "
        f"({100 * st['accepted'] / st['units']:.0f}%) < --llm-min-accepted {100 * min_accepted:.0f}%; top "
        f"rejections: {top}. Nothing written; answers are cached in {where}: fix the model/server/prompt and "
        "rerun, or pass --llm-min-accepted 0 to write the dataset with templates in place of refused answers")


def _check_round(name: str, results: list[Any], client: LLMClient) -> None:
  failed = sum(r is None for r in results)
  if results and failed > client.config.max_failed_fraction * len(results):
    reasons = ", ".join(f"{n} {r}" for r, n in client.stats.failed.most_common(3))
    where = client.cache.root if client.cache is not None else "memory (no --llm-cache)"
    raise LLMError(f"LLM {client.endpoint} round '{name}': {failed} of {len(results)} requests failed ({reasons}); "
                   f"completed answers are cached in {where}: fix the endpoint and rerun, or raise "
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
  q = _Quality()
  gate = client.config.min_accepted
  async with client:
    used = train_f + test_f
    bodies = round1_bodies(client, used, seed)
    log.info("LLM round 1 (description): %d requests", len(bodies))
    res = await client.complete_many(bodies, round_name=ROUND1, labels=[f.image_id for f in used])
    _check_round(ROUND1, res, client)
    st = q.stage("description", 1)
    for f, c in zip(used, res, strict=True):
      st["requests"] += 1
      st["units"] += 1
      if c is None:
        st["failed"] += 1
        continue
      st["answers"] += 1
      text, why = verify.check_description(c.content, f)
      if text is None:
        stats.rejected[f"description: {why}"] += 1
        q.reject(st, why or "?", c.content)
      else:
        desc[f.image_id] = text
        stats.accepted["description"] += 1
        st["accepted"] += 1
    stats.quality = q.to_dict()
    q.gate(["description"], gate, client)  # before round 2 is paid for

    jobs, bodies = round2_jobs(client, train_f, test_f, desc, seed=seed, max_turns=max_turns,
                               records_per_image=records_per_image)
    log.info("LLM round 2 (regions + conversation): %d requests", len(bodies))
    res = await client.complete_many(bodies, round_name=ROUND2,
                                     labels=[f"{k} {f.image_id}" + (f" #{r}" if k == "conversation" else "")
                                             for k, f, r in jobs])
    _check_round(ROUND2, res, client)

  for (kind, f, r), c in zip(jobs, res, strict=True):
    st = q.stage(kind, 2)
    st["requests"] += 1
    n_units = len({tuple(o.box) for o in f.objects}) + 1 if kind == "regions" else 1  # regions: boxes + overall
    st["units"] += n_units
    if c is None:
      st["failed"] += n_units
      continue
    st["answers"] += 1
    if kind == "regions":
      boxes, ov, reasons = verify.check_regions(c.content, f)
      for why in reasons:
        stats.rejected[f"regions: {why}"] += 1
        q.reject(st, why, c.content)
      regions[f.image_id] = boxes
      stats.accepted["region"] += len(boxes)
      st["accepted"] += len(boxes) + (ov is not None)
      if ov is not None:
        overall[f.image_id] = ov
        stats.accepted["overall"] += 1
    else:
      turns, why = verify.check_conversation(c.content, f, max_turns)
      if turns is None:
        stats.rejected[f"conversation: {why}"] += 1
        q.reject(st, why or "?", c.content)
      else:
        convs[(f.image_id, r)] = turns
        stats.accepted["conversation"] += 1
        st["accepted"] += 1
  stats.quality = q.to_dict()
  q.gate(["regions", "conversation"], gate, client)
  return {"regions": regions, "overall": overall, "conversations": convs}


ROUND1 = "1 description"
ROUND2 = "2 regions + conversation"


def round1_bodies(client: LLMClient, used: list[T.ImageFacts], seed: int) -> list[dict[str, Any]]:
  return [client.build_request(prompts.description_messages(f), seed=_api_seed(seed, f.image_id, "description", 0))
          for f in used]


def round2_jobs(client: LLMClient, train_f: list[T.ImageFacts], test_f: list[T.ImageFacts], desc: dict[str, str],
                *, seed: int, max_turns: int, records_per_image: int
                ) -> tuple[list[tuple[str, T.ImageFacts, int]], list[dict[str, Any]]]:
  """Round two's (kind, facts, record) and request bodies, for the images whose description is in `desc`."""
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
  return jobs, bodies


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
  prov: dict[str, list[str]] = {"train.json": [], **{f"test_{t}.json": [] for t in T.TASKS}}  # L: LLM, T: template
  for f in facts_list:
    if f.case_id in train_cases:
      for r in range(records_per_image):
        turns = got["conversations"].get((f.image_id, r))
        if turns is None:
          turns, kind = template_conversation(f, seed, r, max_turns)
          stats.fallback["train conversation"] += 1
          prov["train.json"].append("T")
        else:
          prov["train.json"].append("L")
          turns = [list(t) for t in turns]
          turns[0][0] = T.image_prefix(f.image_id) + turns[0][0]
          kind = _task_of(turns)
        train.append(T.record(f, turns, kind))
        count_turns(qa, f, turns)
    elif f.case_id in test_cases:
      for ti, task in enumerate(T.TASKS):
        conv = test_conversation(f, seed, ti)
        llm_text = None
        if task == "GC":
          box = parse_boxes(conv[0][0])[0]
          llm_text = got["regions"].get(f.image_id, {}).get(box)
          if llm_text is None:
            stats.fallback["test GC"] += 1
        elif task == "MII":
          llm_text = got["overall"].get(f.image_id)
          if llm_text is None:
            stats.fallback["test MII"] += 1
        if llm_text is not None:
          conv[0][1] = llm_text
        prov[f"test_{task}.json"].append("T" if llm_text is None else "L")
        test[task].append(T.record(f, conv, task))
        qa["test"][task][f.modality] += 1
  counts = {s: {t: dict(c) for t, c in d.items()} for s, d in qa.items()}
  stats.records = {name: {"llm": p.count("L"), "template": p.count("T"), "by_record": "".join(p)}
                   for name, p in prov.items()}
  info = {"config": client.config.describe(), "prompt_version": prompts.PROMPT_VERSION,
          "stats": stats.to_dict()}
  log.info("LLM stage: %d requests, %d cache hits, %d HTTP calls, rejected %s", stats.requests,
           stats.cache_hits, stats.http_calls, dict(stats.rejected))
  return train, test, counts, info
