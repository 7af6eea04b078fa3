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
  )


def summary(info: dict[str, Any]) -> str:
  """Two lines for the CLI: what was asked and paid, what was refused."""
  s, c = info["stats"], info["config"]
  cost = "unknown (pass --llm-price-in/--llm-price-out)" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
  lines = [f"  llm {c['model']}{' (batch)' if c['batch'] else ''}: {s['requests']} requests, "
           f"{s['cache_hits']} cached, {s['http_calls']} HTTP calls, retries {s['retries'] or 0}, "
           f"tokens {s['prompt_tokens']}+{s['completion_tokens']}, cost {cost}"]
  lines.append(f"  llm accepted {s['accepted'] or 0}; rejected {s['rejected'] or 0}; failed {s['failed'] or 0}; "
               f"template fallback {s['fallback'] or 0}")
  return "\n".join(lines)
