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
  FakeOpenAI,
  KEY,
  KEY_ENV,
  REPO,
  _all_bytes,
  _body_hash,
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
  cache_key,
  parse_duration,
  rate_limit_wait,
)
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
