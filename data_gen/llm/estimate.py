"""`--llm-dry-run`: what the LLM stage would send and cost, computed before anything is sent (no key needed).

Per round: requests, how many the cache already answers, prompt tokens of the rest (the real request bodies,
counted by tokens.TokenCounter: tiktoken for OpenAI model names, else chars/3), expected completion tokens and
the worst case (max_tokens each), and the price synchronously and through the Batch API (half).

Round two's prompts contain round one's description. Where it is cached (and passes verification) the real
request is built, so a rerun's estimate is exact about what is cached; elsewhere the prompt is built with an empty
description and the expected description length is added to its count. Expected completion tokens are the mean of
the cached answers of that stage when there are any, else these rules of thumb (tokens): description 130; regions
45 per structure + 70; conversation 60 per turn + 20 (capped at max_tokens). They are guesses about a model's
verbosity, not measurements: the worst case is the bound, and --llm-max-cost enforces it.
"""

from __future__ import annotations

import math
from typing import Any

from data_gen import tasks as T
from data_gen.llm import prompts, verify
from data_gen.llm.client import BATCH_DISCOUNT, LLMClient, LLMConfig, cache_key
from data_gen.llm.stage import _n_turns, round1_bodies, round2_jobs

EXPECTED_DESCRIPTION = 130


def _rule_of_thumb(kind: str, f: T.ImageFacts, n_turns: int) -> int:
  if kind == "description":
    return EXPECTED_DESCRIPTION
  if kind == "regions":
    return 45 * len({tuple(o.box) for o in f.objects}) + 70
  return 60 * n_turns + 20


def estimate(facts_list: list[T.ImageFacts], config: LLMConfig, *, train_cases: set[str], test_cases: set[str],
             seed: int, max_turns: int, records_per_image: int) -> dict[str, Any]:
  client = LLMClient(config)  # only build_request, cache lookups and token counts: nothing is opened or sent
  train_f = [f for f in facts_list if f.case_id in train_cases]
  test_f = [f for f in facts_list if f.case_id in test_cases]
  used = train_f + test_f
  price = client.price
  rounds = []

  def one_round(name: str, items: list[tuple[str, T.ImageFacts, int, dict[str, Any], int]]) -> dict[str, Any]:
    """items: (stage, facts, n_turns, body, extra prompt tokens)."""
    seen: set[str] = set()
    cached = 0
    stage_hits: dict[str, list[int]] = {}
    send: list[tuple[str, T.ImageFacts, int, dict[str, Any], int]] = []
    for it in items:
      k = cache_key(it[3])
      entry = client._lookup(k)
      if entry is not None or k in seen:
        cached += 1
        if entry is not None:
          stage_hits.setdefault(it[0], []).append(int((entry["response"].get("usage") or {})
                                                      .get("completion_tokens") or 0))
        continue
      seen.add(k)
      send.append(it)
    prompt = sum(client.tokens.count_messages(b["messages"]) + extra for _, _, _, b, extra in send)
    expected = 0
    for stage, f, n, b, _ in send:
      hits = stage_hits.get(stage)
      guess = round(sum(hits) / len(hits)) if hits else _rule_of_thumb(stage, f, n)
      expected += min(guess, int(b.get("max_tokens") or config.max_tokens))
    worst = sum(int(b.get("max_tokens") or config.max_tokens) for *_, b, _ in send)
    r: dict[str, Any] = {"round": name, "requests": len(items), "cached": cached, "to_send": len(send),
                         "prompt_tokens": prompt, "expected_completion_tokens": expected,
                         "max_completion_tokens": worst}
    r.update(_prices(price, prompt, expected, worst))
    return r

  b1 = round1_bodies(client, used, seed)
  rounds.append(one_round("1 description", [("description", f, 0, b, 0) for f, b in zip(used, b1, strict=True)]))

  # Round two: real bodies where the description is cached and verified, else an empty one + its expected size.
  desc: dict[str, str] = {}
  for f, b in zip(used, b1, strict=True):
    entry = client._lookup(cache_key(b))
    text = verify.check_description(entry["response"].get("content") or "", f)[0] if entry else None
    desc[f.image_id] = text if text is not None else ""
  jobs, b2 = round2_jobs(client, train_f, test_f, desc, seed=seed, max_turns=max_turns,
                         records_per_image=records_per_image)
  desc_tokens = min(EXPECTED_DESCRIPTION, config.max_tokens)
  items = []
  for (kind, f, r), b in zip(jobs, b2, strict=True):
    n = _n_turns(seed, f.image_id, r, max_turns) if kind == "conversation" else 0
    items.append((kind, f, n, b, 0 if desc[f.image_id] else desc_tokens))
  rounds.append(one_round("2 regions + conversation", items))

  total = {k: sum(r[k] for r in rounds) for k in ("requests", "cached", "to_send", "prompt_tokens",
                                                  "expected_completion_tokens", "max_completion_tokens")}
  total.update(_prices(price, total["prompt_tokens"], total["expected_completion_tokens"],
                       total["max_completion_tokens"]))
  out: dict[str, Any] = {"model": config.model, "tokenizer": client.tokens.method,
                         "price_per_mtok": list(price) if price else None, "rounds": rounds, "total": total,
                         "prompt_version": prompts.PROMPT_VERSION}
  if config.rpm:
    out["minutes_at_rpm"] = round(total["to_send"] / config.rpm, 2)
  if config.tpm:
    out["minutes_at_tpm"] = round((total["prompt_tokens"] + total["max_completion_tokens"]) / config.tpm, 2)
  if config.max_cost_usd is not None:
    out["max_cost_usd"] = config.max_cost_usd
  return out


def _prices(price: tuple[float, float] | None, prompt: int, expected: int, worst: int) -> dict[str, Any]:
  if price is None:
    return {"cost_usd": None, "cost_batch_usd": None, "worst_cost_usd": None, "worst_cost_batch_usd": None}
  sync = (prompt * price[0] + expected * price[1]) / 1e6
  worst_sync = (prompt * price[0] + worst * price[1]) / 1e6
  return {"cost_usd": round(sync, 6), "cost_batch_usd": round(sync * BATCH_DISCOUNT, 6),
          "worst_cost_usd": round(worst_sync, 6), "worst_cost_batch_usd": round(worst_sync * BATCH_DISCOUNT, 6)}


def format_estimate(est: dict[str, Any]) -> str:
  """The table `--llm-dry-run` prints."""

  def usd(v: float | None) -> str:
    return "?" if v is None else f"${v:.4f}"

  lines = [f"LLM dry run: {est['model']}, prompt tokens by {est['tokenizer']}, price "
           + ("unknown (pass --llm-price-in/--llm-price-out)" if est["price_per_mtok"] is None else
              f"${est['price_per_mtok'][0]:g} / ${est['price_per_mtok'][1]:g} per 1M prompt / completion tokens"),
           "",
           "| round | requests | cached | to send | prompt tok | completion tok (expected / max) "
           "| cost sync (expected / worst) | cost Batch (expected / worst) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in est["rounds"] + [dict(est["total"], round="total")]:
    lines.append(f"| {r['round']} | {r['requests']} | {r['cached']} | {r['to_send']} | {r['prompt_tokens']} | "
                 f"{r['expected_completion_tokens']} / {r['max_completion_tokens']} | {usd(r['cost_usd'])} / "
                 f"{usd(r['worst_cost_usd'])} | {usd(r['cost_batch_usd'])} / {usd(r['worst_cost_batch_usd'])} |")
  if "minutes_at_rpm" in est or "minutes_at_tpm" in est:
    m = max(est.get("minutes_at_rpm", 0), est.get("minutes_at_tpm", 0))
    lines.append(f"\nat --llm-rpm/--llm-tpm: at least {math.ceil(m * 60)} s of pacing")
  if "max_cost_usd" in est:
    fits = est["total"]["worst_cost_usd"] is not None and est["total"]["worst_cost_usd"] <= est["max_cost_usd"]
    lines.append(f"--llm-max-cost ${est['max_cost_usd']:.4f}: "
                 + ("the worst case fits" if fits else "the run may stop at the cap (rerun with a higher one)"))
  lines.append("Round two counts assume every description passes verification; nothing was sent.")
  return "\n".join(lines)
