"""Async chat-completions client for any OpenAI-compatible endpoint, built on the `openai` package.

What it adds to `openai.AsyncOpenAI` (whose own retries are switched off so the policy here is the only one and
every retry is counted):
  * bounded concurrency (asyncio.Semaphore) and one call per distinct request of a round;
  * retries with exponential backoff + jitter on 408/409/429/5xx, timeouts and connection errors (Retry-After,
    retry-after-ms or the exhausted x-ratelimit-reset-* honoured up to backoff_max_s); 401/403/404 and a 400
    about response_format stop the run (wrong key / model / URL / --llm-no-json-mode), other 4xx fail that one
    request; a 200 that is no chat completion (HTML, invalid JSON, no `choices`) is a failed attempt, retried;
  * a run-stopping error sends nothing more, lets the requests in flight finish (and be cached), then is raised;
    every message names the endpoint, the round and the request;
  * client-side pacing (--llm-rpm, --llm-tpm) and a budget (--llm-max-cost: each request reserves its worst
    case, prompt + max_tokens, before it is sent);
  * a hard per-request deadline (asyncio.wait_for on top of the HTTP timeout, so a trickling server can't hang us);
  * an on-disk cache: one JSON file per request, `<cache>/<key[:2]>/<key>.json`, key = sha256 of the request
    body (model, messages, temperature, seed, max_tokens, response_format) -- written tmp + fsync + rename, the
    body as it arrived before anything parses it (then replaced by its parsed form), so a killed run loses only
    calls still in flight and a rerun repeats no completed call;
  * token and cost accounting (`usage` of each fresh response x a price table, overridable; a server without
    `usage` is counted with tokens.TokenCounter);
  * OpenAI Batch API mode: the missing requests go into a JSONL file that is uploaded (files.create), run
    (batches.create), polled and downloaded; results land in the same cache. The batch id is kept under
    `<cache>/batches/` until its output is read, so a killed run resumes polling instead of paying again.

The API key is read from an environment variable and is never written to the cache, logs, manifests or error
messages: every message that could carry server text goes through `redact`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("data_gen.llm")

CACHE_VERSION = 1
# USD per 1M tokens (prompt, completion), standard tier, as listed by OpenAI when this was written. Prices
# change: pass --llm-price-in/--llm-price-out (LLMConfig.price_in/price_out) to be exact; for a model not in the
# table and without an override the cost is reported as null rather than guessed.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
  "gpt-4o-mini": (0.15, 0.60),
  "gpt-4o": (2.50, 10.00),
  "gpt-4.1-nano": (0.10, 0.40),
  "gpt-4.1-mini": (0.40, 1.60),
  "gpt-4.1": (2.00, 8.00),
  "gpt-3.5-turbo": (0.50, 1.50),
}
BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
FATAL_STATUS = frozenset({401, 403, 404})  # no point sending the other requests
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
REDACTED = "***"


class LLMError(RuntimeError):
  """A run-stopping LLM problem (bad key/model/URL, too many failures, batch timeout); message is redacted."""


class LLMBudgetError(LLMError):
  """--llm-max-cost reached: nothing more is sent; everything received is cached (rerun with a higher cap)."""


class LLMQualityError(LLMError):
  """Too few answers passed verification (--llm-min-accepted): the dataset is not written."""


class _RequestFailed(Exception):
  """One request gave up (non-retryable 4xx, retries exhausted); counted, the run goes on."""

  def __init__(self, reason: str) -> None:
    super().__init__(reason)
    self.reason = reason


# ---- redaction -----------------------------------------------------------------------------------------
_SECRETS: set[str] = set()  # keys of clients opened in this process; the log filter scrubs them
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


def redact(text: str, *secrets: str) -> str:
  """text with every known API key (and any `Bearer <token>`) replaced by ***."""
  for s in sorted({*secrets, *_SECRETS}, key=len, reverse=True):
    if s and len(s) >= 4:
      text = text.replace(s, REDACTED)
  return _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)


class _RedactFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    clean = redact(msg)
    if clean != msg:
      record.msg, record.args = clean, None
    return True


log.addFilter(_RedactFilter())


def sanitize_url(url: str) -> str:
  """A base URL fit for a manifest: no user:password@, query string or fragment (where keys sometimes hide)."""
  parts = urlsplit(url)
  host = parts.hostname or ""
  if parts.port:
    host = f"{host}:{parts.port}"
  return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ---- config, stats, cache ------------------------------------------------------------------------------
@dataclasses.dataclass
class LLMConfig:
  """Everything the LLM stage needs except the key itself (only the name of its environment variable)."""

  base_url: str
  model: str = "gpt-4o-mini"
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 8
  max_retries: int = 5
  timeout_s: float = 120.0
  cache_dir: str | Path | None = None  # None: in-memory only (a rerun pays again)
  temperature: float = 0.7
  max_tokens: int = 1024
  json_mode: bool = True  # response_format={"type": "json_object"} for the JSON stages
  batch: bool = False
  batch_poll_s: float = 30.0
  batch_timeout_s: float = 26 * 3600.0  # the Batch API promises 24 h
  batch_max_requests: int = 50_000  # the Batch API's per-file limit
  backoff_base_s: float = 1.0
  backoff_max_s: float = 60.0
  price_in: float | None = None  # USD per 1M prompt tokens; None: PRICES_PER_MTOK
  price_out: float | None = None
  max_failed_fraction: float = 0.1  # more failed requests than this stops the run (a dead endpoint, say)
  max_cost_usd: float | None = None  # stop before the dataset's answers would cost more (cached ones included)
  rpm: float | None = None  # client-side pacing: requests per minute
  tpm: float | None = None  # client-side pacing: tokens per minute (prompt + max_tokens, as OpenAI counts)
  min_accepted: float = 0.5  # quality gate: each stage's share of verified answers
  progress: bool = False  # a tqdm bar per round on stderr (requests, tokens, spend, ETA)

  def __post_init__(self) -> None:
    if not self.base_url:
      raise ValueError("LLMConfig.base_url is empty; pass --llm-base-url (e.g. https://api.openai.com/v1)")
    if self.concurrency < 1:
      raise ValueError(f"--llm-concurrency must be >= 1, got {self.concurrency}")
    if self.max_retries < 0:
      raise ValueError(f"--llm-max-retries must be >= 0, got {self.max_retries}")
    if self.timeout_s <= 0:
      raise ValueError(f"--llm-timeout must be > 0, got {self.timeout_s}")
    for name, v in (("--llm-rpm", self.rpm), ("--llm-tpm", self.tpm)):
      if v is not None and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if not 0.0 <= self.min_accepted <= 1.0:
      raise ValueError(f"--llm-min-accepted must be in [0, 1], got {self.min_accepted}")
    if self.max_cost_usd is not None:
      if self.max_cost_usd < 0:
        raise ValueError(f"--llm-max-cost must be >= 0, got {self.max_cost_usd}")
      if price_for(self.model, self.price_in, self.price_out) is None:
        raise ValueError(f"--llm-max-cost needs a price: {self.model!r} is not in the price table; pass "
                         "--llm-price-in and --llm-price-out (USD per 1M tokens; 0 for a local server)")

  def require_key(self) -> None:
    """Fail fast (before any image is processed) when the key's environment variable is unset or empty."""
    if not os.environ.get(self.api_key_env):
      raise LLMError(f"environment variable {self.api_key_env} is not set; export the API key there or name "
                     "another variable with --llm-api-key-env (the key is never written anywhere)")

  def params(self) -> dict[str, Any]:
    """What changes the generated text (goes into the dataset's params, so a different model is a new dataset)."""
    return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "json_mode": self.json_mode}

  def describe(self) -> dict[str, Any]:
    """For the manifest: params plus how it was run. Never the key (only the variable's name)."""
    price = price_for(self.model, self.price_in, self.price_out)
    return {**self.params(), "base_url": sanitize_url(self.base_url), "api_key_env": self.api_key_env,
            "batch": self.batch, "concurrency": self.concurrency, "max_retries": self.max_retries,
            "timeout_s": self.timeout_s, "price_per_mtok": list(price) if price else None,
            "max_cost_usd": self.max_cost_usd, "rpm": self.rpm, "tpm": self.tpm, "min_accepted": self.min_accepted}


def price_for(model: str, price_in: float | None, price_out: float | None) -> tuple[float, float] | None:
  """(USD/1M prompt, USD/1M completion): overrides, else the longest table prefix of the model name."""
  base = None
  for name in sorted(PRICES_PER_MTOK, key=len, reverse=True):
    if model == name or model.startswith(name + "-"):
      base = PRICES_PER_MTOK[name]
      break
  pin = price_in if price_in is not None else (base[0] if base else None)
  pout = price_out if price_out is not None else (base[1] if base else None)
  return None if pin is None or pout is None else (float(pin), float(pout))


@dataclasses.dataclass
class LLMStats:
  requests: int = 0  # completions asked for, cache hits included
  cache_hits: int = 0
  http_calls: int = 0  # chat-completion HTTP attempts actually sent (retries included)
  batch_calls: int = 0  # files/batches control calls (uploads, creates, polls, downloads)
  batches: int = 0
  batch_requests: int = 0
  retries: Counter = dataclasses.field(default_factory=Counter)  # reason -> n
  failed: Counter = dataclasses.field(default_factory=Counter)  # requests that gave up, by reason
  rejected: Counter = dataclasses.field(default_factory=Counter)  # answers the verifier refused, by reason
  accepted: Counter = dataclasses.field(default_factory=Counter)  # verified answers, by stage
  fallback: Counter = dataclasses.field(default_factory=Counter)  # template answers used instead, by where
  prompt_tokens: int = 0  # fresh responses of this run (what was paid now)
  completion_tokens: int = 0
  cached_prompt_tokens: int = 0  # responses served from the cache (paid by an earlier run)
  cached_completion_tokens: int = 0
  cost_usd: float | None = 0.0  # what this run paid
  cached_cost_usd: float | None = 0.0  # what the cached answers it used cost when an earlier run paid them
  not_sent: Counter = dataclasses.field(default_factory=Counter)  # requests never sent, by why (budget, stop)
  usage_estimated: int = 0  # fresh answers without `usage` (local servers): tokens counted here instead
  models: Counter = dataclasses.field(default_factory=Counter)  # `model` of fresh answers, as the server named it
  seconds: float = 0.0  # wall time spent in complete_many (cache lookups, requests, retries, pacing)
  resumed_batches: int = 0  # batches of an earlier (killed) run polled to the end by this one
  rate_limit: dict = dataclasses.field(default_factory=dict)  # last x-ratelimit-* headers seen
  quality: dict = dataclasses.field(default_factory=dict)  # stage.py: per stage accepted / rejected / examples
  records: dict = dataclasses.field(default_factory=dict)  # stage.py: per output file, records by LLM / template

  def add_usage(self, usage: dict[str, int], *, cached: bool, price: tuple[float, float] | None,
                batch: bool = False) -> None:
    pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cost = None if price is None else (pt * price[0] + ct * price[1]) / 1e6 * (BATCH_DISCOUNT if batch else 1.0)
    if cached:
      self.cached_prompt_tokens += pt
      self.cached_completion_tokens += ct
      if cost is None:
        self.cached_cost_usd = None
      elif self.cached_cost_usd is not None:
        self.cached_cost_usd += cost
      return
    self.prompt_tokens += pt
    self.completion_tokens += ct
    if price is None:
      self.cost_usd = None
    elif self.cost_usd is not None:
      self.cost_usd += (pt * price[0] + ct * price[1]) / 1e6 * (BATCH_DISCOUNT if batch else 1.0)

  def to_dict(self) -> dict[str, Any]:
    # not dataclasses.asdict: it rebuilds a Counter from its (key, n) pairs, counting the pairs
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for k, v in d.items():
      if isinstance(v, Counter):
        d[k] = dict(sorted(v.items()))
    for k in ("cost_usd", "cached_cost_usd"):
      if d[k] is not None:
        d[k] = round(d[k], 6)
    d["seconds"] = round(d["seconds"], 3)
    return d

  def spent(self) -> float:
    """Cost of the answers used so far: paid now plus paid by earlier runs (what --llm-max-cost caps)."""
    return (self.cost_usd or 0.0) + (self.cached_cost_usd or 0.0)


def cache_key(body: dict[str, Any]) -> str:
  canon = json.dumps({"v": CACHE_VERSION, **body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _atomic_write_json(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


class DiskCache:
  """One JSON file per request; a missing or unreadable file is a miss (a torn write can't exist: tmp+rename)."""

  def __init__(self, root: str | Path) -> None:
    self.root = Path(root)  # created by the first write

  def path(self, key: str) -> Path:
    return self.root / key[:2] / f"{key}.json"

  def get(self, key: str) -> dict[str, Any] | None:
    try:
      with open(self.path(key), encoding="utf-8") as f:
        entry = json.load(f)
    except (OSError, json.JSONDecodeError):
      return None
    return entry if isinstance(entry, dict) and entry.get("key") == key else None

  def put(self, key: str, entry: dict[str, Any]) -> None:
    _atomic_write_json(self.path(key), entry)


@dataclasses.dataclass
class Completion:
  key: str
  content: str
  finish_reason: str | None
  usage: dict[str, int]
  cached: bool


class BadResponse(ValueError):
  """A 200 whose body is not a chat completion (HTML from a proxy, invalid JSON, no `choices`)."""


def _response_fields(d: Any) -> dict[str, Any]:
  """The part of a chat.completion body worth keeping (same for the direct and the Batch path).

  Raises BadResponse when `d` is not a chat completion. `usage` is None when the server sent none."""
  if not isinstance(d, dict):
    raise BadResponse(f"body is a JSON {type(d).__name__}, not an object")
  choices = d.get("choices")
  if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
    raise BadResponse("no `choices` in the body" + (f" (error: {d['error']})" if d.get("error") else ""))
  msg = choices[0].get("message")
  if not isinstance(msg, dict):
    raise BadResponse("no `choices[0].message` in the body")
  content = msg.get("content")
  if content is not None and not isinstance(content, str):
    raise BadResponse(f"`content` is a {type(content).__name__}, not a string")
  usage = d.get("usage")
  if isinstance(usage, dict) and (usage.get("prompt_tokens") is not None
                                  or usage.get("completion_tokens") is not None):
    usage = {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
             "completion_tokens": int(usage.get("completion_tokens") or 0)}
  else:
    usage = None
  return {"content": content or "", "finish_reason": choices[0].get("finish_reason"), "usage": usage,
          "model": d.get("model"), "id": d.get("id")}


def parse_body(text: str, content_type: str | None = None) -> dict[str, Any]:
  """Raw HTTP body of a 200 -> _response_fields; BadResponse (one line) when it is not a chat completion."""
  try:
    d = json.loads(text)
  except (json.JSONDecodeError, ValueError) as e:
    head = " ".join(text[:60].split())
    raise BadResponse(f"body is not JSON ({content_type or 'no content type'}; {e.msg} at char {e.pos}; "
                      f"starts {head!r})" if isinstance(e, json.JSONDecodeError)
                      else f"body is not JSON ({content_type or 'no content type'})") from None
  return _response_fields(d)


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
  """OpenAI's x-ratelimit-reset-* values ("1s", "6m0s", "20ms", "1h2m3.5s", or plain seconds) -> seconds."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  parts = _DURATION_RE.findall(value)
  if not parts or "".join(n + u for n, u in parts) != value:
    return None
  scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
  return sum(float(n) * scale[u] for n, u in parts)


def rate_limit_wait(headers: Any) -> float | None:
  """How long a 429's headers say to wait: Retry-After, retry-after-ms, else the x-ratelimit-reset-* of the
  exhausted limit (both when neither says it is exhausted). None: the headers say nothing."""
  if headers is None:
    return None
  ra = _retry_after(headers.get("retry-after"))
  if ra is not None:
    return ra
  ms = _retry_after(headers.get("retry-after-ms"))
  if ms is not None:
    return ms / 1000.0
  waits = []
  for kind in ("requests", "tokens"):
    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
    if reset is not None:
      waits.append((headers.get(f"x-ratelimit-remaining-{kind}") == "0", reset))
  exhausted = [w for ex, w in waits if ex]
  return max(exhausted or [w for _, w in waits], default=None)


class _Pacer:
  """At most `per_minute` units a minute, spaced evenly (a leaky bucket without burst: the first request goes at
  once, each next one `units * 60 / per_minute` s after the previous). hold(s) pushes every later start back (a
  429 that says the account's window is spent)."""

  def __init__(self, per_minute: float) -> None:
    self.interval = 60.0 / per_minute
    self.next = 0.0

  def reserve(self, units: float) -> float:
    now = time.monotonic()
    start = max(now, self.next)
    self.next = start + units * self.interval
    return start - now

  def hold(self, seconds: float) -> None:
    self.next = max(self.next, time.monotonic() + seconds)


@dataclasses.dataclass
class _Ctx:
  """Where a request belongs, for one-line messages: round name, its index in the round, the round's size."""

  round: str
  index: int
  total: int
  label: str | None = None

  def __str__(self) -> str:
    lab = f" ({self.label})" if self.label else ""
    return f"round {self.round!r}, request {self.index + 1}/{self.total}{lab}"


# ---- the client ----------------------------------------------------------------------------------------
class LLMClient:
  """`async with LLMClient(cfg) as c: results = await c.complete_many(bodies)`; stats accumulate in c.stats."""

  def __init__(self, config: LLMConfig, stats: LLMStats | None = None) -> None:
    from data_gen.llm.tokens import TokenCounter

    self.config = config
    self.stats = stats if stats is not None else LLMStats()
    self.cache = DiskCache(config.cache_dir) if config.cache_dir else None
    self.price = price_for(config.model, config.price_in, config.price_out)
    self.tokens = TokenCounter(config.model)
    self._mem: dict[str, dict[str, Any]] = {}
    self._fresh_batch: set[str] = set()
    self._openai: Any = None
    self._sem: asyncio.Semaphore | None = None
    self._secret = ""
    self._rng = random.Random()  # jitter only; nothing generated depends on it
    self._stop: LLMError | None = None  # set by the first run-stopping error: nothing more is sent
    self._reserved = 0.0  # worst-case cost of the requests in flight (budget)
    self._rpm = _Pacer(config.rpm) if config.rpm else None
    self._tpm = _Pacer(config.tpm) if config.tpm else None
    self._warned_model = False
    self._bar: Any = None

  def __repr__(self) -> str:
    return f"LLMClient(model={self.config.model!r}, base_url={sanitize_url(self.config.base_url)!r})"

  @property
  def endpoint(self) -> str:
    return sanitize_url(self.config.base_url).rstrip("/") + "/chat/completions"

  async def __aenter__(self) -> LLMClient:
    import openai

    self.config.require_key()
    key = os.environ[self.config.api_key_env]
    self._secret = key
    _SECRETS.add(key)
    self._openai = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=key, max_retries=0,
                                      timeout=self.config.timeout_s)
    self._sem = asyncio.Semaphore(self.config.concurrency)
    self._stop = None
    return self

  async def __aexit__(self, *exc: object) -> None:
    if self._openai is not None:
      await self._openai.close()
    self._openai = None

  def redact(self, text: str) -> str:
    return redact(text, self._secret)

  # -- requests --
  def build_request(self, messages: list[dict[str, str]], *, seed: int | None = None,
                    json_mode: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": self.config.model, "messages": messages,
                            "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
    if seed is not None:
      body["seed"] = int(seed)
    if json_mode and self.config.json_mode:
      body["response_format"] = {"type": "json_object"}
    return body

  def _lookup(self, key: str) -> dict[str, Any] | None:
    """A usable cache entry (its `response` parsed), or None. An entry holding a malformed answer is a miss."""
    entry = self._mem.get(key)
    if entry is None and self.cache is not None:
      entry = self.cache.get(key)
      if entry is not None:
        if "response" not in entry:
          try:
            entry["response"] = self._parsed(entry)
          except BadResponse:
            return None
        self._mem[key] = entry
    return entry

  def _parsed(self, entry: dict[str, Any]) -> dict[str, Any]:
    raw = entry.get("raw")
    if entry.get("status") != 200 or not isinstance(raw, str):
      raise BadResponse("not a 200 answer")
    response = parse_body(raw, entry.get("content_type"))
    if response["usage"] is None:  # a server without `usage`: count here (same numbers on every read)
      response["usage"] = {"prompt_tokens": self.tokens.count_messages(entry["request"]["messages"]),
                           "completion_tokens": self.tokens.count(response["content"])}
      response["usage_estimated"] = True
    return response

  def _store(self, key: str, body: dict[str, Any], response: dict[str, Any], via: str) -> dict[str, Any]:
    if response.get("usage") is None:
      response["usage"] = {"prompt_tokens": self.tokens.count_messages(body["messages"]),
                           "completion_tokens": self.tokens.count(response["content"])}
      response["usage_estimated"] = True
    entry = {"v": CACHE_VERSION, "key": key, "via": via, "created": _now(), "request": body,
             "response": response}
    if self.cache is not None:
      self.cache.put(key, entry)
    self._mem[key] = entry
    return entry

  def _store_raw(self, key: str, body: dict[str, Any], status: int, content_type: str | None,
                 raw: str) -> dict[str, Any]:
    """The answer exactly as it arrived, on disk before anything reads it: nothing paid is lost to a parse."""
    entry = {"v": CACHE_VERSION, "key": key, "via": "chat", "created": _now(), "request": body,
             "status": status, "content_type": content_type, "raw": raw}
    if self.cache is not None:
      self.cache.put(key, entry)
    return entry

  @staticmethod
  def _completion(key: str, entry: dict[str, Any], cached: bool) -> Completion:
    r = entry["response"]
    return Completion(key=key, content=r.get("content") or "", finish_reason=r.get("finish_reason"),
                      usage=dict(r.get("usage") or {}), cached=cached)

  def _hit(self, key: str, entry: dict[str, Any]) -> Completion:
    self.stats.cache_hits += 1
    self.stats.add_usage(entry["response"].get("usage") or {}, cached=True, price=self.price,
                         batch=entry.get("via") == "batch")
    return self._completion(key, entry, cached=True)

  def worst_cost(self, body: dict[str, Any], *, batch: bool = False) -> float:
    """Upper bound of one request's price: its prompt tokens and max_tokens of completion."""
    if self.price is None:
      return 0.0
    pt = self.tokens.count_messages(body["messages"])
    return (pt * self.price[0] + int(body.get("max_tokens") or 0) * self.price[1]) / 1e6 * (
      BATCH_DISCOUNT if batch else 1.0)

  def _budget_left(self) -> float | None:
    cap = self.config.max_cost_usd
    return None if cap is None else cap - self.stats.spent() - self._reserved

  def _budget_error(self, not_sent: int) -> LLMBudgetError:
    where = self.cache.root if self.cache is not None else "memory (no --llm-cache: a rerun pays again)"
    return LLMBudgetError(
      f"LLM budget reached: the answers so far cost ${self.stats.spent():.4f} (this run ${self.stats.cost_usd or 0:.4f}"
      f"), the next request could exceed --llm-max-cost ${self.config.max_cost_usd:.4f}; {not_sent} request(s) "
      f"not sent, everything received is cached in {where}; rerun with a higher --llm-max-cost to continue")

  async def complete(self, body: dict[str, Any]) -> Completion | None:
    """One chat completion (cache first). None: the request failed (counted in stats.failed)."""
    return (await self.complete_many([body]))[0]

  async def complete_many(self, bodies: list[dict[str, Any]], *, round_name: str = "",
                          labels: list[str] | None = None) -> list[Completion | None]:
    """All bodies, in order (None: that request failed, counted); Batch API mode when config.batch.

    A run-stopping error (bad key/model/URL, budget reached) sends nothing more: the requests in flight finish and
    are cached, then it is raised. round_name/labels only name the requests in messages."""
    t0 = time.monotonic()
    try:
      return await self._complete_many(bodies, round_name, labels)
    finally:
      self.stats.seconds += time.monotonic() - t0

  async def _complete_many(self, bodies: list[dict[str, Any]], round_name: str,
                           labels: list[str] | None) -> list[Completion | None]:
    labels = list(labels) if labels is not None else [None] * len(bodies)
    if self.config.batch:
      return await self._complete_batch(bodies, round_name)
    keys = [cache_key(b) for b in bodies]
    out: list[Completion | None] = [None] * len(bodies)
    todo: dict[str, int] = {}  # key -> first index; cache lookups all happen before anything is sent
    dupes: list[int] = []
    for i, k in enumerate(keys):
      self.stats.requests += 1
      entry = self._lookup(k)
      if entry is not None:
        out[i] = self._hit(k, entry)
      elif k in todo:
        dupes.append(i)  # the same request twice in a round: sent once, the second is a hit
      else:
        todo[k] = i
    bar = self._open_bar(round_name, len(todo))
    tasks = [asyncio.ensure_future(self._fetch(k, bodies[i], _Ctx(round_name, i, len(bodies), labels[i])))
             for k, i in todo.items()]
    try:
      got = await asyncio.gather(*tasks)
    except BaseException:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      raise
    finally:
      if bar is not None:
        bar.close()
      self._bar = None
    for (k, i), entry in zip(todo.items(), got, strict=True):
      out[i] = None if entry is None else self._completion(k, entry, cached=False)
    for i in dupes:
      first = out[todo[keys[i]]]
      if first is not None:
        self.stats.cache_hits += 1
        out[i] = dataclasses.replace(first, cached=True)
    if isinstance(self._stop, LLMBudgetError):
      raise self._budget_error(self.stats.not_sent["budget"] + self.stats.not_sent["run stopped"])
    if self._stop is not None:
      raise self._stop
    return out

  def _open_bar(self, round_name: str, n: int) -> Any:
    if not self.config.progress or n == 0:
      return None
    from tqdm import tqdm

    self._bar = tqdm(total=n, desc=f"llm {round_name}".strip(), unit="req", file=sys.stderr, dynamic_ncols=True)
    return self._bar

  def _tick(self) -> None:
    if self._bar is not None:
      s = self.stats
      cost = "?" if s.cost_usd is None else f"${s.cost_usd:.4f}"
      self._bar.set_postfix_str(f"tok {s.prompt_tokens}+{s.completion_tokens} {cost}", refresh=False)
      self._bar.update(1)

  async def _pace(self, body: dict[str, Any]) -> None:
    wait = 0.0
    if self._rpm is not None:
      wait = max(wait, self._rpm.reserve(1))
    if self._tpm is not None:
      wait = max(wait, self._tpm.reserve(self.tokens.count_messages(body["messages"])
                                         + int(body.get("max_tokens") or 0)))
    if wait > 0:
      await asyncio.sleep(wait)

  async def _fetch(self, key: str, body: dict[str, Any], ctx: _Ctx) -> dict[str, Any] | None:
    assert self._sem is not None and self._openai is not None, "use `async with LLMClient(...)`"
    async with self._sem:
      if self._stop is not None:
        self.stats.not_sent["run stopped" if not isinstance(self._stop, LLMBudgetError) else "budget"] += 1
        return None
      worst = self.worst_cost(body)
      left = self._budget_left()
      if left is not None and worst > left + 1e-12:
        self.stats.not_sent["budget"] += 1
        self._stop = self._budget_error(0)
        return None
      self._reserved += worst
      try:
        entry = await self._with_retries(ctx, lambda: self._send(key, body), chat=True,
                                         before=lambda: self._pace(body))
      except _RequestFailed as e:
        self.stats.failed[e.reason] += 1
        log.warning("LLM %s %s failed: %s", self.endpoint, ctx, e.reason)
        self._tick()
        return None
      except LLMError as e:
        if self._stop is None:
          self._stop = e
        return None
      finally:
        self._reserved -= worst
    self._tick()
    return entry

  async def _send(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """One HTTP attempt. The body is cached as it arrived before it is parsed; BadResponse if it is no completion."""
    raw = await self._openai.chat.completions.with_raw_response.create(**body)
    text = raw.http_response.content.decode("utf-8", errors="replace")
    ctype = raw.headers.get("content-type")
    self._note_rate_limit(raw.headers)
    self._store_raw(key, body, raw.status_code, ctype, text)
    response = parse_body(text, ctype)
    entry = self._store(key, body, response, via="chat")  # the parsed form replaces the raw one (same key)
    usage = response["usage"]
    if response.get("usage_estimated"):
      self.stats.usage_estimated += 1
    self.stats.add_usage(usage, cached=False, price=self.price)
    model = response.get("model")
    if model:
      self.stats.models[str(model)] += 1
      if not self._warned_model and model != body["model"] and not str(model).startswith(body["model"] + "-"):
        self._warned_model = True
        log.warning("LLM %s answers as model %r, asked for %r (a local server's name for it?); the dataset "
                    "params keep %r", self.endpoint, model, body["model"], body["model"])
    return entry

  def _note_rate_limit(self, headers: Any) -> None:
    try:
      got = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
    except Exception:
      return
    if got:
      self.stats.rate_limit = dict(sorted(got.items()))

  # -- retry policy --
  async def _with_retries(self, ctx: _Ctx | str, call: Callable[[], Awaitable[Any]], *, chat: bool = False,
                          timeout_s: float | None = None,
                          before: Callable[[], Awaitable[None]] | None = None) -> Any:
    import openai

    cfg = self.config
    timeout_s = timeout_s or cfg.timeout_s
    where = f"{self.endpoint} {ctx}" if chat else f"{sanitize_url(cfg.base_url)} {ctx}"
    for attempt in range(cfg.max_retries + 1):
      retry_after = None
      if chat:
        self.stats.http_calls += 1
      else:
        self.stats.batch_calls += 1
      try:
        if before is not None:
          await before()  # pacing (--llm-rpm/--llm-tpm) is waiting, not the server's time: outside the timeout
        return await asyncio.wait_for(call(), timeout=timeout_s)
      except (openai.APITimeoutError, TimeoutError):
        reason = "timeout"
      except openai.APIConnectionError:
        reason = "connection"
      except BadResponse as e:
        reason = "bad response"
        log.warning("LLM %s: malformed 200 (attempt %d/%d): %s", where, attempt + 1, cfg.max_retries + 1,
                    self.redact(str(e)))
        if attempt == cfg.max_retries:
          raise _RequestFailed(f"bad response: {self.redact(str(e))[:160]}") from None
      except openai.APIStatusError as e:
        code = e.status_code
        msg = self.redact(f"LLM {where}: HTTP {code}: {e.message}")
        if code in FATAL_STATUS:
          raise LLMError(msg + " (check the key variable, --llm-model and --llm-base-url)") from None
        if code == 400 and "response_format" in str(e.message).lower():
          raise LLMError(msg + " (this server does not take response_format: rerun with --llm-no-json-mode)") \
            from None
        if code not in RETRY_STATUS and code < 500:
          raise _RequestFailed(f"HTTP {code}") from None
        reason = "5xx" if code >= 500 else str(code)
        headers = e.response.headers if e.response is not None else None
        if headers is not None:
          self._note_rate_limit(headers)
        retry_after = rate_limit_wait(headers) if code == 429 else _retry_after(
          headers.get("retry-after") if headers is not None else None)
        if code == 429 and retry_after is not None:  # the account's window: every request waits, not just this
          for pacer in (self._rpm, self._tpm):
            if pacer is not None:
              pacer.hold(min(retry_after, cfg.backoff_max_s))
      except openai.APIError as e:  # anything else the client refuses to read
        reason = "bad response"
        if attempt == cfg.max_retries:
          raise _RequestFailed(f"bad response ({type(e).__name__})") from None
      if attempt == cfg.max_retries:
        raise _RequestFailed(f"retries exhausted ({reason})")
      if self._stop is not None:
        raise _RequestFailed(f"{reason}; not retried: the run is stopping")
      self.stats.retries[reason] += 1
      delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
      delay = self._rng.uniform(delay / 2, delay)  # jitter: clients that failed together don't retry together
      if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.backoff_max_s))
      log.info("LLM %s: %s, retry %d/%d in %.2fs", where, reason, attempt + 1, cfg.max_retries, delay)
      await asyncio.sleep(delay)
    raise AssertionError("unreachable")

  async def _control(self, what: str, call: Callable[[], Awaitable[Any]], timeout_s: float | None = None) -> Any:
    """A files/batches call: a request that gives up here stops the run (it carries every batched request)."""
    try:
      return await self._with_retries(what, call, timeout_s=timeout_s)
    except _RequestFailed as e:
      raise LLMError(f"Batch API {what} failed: {e.reason}; rerun to resume (state under "
                     f"{self._batch_dir() or 'memory'})") from None

  # -- Batch API --
  def _batch_dir(self) -> Path | None:
    return None if self.cache is None else self.cache.root / "batches"

  async def _complete_batch(self, bodies: list[dict[str, Any]], round_name: str = "") -> list[Completion | None]:
    keys = [cache_key(b) for b in bodies]
    todo: dict[str, dict[str, Any]] = {}
    hits: set[str] = set()
    for k, b in zip(keys, bodies, strict=True):
      entry = self._lookup(k)
      if entry is None:
        todo.setdefault(k, b)
      elif k not in hits:  # what earlier runs paid counts against --llm-max-cost before anything is submitted
        hits.add(k)
        self.stats.add_usage(entry["response"].get("usage") or {}, cached=True, price=self.price,
                             batch=entry.get("via") == "batch")
    pending = list(todo)
    resumable = self._resumable(todo)
    if self.config.max_cost_usd is not None:  # a batch is paid whole: submit only the prefix that fits
      left, fit = self._budget_left() or 0.0, 0
      resumed_keys = {k for ks in resumable for k in ks}
      pending = [k for k in pending if k in resumed_keys] + [k for k in pending if k not in resumed_keys]
      for k in pending:
        if k not in resumed_keys:
          c = self.worst_cost(todo[k], batch=True)
          if c > left + 1e-12:
            break
          left -= c
        fit += 1
      if fit < len(pending):
        self.stats.not_sent["budget"] += len(pending) - fit
        self._stop = self._budget_error(len(pending) - fit)
        pending = pending[:fit]
    for ks in resumable:  # an earlier run's batch, whatever its size: poll it to the end, don't pay again
      if any(k in pending for k in ks):
        await self._one_batch({k: todo[k] for k in ks}, round_name)
    done_keys = {k for ks in resumable for k in ks}
    rest = [k for k in pending if k not in done_keys]
    for i in range(0, len(rest), self.config.batch_max_requests):
      await self._one_batch({k: todo[k] for k in rest[i:i + self.config.batch_max_requests]}, round_name)
    out: list[Completion | None] = []
    for k in keys:
      self.stats.requests += 1
      entry = self._lookup(k)
      if entry is None:
        out.append(None)
        continue
      fresh = k in self._fresh_batch  # paid in this run (counted when ingested); a repeat is a hit
      self._fresh_batch.discard(k)
      if not fresh:  # its usage was counted above (a cache hit) or when it was ingested (a repeat in the round)
        self.stats.cache_hits += 1
      out.append(self._completion(k, entry, cached=not fresh))
    if self._stop is not None:
      raise self._stop
    return out

  def _resumable(self, todo: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Keys of earlier runs' batches still on disk (submitted, output not yet read) among `todo`."""
    bdir = self._batch_dir()
    if bdir is None or not bdir.is_dir():
      return []
    out = []
    for state_path in sorted(bdir.glob("*.state.json")):
      try:
        state = json.loads(state_path.read_text())
      except (OSError, json.JSONDecodeError):
        continue
      keys = state.get("keys")
      if "batch_id" in state and isinstance(keys, list) and keys and all(k in todo for k in keys):
        out.append(keys)
    return out

  async def _one_batch(self, items: dict[str, dict[str, Any]], round_name: str = "") -> None:
    assert self._openai is not None, "use `async with LLMClient(...)`"
    cfg = self.config
    lines = [json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": b},
                        ensure_ascii=False, sort_keys=True) for k, b in items.items()]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tag = hashlib.sha256(data).hexdigest()[:20]
    bdir = self._batch_dir()
    state_path = None if bdir is None else bdir / f"{tag}.state.json"
    state: dict[str, Any] = {}
    if state_path is not None:
      bdir.mkdir(parents=True, exist_ok=True)
      (bdir / f"{tag}.jsonl").write_bytes(data)  # what was sent, for audit (prompts only, no key)
      try:
        state = json.loads(state_path.read_text())
      except (OSError, json.JSONDecodeError):
        state = {}

    def save() -> None:
      if state_path is not None:
        _atomic_write_json(state_path, state)

    if "batch_id" in state:
      log.info("LLM batch %s: resuming %s (%d requests)", tag, state["batch_id"], len(items))
      self.stats.batches += 1
      self.stats.resumed_batches += 1
      self.stats.batch_requests += len(items)
    else:
      if "input_file_id" not in state:
        f = await self._control("files.create", lambda: self._openai.files.create(
          file=(f"{tag}.jsonl", data, "application/jsonl"), purpose="batch"), timeout_s=max(cfg.timeout_s, 600))
        state["input_file_id"] = f.id
        state["keys"] = list(items)
        state["round"] = round_name
        save()
      b = await self._control("batches.create", lambda: self._openai.batches.create(
        input_file_id=state["input_file_id"], endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"source": "bird-jax data_gen", "tag": tag}))
      state["batch_id"] = b.id
      save()
      self.stats.batches += 1
      self.stats.batch_requests += len(items)
      log.info("LLM batch %s: submitted %s with %d requests", tag, b.id, len(items))

    deadline = time.monotonic() + cfg.batch_timeout_s
    while True:
      b = await self._control("batches.retrieve", lambda: self._openai.batches.retrieve(state["batch_id"]))
      if b.status in BATCH_TERMINAL:
        break
      if time.monotonic() > deadline:
        raise LLMError(f"batch {b.id} still {b.status} after {cfg.batch_timeout_s:.0f}s; rerun to resume "
                       f"polling it (state {state_path})")
      await asyncio.sleep(cfg.batch_poll_s)

    done: set[str] = set()
    for file_id in (b.output_file_id, b.error_file_id):
      if not file_id:
        continue
      content = await self._control("files.content", lambda fid=file_id: self._openai.files.content(fid),
                                    timeout_s=max(cfg.timeout_s, 600))
      for line in content.text.splitlines():
        if line.strip():
          self._ingest_batch_line(line, items, done)
    missing = [k for k in items if k not in done]
    if missing:
      why = f"batch {b.status}"
      if b.status == "failed" and b.errors is not None and b.errors.data:
        why += f" ({b.errors.data[0].code or b.errors.data[0].message})"
      self.stats.failed[self.redact(why)[:120]] += len(missing)
      log.warning("LLM batch %s: %d of %d requests have no result (%s)", tag, len(missing), len(items), why)
    if state_path is not None:  # read: a rerun must resubmit what is still missing, not re-poll this batch
      state_path.unlink(missing_ok=True)

  def _ingest_batch_line(self, line: str, items: dict[str, dict[str, Any]], done: set[str]) -> None:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError:
      return
    key = obj.get("custom_id")
    if key not in items or key in done:
      return
    done.add(key)
    resp = obj.get("response") or {}
    if resp.get("status_code") == 200:
      try:
        response = _response_fields(resp.get("body"))
      except BadResponse as e:
        self.stats.failed[f"batch: bad response ({str(e)[:80]})"] += 1
        return
      self._store(key, items[key], response, via="batch")
      if response.get("usage_estimated"):
        self.stats.usage_estimated += 1
      self.stats.add_usage(response["usage"], cached=False, price=self.price, batch=True)
      self._fresh_batch.add(key)
      return
    err = obj.get("error") or (resp.get("body") or {}).get("error") or {}
    code = err.get("code") if isinstance(err, dict) else None
    self.stats.failed[f"batch: {code or 'HTTP ' + str(resp.get('status_code'))}"] += 1


def _retry_after(value: str | None) -> float | None:
  try:
    return max(0.0, float(value)) if value is not None else None
  except ValueError:
    return None  # an HTTP date: rare for these APIs; plain backoff is fine
