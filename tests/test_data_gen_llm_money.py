"""data_gen's LLM stage with money at stake, over real HTTP to the loopback server of tests/test_data_gen_llm.py.

A 200 that is no chat completion (an HTML page, invalid JSON, no `choices`) is one failed attempt, never a
run-stopper, and no answer that arrived is lost; a server whose answers are all refused stops the run (quality
gate); a rerun of a finished folder says it sent nothing; the estimate, the budget, client-side rate limits and
the 429 headers; local-server differences (no `usage`, no `response_format`, another `model` name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_gen_llm import (
  KEY,
  KEY_ENV,
  REPO,
  FakeOpenAI,
  _all_bytes,
  _cfg,
  _gen,
  _records,
  _source,
)

from data_gen.llm import stage
from data_gen.llm.client import (
  LLMBudgetError,
  LLMClient,
  LLMError,
  LLMQualityError,
  parse_duration,
  rate_limit_wait,
)
from data_gen.llm.estimate import format_estimate
from data_gen.llm.tokens import TokenCounter
from data_gen.pipeline import generate_dataset

# 6 images: 6 descriptions in round one; 2 test images x regions + 4 train images x 2 conversations in round two.
ROUND1, ROUND2 = 6, 10


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
  monkeypatch.setenv(KEY_ENV, KEY)
  return KEY


def _cached_keys(cache: Path) -> set[str]:
  return {p.stem for p in cache.rglob("*.json") if len(p.stem) == 64}


# ---- 1, 2: a malformed 200 is one failed attempt; nothing that arrived is lost ---------------------------------
def test_html_and_invalid_json_200_are_retried_not_run_stoppers(tmp_path, key_env, caplog):
  caplog.set_level(logging.WARNING, logger="data_gen.llm")
  cache = tmp_path / "cache"
  faults = {"description": ["html", "ok", "no_choices"], "conversation": ["bad_json"], "regions": ["html"]}
  with FakeOpenAI(faults=faults, gate_inflight=2) as srv:
    m = _gen(tmp_path / "a", _cfg(srv, cache))
    s = m["llm"]["stats"]
    assert srv.calls["200 html"] == 2 and srv.calls["200 bad_json"] == 1 and srv.calls["200 no_choices"] == 1
    assert s["retries"] == {"bad response": 4} and s["failed"] == {}
    assert s["requests"] == ROUND1 + ROUND2 and s["http_calls"] == ROUND1 + ROUND2 + 4
    assert s["accepted"]["description"] == ROUND1 and s["accepted"]["conversation"] == 8
    # One line per malformed answer, naming the endpoint, the round and the request.
    bad = [r.getMessage() for r in caplog.records if "malformed 200" in r.getMessage()]
    assert len(bad) == 4
    assert any(re.search(r"127\.0\.0\.1:\d+/v1/chat/completions round '1 description', request \d/6 "
                         r"\(\S+\): malformed 200 .*not JSON \(text/html", b) for b in bad), bad
    assert any("round '2 regions + conversation'" in b and "Expecting" in b for b in bad), bad
    # Every answer that arrived is in the cache: a fresh folder costs nothing and has the same records.
    srv.reset_counts()
    m2 = _gen(tmp_path / "b", _cfg(srv, cache))
    assert srv.calls["chat"] == 0 and m2["llm"]["stats"]["cache_hits"] == ROUND1 + ROUND2
    assert _records(tmp_path / "b") == _records(tmp_path / "a")
  assert KEY.encode() not in _all_bytes(tmp_path) + caplog.text.encode()


def test_invalid_json_200_is_retried(tmp_path, key_env):
  with FakeOpenAI(faults={"conversation": ["ok", "bad_json"]}) as srv:
    m = _gen(tmp_path / "a", _cfg(srv, tmp_path / "cache"))
    assert srv.calls["200 bad_json"] == 1
  s = m["llm"]["stats"]
  assert s["retries"] == {"bad response": 1} and s["failed"] == {} and s["accepted"]["conversation"] == 8


def test_a_request_that_only_gets_html_is_counted_and_its_body_kept(tmp_path, key_env):
  cache = tmp_path / "cache"
  with FakeOpenAI(faults={"description": ["html"] * 4}) as srv:
    m = _gen(tmp_path / "a", _cfg(srv, cache, concurrency=1, max_retries=3, max_failed_fraction=0.5))
    s = m["llm"]["stats"]
    assert srv.calls["200 html"] == 4
    (reason, n), = s["failed"].items()
    assert n == 1 and reason.startswith("bad response: body is not JSON (text/html")
    assert s["fallback"]["train conversation"] + s["fallback"].get("test MII", 0) >= 1
  # The proxy page is on disk as it arrived (for whoever wants to see what the endpoint sent); it is not a hit.
  raw = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
  html = [e for e in raw if "raw" in e]
  assert len(html) == 1 and "Gateway login" in html[0]["raw"] and html[0]["content_type"] == "text/html"
  with FakeOpenAI() as srv:
    _gen(tmp_path / "b", _cfg(srv, cache))
    assert srv.calls["chat"] == 1 + 2  # the failed description, then its image's two conversations


def test_fatal_error_lets_requests_in_flight_finish_and_keeps_them(tmp_path, key_env):
  """A 401 (a key revoked mid-run) arrives with three answers on their way: they are cached, then the run stops."""
  cache = tmp_path / "cache"
  with FakeOpenAI(faults={"description": ["401"]}, gate_inflight=4) as srv:
    with pytest.raises(LLMError) as ei:
      _gen(tmp_path / "a", _cfg(srv, cache, concurrency=4))
    answered = set(srv.answered)
  msg = str(ei.value)
  assert "\n" not in msg and "HTTP 401" in msg and KEY not in msg
  assert re.search(r"127\.0\.0\.1:\d+/v1/chat/completions round '1 description', request \d/6 \(\S+\)", msg), msg
  assert len(answered) >= 3  # the three released with the 401 (a fourth may have started before it was read)
  assert len(_cached_keys(cache)) == len(answered)
  with FakeOpenAI() as srv2:
    _gen(tmp_path / "b", _cfg(srv2, cache))
    assert not set(srv2.received) & answered and srv2.calls["chat"] == ROUND1 + ROUND2 - len(answered)


# ---- 3: a server whose every answer is refused stops the run; acceptance is recorded ---------------------------
def test_every_answer_empty_fails_the_quality_gate_before_round_two(tmp_path, key_env):
  cache = tmp_path / "cache"
  with FakeOpenAI(default_fault="empty") as srv:
    with pytest.raises(LLMQualityError) as ei:
      _gen(tmp_path / "a", _cfg(srv, cache))
    assert srv.calls["chat"] == ROUND1  # round two was never paid for
  msg = str(ei.value)
  assert "stage 'description'" in msg and "kept 0 of 6 (0%) < --llm-min-accepted 50%" in msg
  assert "6x empty (e.g. '')" in msg and "--llm-min-accepted 0" in msg and "\n" not in msg
  assert not (tmp_path / "a").exists()  # nothing that looks like an LLM dataset

  # Asked for anyway (--llm-min-accepted 0): written from the cache, and the manifest says what the LLM wrote.
  with FakeOpenAI(default_fault="empty") as srv:
    m = generate_dataset(_source(), tmp_path / "a", seed=0, test_fraction=0.34, max_turns=3, records_per_image=2,
                         llm=_cfg(srv, cache, min_accepted=0.0))
    assert srv.calls["chat"] == 0
  q, rec = m["llm"]["stats"]["quality"], m["llm"]["stats"]["records"]
  assert q["description"]["acceptance"] == 0.0 and q["description"]["rejected"] == {"empty": 6}
  assert rec["train.json"] == {"llm": 0, "template": 8, "by_record": "T" * 8}
  assert rec["test_MII.json"]["llm"] == 0 and rec["test_GC.json"]["llm"] == 0
  md = (tmp_path / "a" / "stats.md").read_text()
  assert "### LLM stage" in md and "| description | 1 | 6 | 0 / 6 | 0.0% | 0 | empty (6) |" in md
  assert "| train.json | 0 | 8 |" in md


def test_conversation_gate_and_acceptance_per_stage(tmp_path, key_env):
  faults = {"conversation": ["malformed"] * 5, "regions": ["invented_box"]}
  with FakeOpenAI(faults=faults) as srv:
    with pytest.raises(LLMQualityError, match=r"stage 'conversation' \(round 2\) kept 3 of 8 \(38%\).*"
                                              r"5x malformed JSON \(e\.g\. 'MALFORMED-ANSWER"):
      _gen(tmp_path / "a", _cfg(srv, tmp_path / "cache"))
    srv.faults = {}
    m = _gen(tmp_path / "a", _cfg(srv, tmp_path / "cache", min_accepted=0.3))  # all from the cache
    assert srv.calls["chat"] == ROUND1 + ROUND2
  q = m["llm"]["stats"]["quality"]
  assert q["description"]["acceptance"] == 1.0
  assert q["conversation"]["accepted"] == 3 and q["conversation"]["rejected"] == {"malformed JSON": 5}
  assert q["regions"]["rejected"] == {"invented box": 1} and q["regions"]["units"] > q["regions"]["accepted"] > 0
  by = m["llm"]["stats"]["records"]["train.json"]["by_record"]
  assert by.count("L") == 3 and by.count("T") == 5
  train = _records(tmp_path / "a")["train.json"]
  for r, src in zip(train, by, strict=True):  # "L" records are the fake model's, "T" ones the templates'
    assert ("Where exactly is the" in r["conversations"][0][0]) == (src == "L")


# ---- 4: rerun of a finished folder, retries summary, progress (CLI) -------------------------------------------
def _cli(srv: FakeOpenAI, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "data_gen", "--source", "phantom", "--num-cases", "3", "--image-size", "48",
         "--modalities", "ct,x", "--slices-per-case", "1", "--test-fraction", "0.34", "--records-per-image", "2",
         "--llm-model", "gpt-4o-mini", "--llm-api-key-env", KEY_ENV, "--llm-concurrency", "2",
         "--llm-cache", str(cache), "--llm-timeout", "5", "--llm-base-url", srv.base_url, "--out", str(out), *extra]
  env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO)}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_rerun_of_finished_folder_says_nothing_was_sent(tmp_path):
  cache = tmp_path / "cache"
  with FakeOpenAI(faults={"description": ["429", "500"]}) as srv:
    first = _cli(srv, tmp_path / "a", cache, "--llm-max-retries", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "16 requests, 0 cached, 18 HTTP calls" in first.stdout
    srv.reset_counts()
    again = _cli(srv, tmp_path / "a", cache, "--llm-max-retries", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert srv.calls["chat"] == 0
    assert "0 cached, 18 HTTP calls" not in again.stdout  # the old run's line is not printed as this run's
    assert "already complete" in again.stdout and "no LLM request sent" in again.stdout

    assert "retries 2 (429: 1, 5xx: 1)" in first.stdout and "{'" not in first.stdout  # no raw dict
    assert "llm conversation: kept 8/8 (100%)" in first.stdout
    assert "llm 1 description" in first.stderr and "req" in first.stderr  # the tqdm bar of round one

    srv.default_fault = "empty"
    bad = _cli(srv, tmp_path / "c", tmp_path / "cache-c")
    assert bad.returncode == 4 and "quality gate" in bad.stderr and not (tmp_path / "c").exists()
  assert KEY not in first.stdout + first.stderr + again.stdout + bad.stderr


# ---- estimate and budget -------------------------------------------------------------------------------------
def test_dry_run_estimate_needs_no_key_sends_nothing_and_knows_the_cache(tmp_path, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  cache = tmp_path / "cache"
  with FakeOpenAI() as srv:
    est = generate_dataset(_source(), tmp_path / "a", seed=0, test_fraction=0.34, max_turns=3, records_per_image=2,
                           llm=_cfg(srv, cache), llm_dry_run=True)["llm_estimate"]
    assert sum(srv.calls.values()) == 0 and not (tmp_path / "a").exists()
    r1, r2 = est["rounds"]
    assert (r1["requests"], r1["to_send"], r2["requests"], r2["to_send"]) == (ROUND1, ROUND1, ROUND2, ROUND2)
    assert est["tokenizer"] == TokenCounter("gpt-4o-mini").method
    # The prompt tokens are those of the very requests a run sends (round one: exact bodies).
    client = LLMClient(_cfg(srv, cache))
    facts = _facts_for_estimate()
    bodies = stage.round1_bodies(client, facts, 0)
    assert r1["prompt_tokens"] == sum(client.tokens.count_messages(b["messages"]) for b in bodies)
    assert r1["max_completion_tokens"] == ROUND1 * 1024
    t = est["total"]
    assert t["cost_batch_usd"] == pytest.approx(t["cost_usd"] / 2, abs=1e-6)
    assert t["cost_usd"] == pytest.approx((t["prompt_tokens"] * 1.0 + t["expected_completion_tokens"] * 2.0) / 1e6,
                                          abs=1e-6)
    assert t["worst_cost_usd"] >= t["cost_usd"] > 0
    table = format_estimate(est)
    assert f"| 1 description | 6 | 0 | 6 | {r1['prompt_tokens']} | " in table
    assert f"${t['cost_usd']:.4f} / ${t['worst_cost_usd']:.4f} | ${t['cost_batch_usd']:.4f}" in table

    monkeypatch.setenv(KEY_ENV, KEY)
    _gen(tmp_path / "a", _cfg(srv, cache))
    srv.reset_counts()
    monkeypatch.delenv(KEY_ENV)
    again = generate_dataset(_source(), tmp_path / "a", seed=0, test_fraction=0.34, max_turns=3,
                             records_per_image=2, llm=_cfg(srv, cache), llm_dry_run=True)["llm_estimate"]
    assert sum(srv.calls.values()) == 0
    # After a run everything is cached, round two included (its real bodies were rebuilt from the descriptions).
    assert [r["to_send"] for r in again["rounds"]] == [0, 0] and again["total"]["cost_usd"] == 0


def _facts_for_estimate():
  """The facts of _source(), train images then test images: the order the stage sends round one in."""
  import tempfile

  from data_gen import tasks as T
  from data_gen.pipeline import process_sample
  from data_gen.split import split_cases

  with tempfile.TemporaryDirectory() as d:
    out = [T.ImageFacts.from_dict(process_sample(s, d, None, True)[0]) for s in _source()]
  train, test = split_cases(((f.case_id, f.modality) for f in out), 0.34, 0)
  return [f for f in out if f.case_id in train] + [f for f in out if f.case_id in test]


def test_max_cost_stops_before_the_cap_and_a_higher_cap_continues(tmp_path, key_env):
  cache = tmp_path / "cache"
  price = (100 * 1.0 + 20 * 2.0) / 1e6  # what the server's usage (100 + 20 tokens) costs at $1 / $2 per 1M
  with FakeOpenAI() as srv:
    cfg = _cfg(srv, cache, concurrency=1, max_tokens=64, max_cost_usd=0.0)
    worst = max(LLMClient(cfg).worst_cost(b) for b in stage.round1_bodies(LLMClient(cfg), _facts_for_estimate(), 0))
    cap = 3 * price + worst  # room for a few answers of round one, not for the run
    with pytest.raises(LLMBudgetError) as ei:
      _gen(tmp_path / "a", _cfg(srv, cache, concurrency=1, max_tokens=64, max_cost_usd=cap))
    sent = set(srv.answered)
    assert 4 <= len(sent) < ROUND1 and srv.calls["chat"] == len(sent)
    assert len(sent) * price <= cap  # never past the cap
    msg = str(ei.value)
    assert "--llm-max-cost" in msg and "rerun with a higher --llm-max-cost" in msg and "\n" not in msg
    assert not (tmp_path / "a").exists() and len(_cached_keys(cache)) == len(sent)

    srv.reset_counts()
    m = _gen(tmp_path / "a", _cfg(srv, cache, concurrency=1, max_tokens=64, max_cost_usd=1.0))
    s = m["llm"]["stats"]
    assert not set(srv.received) & sent and srv.calls["chat"] == ROUND1 + ROUND2 - len(sent)
    assert s["cost_usd"] == pytest.approx((ROUND1 + ROUND2 - len(sent)) * price)
    assert s["cached_cost_usd"] == pytest.approx(len(sent) * price)
  with pytest.raises(ValueError, match="--llm-max-cost needs a price"):
    _cfg(srv, cache, model="my-local-model", price_in=None, price_out=None, max_cost_usd=1.0)


def test_max_cost_in_batch_mode_submits_only_what_fits(tmp_path, key_env):
  cache = tmp_path / "cache"
  with FakeOpenAI() as srv:
    cfg = _cfg(srv, cache, batch=True, max_tokens=64)
    client = LLMClient(cfg)
    worst = [client.worst_cost(b, batch=True) for b in stage.round1_bodies(client, _facts_for_estimate(), 0)]
    with pytest.raises(LLMBudgetError, match="2 request\\(s\\) not sent"):
      _gen(tmp_path / "a", _cfg(srv, cache, batch=True, max_tokens=64, max_cost_usd=sum(worst[:4]) + 1e-9))
    assert srv.calls["batches.create"] == 1 and len(_cached_keys(cache)) == 4
    m = _gen(tmp_path / "a", _cfg(srv, cache, batch=True, max_tokens=64, max_cost_usd=1.0))
    assert m["llm"]["stats"]["cache_hits"] == 4 and m["llm"]["stats"]["batch_requests"] == 2 + ROUND2


# ---- rate limits ---------------------------------------------------------------------------------------------
def _descriptions(client: LLMClient, n: int) -> list[dict]:
  return stage.round1_bodies(client, _facts_for_estimate()[:n], 0)


def test_rpm_and_tpm_pace_requests(tmp_path, key_env):
  with FakeOpenAI() as srv:
    client = LLMClient(_cfg(srv, None, concurrency=8, rpm=600))  # one request per 0.1 s

    async def go(c: LLMClient, bodies: list[dict]) -> list:
      async with c:
        return await c.complete_many(bodies, round_name="t")

    assert all(asyncio.run(go(client, _descriptions(client, 5))))
    gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:], strict=False)]
    assert len(gaps) == 4 and min(gaps) >= 0.09, gaps

    srv.arrivals.clear()
    client = LLMClient(_cfg(srv, None, concurrency=8, max_tokens=100))
    bodies = _descriptions(client, 4)
    tokens = [client.tokens.count_messages(b["messages"]) + 100 for b in bodies]
    tpm = 60 * max(tokens) / 0.1  # the largest request takes 0.1 s of the budget
    client = LLMClient(_cfg(srv, None, concurrency=8, max_tokens=100, tpm=tpm))
    assert all(asyncio.run(go(client, bodies)))
    gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:], strict=False)]
    want = [60 * t / tpm for t in tokens[:-1]]
    assert all(g >= 0.9 * w for g, w in zip(gaps, want, strict=True)), (gaps, want)


def test_429_ratelimit_headers_are_read(tmp_path, key_env):
  assert parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
  assert parse_duration("1h2m3.5s") == pytest.approx(3723.5) and parse_duration("soon") is None
  assert rate_limit_wait({"retry-after-ms": "250"}) == 0.25
  with FakeOpenAI(faults={"description": ["429_ratelimit_headers"]}) as srv:
    client = LLMClient(_cfg(srv, None, concurrency=1, backoff_max_s=5.0))

    async def go() -> list:
      async with client:
        return await client.complete_many(_descriptions(client, 1), round_name="t")

    assert all(asyncio.run(go()))
    assert len(srv.arrivals) == 2 and srv.arrivals[1] - srv.arrivals[0] >= 0.6  # the requests window, not tokens'
    assert client.stats.retries == {"429": 1}
    assert client.stats.rate_limit["x-ratelimit-remaining-requests"] == "0"


# ---- local servers -------------------------------------------------------------------------------------------
def test_local_server_without_usage_or_response_format_and_another_model_name(tmp_path, key_env, caplog):
  caplog.set_level(logging.WARNING, logger="data_gen.llm")
  cache = tmp_path / "cache"
  local = dict(model="qwen2.5-7b-instruct", price_in=0.0, price_out=0.0)
  with FakeOpenAI(usage=False, reject_response_format=True, answer_model="Qwen/Qwen2.5-7B-Instruct") as srv:
    with pytest.raises(LLMError) as ei:
      _gen(tmp_path / "a", _cfg(srv, cache, **local))
    msg = str(ei.value)
    assert "HTTP 400" in msg and "--llm-no-json-mode" in msg and "round '2 regions + conversation'" in msg, msg
    assert srv.calls["chat"] >= ROUND1 + 1 and len(_cached_keys(cache)) == ROUND1  # round one kept

    srv.reset_counts()
    m = _gen(tmp_path / "a", _cfg(srv, cache, json_mode=False, **local))
    s = m["llm"]["stats"]
    assert srv.calls["chat"] == ROUND2 and s["cache_hits"] == ROUND1
    assert s["usage_estimated"] == ROUND2 and s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
    assert s["cost_usd"] == 0.0 and s["models"] == {"Qwen/Qwen2.5-7B-Instruct": ROUND2}
    assert s["quality"]["conversation"]["acceptance"] == 1.0
    assert m["params"]["llm"]["model"] == "qwen2.5-7b-instruct" and m["params"]["llm"]["json_mode"] is False
  assert any("answers as model 'Qwen/Qwen2.5-7B-Instruct'" in r.getMessage() for r in caplog.records)
