"""Async chat-completions client for any OpenAI-compatible endpoint, built on the `openai` package.

What it adds to `openai.AsyncOpenAI` (whose own retries are switched off so the policy here is the only one and
every retry is counted):
  * bounded concurrency (asyncio.Semaphore) and one in-flight call per distinct request;
  * retries with exponential backoff + jitter on 408/409/429/5xx, timeouts and connection errors (Retry-After
    honoured up to backoff_max_s); 401/403/404 stop the run (wrong key / model / URL), other 4xx fail that
    one request;
  * a hard per-request deadline (asyncio.wait_for on top of the HTTP timeout, so a trickling server can't hang us);
  * an on-disk cache: one JSON file per request, `<cache>/<key[:2]>/<key>.json`, key = sha256 of the request
    body (model, messages, temperature, seed, max_tokens, response_format) -- written tmp + fsync + rename, so a
    killed run loses only calls still in flight and a rerun repeats no completed call;
  * token and cost accounting (`usage` of each fresh response x a price table, overridable);
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

  def __post_init__(self) -> None:
    if not self.base_url:
      raise ValueError("LLMConfig.base_url is empty; pass --llm-base-url (e.g. https://api.openai.com/v1)")
    if self.concurrency < 1:
      raise ValueError(f"--llm-concurrency must be >= 1, got {self.concurrency}")
    if self.max_retries < 0:
      raise ValueError(f"--llm-max-retries must be >= 0, got {self.max_retries}")
    if self.timeout_s <= 0:
      raise ValueError(f"--llm-timeout must be > 0, got {self.timeout_s}")

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
            "timeout_s": self.timeout_s, "price_per_mtok": list(price) if price else None}


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
  cost_usd: float | None = 0.0

  def add_usage(self, usage: dict[str, int], *, cached: bool, price: tuple[float, float] | None,
                batch: bool = False) -> None:
    pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    if cached:
      self.cached_prompt_tokens += pt
      self.cached_completion_tokens += ct
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
    if d["cost_usd"] is not None:
      d["cost_usd"] = round(d["cost_usd"], 6)
    return d


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


def _response_fields(d: dict[str, Any]) -> dict[str, Any]:
  """The part of a chat.completion body worth keeping (same for the direct and the Batch path)."""
  choices = d.get("choices") or [{}]
  msg = choices[0].get("message") or {}
  usage = d.get("usage") or {}
  return {"content": msg.get("content") or "", "finish_reason": choices[0].get("finish_reason"),
          "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                    "completion_tokens": int(usage.get("completion_tokens") or 0)},
          "model": d.get("model"), "id": d.get("id")}


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---- the client ----------------------------------------------------------------------------------------
class LLMClient:
  """`async with LLMClient(cfg) as c: results = await c.complete_many(bodies)`; stats accumulate in c.stats."""

  def __init__(self, config: LLMConfig, stats: LLMStats | None = None) -> None:
    self.config = config
    self.stats = stats if stats is not None else LLMStats()
    self.cache = DiskCache(config.cache_dir) if config.cache_dir else None
    self.price = price_for(config.model, config.price_in, config.price_out)
    self._mem: dict[str, dict[str, Any]] = {}
    self._inflight: dict[str, asyncio.Future] = {}
    self._fresh_batch: set[str] = set()
    self._openai: Any = None
    self._sem: asyncio.Semaphore | None = None
    self._secret = ""
    self._rng = random.Random()  # jitter only; nothing generated depends on it

  def __repr__(self) -> str:
    return f"LLMClient(model={self.config.model!r}, base_url={sanitize_url(self.config.base_url)!r})"

  async def __aenter__(self) -> LLMClient:
    import openai

    self.config.require_key()
    key = os.environ[self.config.api_key_env]
    self._secret = key
    _SECRETS.add(key)
    self._openai = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=key, max_retries=0,
                                      timeout=self.config.timeout_s)
    self._sem = asyncio.Semaphore(self.config.concurrency)
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
    entry = self._mem.get(key)
    if entry is None and self.cache is not None:
      entry = self.cache.get(key)
      if entry is not None:
        self._mem[key] = entry
    return entry

  def _store(self, key: str, body: dict[str, Any], response: dict[str, Any], via: str) -> dict[str, Any]:
    entry = {"v": CACHE_VERSION, "key": key, "via": via, "created": _now(), "request": body,
             "response": response}
    if self.cache is not None:
      self.cache.put(key, entry)
    self._mem[key] = entry
    return entry

  @staticmethod
  def _completion(key: str, entry: dict[str, Any], cached: bool) -> Completion:
    r = entry["response"]
    return Completion(key=key, content=r.get("content") or "", finish_reason=r.get("finish_reason"),
                      usage=dict(r.get("usage") or {}), cached=cached)

  async def complete(self, body: dict[str, Any]) -> Completion | None:
    """One chat completion (cache first). None: the request failed (counted in stats.failed)."""
    key = cache_key(body)
    self.stats.requests += 1
    entry = self._lookup(key)
    if entry is not None:
      self.stats.cache_hits += 1
      self.stats.add_usage(entry["response"].get("usage") or {}, cached=True, price=self.price)
      return self._completion(key, entry, cached=True)
    if key in self._inflight:  # the same request is already on the wire: share its answer, don't pay twice
      self.stats.cache_hits += 1
      entry = await asyncio.shield(self._inflight[key])
      return None if entry is None else self._completion(key, entry, cached=True)
    fut: asyncio.Future = asyncio.get_running_loop().create_future()
    self._inflight[key] = fut
    try:
      entry = await self._fetch(key, body)
      fut.set_result(entry)
    except BaseException:
      fut.set_result(None)
      raise
    finally:
      del self._inflight[key]
    return None if entry is None else self._completion(key, entry, cached=False)

  async def _fetch(self, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
    assert self._sem is not None and self._openai is not None, "use `async with LLMClient(...)`"
    async with self._sem:
      try:
        resp = await self._with_retries(
          "chat.completions", lambda: self._openai.chat.completions.create(**body), chat=True)
      except _RequestFailed as e:
        self.stats.failed[e.reason] += 1
        log.warning("LLM request %s… failed: %s", key[:12], e.reason)
        return None
      response = _response_fields(resp.model_dump())
      # Written inside the semaphore, before the slot frees: a kill after this line repeats nothing.
      entry = self._store(key, body, response, via="chat")
    self.stats.add_usage(response["usage"], cached=False, price=self.price)
    return entry

  async def complete_many(self, bodies: list[dict[str, Any]]) -> list[Completion | None]:
    """All bodies, in order; Batch API mode when config.batch. A fatal error cancels the rest and raises."""
    if self.config.batch:
      return await self._complete_batch(bodies)
    tasks = [asyncio.ensure_future(self.complete(b)) for b in bodies]
    try:
      return list(await asyncio.gather(*tasks))
    except BaseException:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      raise

  # -- retry policy --
  async def _with_retries(self, what: str, call: Callable[[], Awaitable[Any]], *, chat: bool = False,
                          timeout_s: float | None = None) -> Any:
    import openai

    cfg = self.config
    timeout_s = timeout_s or cfg.timeout_s
    for attempt in range(cfg.max_retries + 1):
      retry_after = None
      if chat:
        self.stats.http_calls += 1
      else:
        self.stats.batch_calls += 1
      try:
        return await asyncio.wait_for(call(), timeout=timeout_s)
      except (openai.APITimeoutError, TimeoutError):
        reason = "timeout"
      except openai.APIConnectionError:
        reason = "connection"
      except openai.APIStatusError as e:
        code = e.status_code
        msg = self.redact(f"{what}: HTTP {code} from {sanitize_url(cfg.base_url)}: {e.message}")
        if code in FATAL_STATUS:
          raise LLMError(msg + " (check the key variable, --llm-model and --llm-base-url)") from None
        if code not in RETRY_STATUS and code < 500:
          raise _RequestFailed(f"HTTP {code}") from None
        reason = "5xx" if code >= 500 else str(code)
        retry_after = _retry_after(e.response.headers.get("retry-after") if e.response is not None else None)
      except openai.APIError as e:  # e.g. a 200 whose body isn't a chat completion
        raise _RequestFailed(f"bad response ({type(e).__name__})") from None
      if attempt == cfg.max_retries:
        raise _RequestFailed(f"retries exhausted ({reason})")
      self.stats.retries[reason] += 1
      delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
      delay = self._rng.uniform(delay / 2, delay)  # jitter: clients that failed together don't retry together
      if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.backoff_max_s))
      log.info("LLM %s: %s, retry %d/%d in %.2fs", what, reason, attempt + 1, cfg.max_retries, delay)
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

  async def _complete_batch(self, bodies: list[dict[str, Any]]) -> list[Completion | None]:
    keys = [cache_key(b) for b in bodies]
    todo: dict[str, dict[str, Any]] = {}
    for k, b in zip(keys, bodies, strict=True):
      if self._lookup(k) is None:
        todo.setdefault(k, b)
    pending = list(todo)
    for i in range(0, len(pending), self.config.batch_max_requests):
      await self._one_batch({k: todo[k] for k in pending[i:i + self.config.batch_max_requests]})
    out: list[Completion | None] = []
    for k in keys:
      self.stats.requests += 1
      entry = self._lookup(k)
      if entry is None:
        out.append(None)
        continue
      fresh = k in self._fresh_batch  # paid in this run (counted when ingested); a repeat is a hit
      self._fresh_batch.discard(k)
      if not fresh:
        self.stats.cache_hits += 1
        self.stats.add_usage(entry["response"].get("usage") or {}, cached=True, price=self.price)
      out.append(self._completion(k, entry, cached=not fresh))
    return out

  async def _one_batch(self, items: dict[str, dict[str, Any]]) -> None:
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
    else:
      if "input_file_id" not in state:
        f = await self._control("files.create", lambda: self._openai.files.create(
          file=(f"{tag}.jsonl", data, "application/jsonl"), purpose="batch"), timeout_s=max(cfg.timeout_s, 600))
        state["input_file_id"] = f.id
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
    if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
      response = _response_fields(resp["body"])
      self._store(key, items[key], response, via="batch")
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
