"""The --llm-* command-line flags of `python -m data_gen` (kept here so __main__ only wires them in)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_gen.llm.client import LLMConfig


def add_llm_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("LLM conversations (Med-GRIT stage 2/3; without --llm-base-url: templates only)")
  g.add_argument("--llm-base-url", default=None,
                 help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
  g.add_argument("--llm-model", default="gpt-4o-mini", help="chat model name at that endpoint")
  g.add_argument("--llm-api-key-env", default="OPENAI_API_KEY",
                 help="environment variable holding the API key (the key itself is never written anywhere)")
  g.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight at once")
  g.add_argument("--llm-cache", type=Path, default=None,
                 help="response cache folder (default: <out>.llm-cache next to --out); reruns reuse it")
  g.add_argument("--llm-batch", action="store_true", help="use the OpenAI Batch API (half price, up to 24 h)")
  g.add_argument("--llm-max-retries", type=int, default=5, help="retries on 429 / 5xx / timeouts")
  g.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request")
  g.add_argument("--llm-temperature", type=float, default=0.7)
  g.add_argument("--llm-max-tokens", type=int, default=1024)
  g.add_argument("--llm-no-json-mode", action="store_true",
                 help="don't send response_format=json_object (for servers that reject it)")
  g.add_argument("--llm-price-in", type=float, default=None, help="USD per 1M prompt tokens (cost report)")
  g.add_argument("--llm-price-out", type=float, default=None, help="USD per 1M completion tokens")
  g.add_argument("--llm-batch-poll", type=float, default=30.0, help="seconds between Batch API status polls")
  g.add_argument("--llm-max-failed-fraction", type=float, default=0.1,
                 help="stop when more than this fraction of a round's requests fail")
  g.add_argument("--llm-min-accepted", type=float, default=0.5,
                 help="quality gate: stop (exit 4, nothing written) when a stage keeps less than this fraction of "
                      "its answers after verification (0: never)")
  g.add_argument("--llm-dry-run", action="store_true",
                 help="print requests, tokens and price (sync and Batch) per round; send nothing, write nothing")
  g.add_argument("--llm-max-cost", type=float, default=None, metavar="USD",
                 help="stop (exit 3) before the answers would cost more than this, cached ones included; a rerun "
                      "with a higher cap continues")
  g.add_argument("--llm-rpm", type=float, default=None, help="client-side limit: requests per minute")
  g.add_argument("--llm-tpm", type=float, default=None,
                 help="client-side limit: tokens per minute (prompt + max_tokens per request, as OpenAI counts)")


def llm_config_from_args(a: argparse.Namespace) -> LLMConfig | None:
  if not a.llm_base_url:
    return None
  out = Path(a.out)
  cache = a.llm_cache if a.llm_cache is not None else out.parent / f"{out.name}.llm-cache"
  return LLMConfig(
    base_url=a.llm_base_url, model=a.llm_model, api_key_env=a.llm_api_key_env, concurrency=a.llm_concurrency,
    max_retries=a.llm_max_retries, timeout_s=a.llm_timeout, cache_dir=cache, temperature=a.llm_temperature,
    max_tokens=a.llm_max_tokens, json_mode=not a.llm_no_json_mode, batch=a.llm_batch, batch_poll_s=a.llm_batch_poll,
    price_in=a.llm_price_in, price_out=a.llm_price_out, max_failed_fraction=a.llm_max_failed_fraction,
    min_accepted=a.llm_min_accepted, max_cost_usd=a.llm_max_cost, rpm=a.llm_rpm, tpm=a.llm_tpm, progress=True,
  )


def _counts(c: dict[str, int] | None) -> str:
  if not c:
    return "0"
  return f"{sum(c.values())} (" + ", ".join(f"{k}: {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1])) + ")"


def summary(info: dict[str, Any]) -> str:
  """The CLI's lines: what was asked and paid, what was kept per stage, which records the LLM wrote."""
  s, c = info["stats"], info["config"]
  cost = "unknown (pass --llm-price-in/--llm-price-out)" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
  batch = f", {s['batches']} batches ({s.get('resumed_batches', 0)} resumed)" if c["batch"] else ""
  lines = [f"  llm {c['model']}{' (batch)' if c['batch'] else ''}: {s['requests']} requests, "
           f"{s['cache_hits']} cached, {s['http_calls']} HTTP calls{batch}, retries {_counts(s['retries'])}, "
           f"tokens {s['prompt_tokens']}+{s['completion_tokens']}, cost {cost}, {s.get('seconds', 0):.1f} s"]
  if s.get("usage_estimated"):
    lines[-1] += f" ({s['usage_estimated']} answers without usage: tokens counted here)"
  for name, q in (s.get("quality") or {}).items():
    rate = "-" if q["acceptance"] is None else f"{100 * q['acceptance']:.0f}%"
    lines.append(f"  llm {name}: kept {q['accepted']}/{q['units']} ({rate}), failed {q['failed']}, rejected "
                 f"{_counts(q['rejected'])}")
  rec = s.get("records") or {}
  if rec:
    lines.append("  llm records written by the LLM / templates: " + ", ".join(
      f"{name} {r['llm']}/{r['template']}" for name, r in rec.items()
      if name in ("train.json", "test_GC.json", "test_MII.json")))  # VG/RO test answers are always templates
  lines.append(f"  llm failed {_counts(s['failed'])}; template fallback {_counts(s['fallback'])}")
  if s.get("not_sent"):
    lines.append(f"  llm not sent {_counts(s['not_sent'])}")
  return "\n".join(lines)
