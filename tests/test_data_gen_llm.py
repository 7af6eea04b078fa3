"""data_gen LLM stage against a real loopback HTTP server that speaks the OpenAI chat/files/batches API.

The server (stdlib http.server in a thread) plays the model: it reads the facts block of each prompt and answers
from it, and it can be scripted per stage to fail (429 with Retry-After or with x-ratelimit-* headers, 500, hang
until the client gives up), to send a 200 that is no chat completion (an HTML page as from a proxy, invalid JSON,
no `choices`), or to answer badly (malformed JSON, an invented box, an unknown label, an empty answer). It can also
behave like a local server (vLLM, llama.cpp, Ollama): no `usage`, a 400 for `response_format`, another `model`
name in its answers. tests/test_data_gen_llm_*.py reuse it. The client under test is the real `openai` package over real
sockets. Nothing here depends on speed: a hung request is held until the client closes the connection, and
concurrency is checked by holding requests until the expected number is in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from data_gen.boxes import parse_boxes
from data_gen.llm import verify
from data_gen.llm.client import LLMClient, LLMConfig, LLMError, cache_key, redact
from data_gen.pipeline import generate_dataset
from data_gen.sources.phantom import PhantomSource
from data_gen.tasks import ImageFacts, ObjectFacts

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET123"
KEY_ENV = "BIRD_TEST_LLM_KEY"
INVENTED = "<box>(991,992),(998,999)</box>"
UNKNOWN = "flux capacitor"
MALFORMED = "MALFORMED-ANSWER {turns: ["
STAGE_RE = re.compile(r"^Task: (global description|region descriptions|conversation)\.", re.M)
STAGES = {"global description": "description", "region descriptions": "regions", "conversation": "conversation"}
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


# ---- the fake model ------------------------------------------------------------------------------------
def _facts(prompt: str) -> dict[str, Any]:
  i = prompt.index("Facts:\n") + len("Facts:\n")
  return json.JSONDecoder().raw_decode(prompt, i)[0]


def _answer(stage: str, prompt: str, fault: str) -> str:
  """What a well-behaved model would say given the facts, unless `fault` asks for a specific bad answer."""
  f = _facts(prompt)
  structs = f["structures"]
  names = sorted({s["name"] for s in structs})
  if fault == "malformed":
    return MALFORMED
  if stage == "description":
    return (f"This {f['modality']} image in the {f['plane'] or 'frontal'} plane shows "
            + ", ".join(f"the {n}" for n in names) + ".")
  if stage == "regions":
    regions = [{"box": s["box"], "description": f"This region contains the {s['name']}, a {s['size']} "
                f"{s['shape']} structure in the {s['position']}."} for s in structs]
    if fault == "invented_box":
      regions[0]["box"] = INVENTED
    return json.dumps({"regions": regions, "overall": f"A {f['modality']} image showing {len(names)} structures."})
  n = int(re.search(r"conversation of (\d+) turn", prompt).group(1))
  name = names[0]
  boxes = "".join(s["box"] for s in structs if s["name"] == name)
  # A well-behaved model asks about each structure once (the verifier refuses repeats).
  others = [s for s in structs if s["name"] != name]
  turns = [{"user": f"Where exactly is the {name}?", "assistant": f"<ref>{name}</ref>{boxes}"}]
  turns += [{"user": f"What is at {s['box']}?", "assistant": f"That is the {s['name']}."} for s in others[-1:]]
  turns += [{"user": f"Tell me about {s['box']}.", "assistant": f"This region contains the {s['name']}."}
            for s in others[-2:-1]]
  turns = turns[:n]
  if fault == "invented_box":
    turns[0]["assistant"] = f"<ref>{name}</ref>{INVENTED}"
  elif fault == "unknown_label":
    turns[0] = {"user": f"Where is the {UNKNOWN}?", "assistant": f"<ref>{UNKNOWN}</ref>{boxes}"}
  return json.dumps({"turns": turns})


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
  return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
          "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
          "usage": dict(USAGE)}


def _body_hash(body: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FakeOpenAI:
  """Loopback OpenAI-compatible server. faults: {stage: [fault, ...]} consumed one per request of that stage.

  gate_inflight=N holds every chat request until N are in flight at once (then holds none): a client that really
  runs N requests concurrently opens the gate, so `max_inflight == N` is exact, whatever the machine's speed.
  """

  def __init__(self, *, faults: dict[str, list[str]] | None = None, gate_inflight: int = 0,
               api_key: str = KEY, default_fault: str = "ok", usage: bool = True,
               reject_response_format: bool = False, answer_model: str | None = None,
               latency_s: float = 0.0) -> None:
    self.faults = {k: deque(v) for k, v in (faults or {}).items()}
    self.default_fault = default_fault  # the fault of every request whose stage has no scripted one left
    self.usage, self.reject_response_format, self.answer_model = usage, reject_response_format, answer_model
    self.latency_s = latency_s
    self.arrivals: list[float] = []  # time.monotonic() of each chat request
    self.gate_inflight, self.api_key = gate_inflight, api_key
    self.gate_open = threading.Event()
    self.stopping = threading.Event()  # set at teardown: releases requests still held
    self.hung_then_abandoned = 0  # "hang" requests the client gave up on (closed the connection)
    self.abandoned = threading.Event()  # set at the first of them
    self.lock = threading.RLock()
    self.calls: Counter = Counter()
    self.answered: list[str] = []  # body hashes of chat requests answered 200
    self.received: list[str] = []
    self.inflight = self.max_inflight = 0
    self.kill_pid: int | None = None
    self.kill_after: int | None = None  # SIGKILL kill_pid when chat request kill_after+1 arrives
    self.files: dict[str, bytes] = {}
    self.batches: dict[str, dict[str, Any]] = {}
    self.batch_complete = True
    self.auth_seen: set[str] = set()
    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def __enter__(self) -> FakeOpenAI:
    self.thread.start()
    return self

  def __exit__(self, *exc: object) -> None:
    self.stopping.set()
    self.gate_open.set()
    self.httpd.shutdown()
    self.httpd.server_close()

  def reset_counts(self) -> None:
    with self.lock:
      self.calls.clear()
      self.received.clear()
      self.answered.clear()

  def next_fault(self, stage: str) -> str:
    with self.lock:
      q = self.faults.get(stage)
      return q.popleft() if q else self.default_fault

  # -- batch side --
  def _run_batch(self, batch: dict[str, Any]) -> None:
    out, err = [], []
    for i, line in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
      req = json.loads(line)
      prompt = req["body"]["messages"][-1]["content"]
      stage = STAGES[STAGE_RE.search(prompt).group(1)]
      fault = self.next_fault(stage)
      if fault == "batch_error":
        err.append({"id": f"r{i}", "custom_id": req["custom_id"], "response": None,
                    "error": {"code": "server_error", "message": "boom"}})
        continue
      body = _completion(req["body"], _answer(stage, prompt, fault))
      out.append({"id": f"r{i}", "custom_id": req["custom_id"], "error": None,
                  "response": {"status_code": 200, "request_id": f"q{i}", "body": body}})
    bid = batch["id"]
    self.files[f"{bid}-out"] = "".join(json.dumps(o) + "\n" for o in out).encode()
    batch["output_file_id"] = f"{bid}-out"
    if err:
      self.files[f"{bid}-err"] = "".join(json.dumps(o) + "\n" for o in err).encode()
      batch["error_file_id"] = f"{bid}-err"

  def _handler(self) -> type[BaseHTTPRequestHandler]:
    srv = self

    class H(BaseHTTPRequestHandler):
      def log_message(self, *a: Any) -> None:  # keep test output quiet
        pass

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          data = b""
          while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
              self.rfile.readline()
              return data
            data += self.rfile.read(size)
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None, raw: bytes | None = None,
                content_type: str = "application/json") -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        try:
          self.send_response(code)
          self.send_header("Content-Type", content_type)
          self.send_header("Content-Length", str(len(data)))
          for k, v in (headers or {}).items():
            self.send_header(k, v)
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout test)

      def _hold(self, event: threading.Event) -> bool:
        """Holds this request until `event` is set (True) or the client closes the connection (False)."""
        while not event.wait(0.05):  # the poll interval is only how soon a closed connection is noticed
          if select.select([self.connection], [], [], 0)[0]:
            try:
              closed = not self.connection.recv(4096)
            except OSError:
              closed = True
            if closed:
              self.close_connection = True
              return False
        return True

      def _authorized(self) -> bool:
        token = self.headers.get("Authorization", "")
        srv.auth_seen.add(token)
        if token == f"Bearer {srv.api_key}":
          return True
        # Echo what was sent, as a careless server would: the client must redact it.
        self._send(401, {"error": {"message": f"Incorrect API key provided: {token.removeprefix('Bearer ')}",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}})
        return False

      def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if not self._authorized():
          return
        if self.path == "/v1/chat/completions":
          self._chat(json.loads(body))
        elif self.path == "/v1/files":
          msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
          parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
          data = parts["file"].get_payload(decode=True)
          with srv.lock:
            srv.calls["files.create"] += 1
            fid = f"file-{len(srv.files)}"
            srv.files[fid] = data
          assert parts["purpose"].get_payload(decode=True) == b"batch"
          self._send(200, {"id": fid, "object": "file", "bytes": len(data), "created_at": 0,
                           "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})
        elif self.path == "/v1/batches":
          req = json.loads(body)
          assert req["endpoint"] == "/v1/chat/completions" and req["input_file_id"] in srv.files
          with srv.lock:
            srv.calls["batches.create"] += 1
            bid = f"batch_{len(srv.batches)}"
            b = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
                 "completion_window": "24h", "status": "validating", "created_at": 0, "polls": 0}
            srv.batches[bid] = b
          self._send(200, {k: v for k, v in b.items() if k != "polls"})
        else:
          self._send(404, {"error": {"message": f"no route {self.path}"}})

      def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
          return
        m = re.fullmatch(r"/v1/batches/([\w-]+)", self.path)
        if m and m.group(1) in srv.batches:
          with srv.lock:
            srv.calls["batches.retrieve"] += 1
            b = srv.batches[m.group(1)]
            b["polls"] += 1
            if b["status"] != "completed":
              if b["polls"] >= 2 and srv.batch_complete:
                srv._run_batch(b)
                b["status"] = "completed"
              else:
                b["status"] = "in_progress"
            self._send(200, {k: v for k, v in b.items() if k != "polls"})
          return
        m = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
        if m and m.group(1) in srv.files:
          with srv.lock:
            srv.calls["files.content"] += 1
          self._send(200, None, raw=srv.files[m.group(1)])
          return
        self._send(404, {"error": {"message": f"no route {self.path}"}})

      def _chat(self, body: dict[str, Any]) -> None:
        h = _body_hash(body)
        with srv.lock:
          srv.calls["chat"] += 1
          srv.received.append(h)
          srv.arrivals.append(time.monotonic())
          if srv.kill_after is not None and len(srv.answered) >= srv.kill_after and srv.kill_pid:
            os.kill(srv.kill_pid, signal.SIGKILL)  # mid-request: this one is never answered
            srv.kill_pid = None
            return
          srv.inflight += 1
          srv.max_inflight = max(srv.max_inflight, srv.inflight)
          if srv.inflight >= srv.gate_inflight:
            srv.gate_open.set()
        if not self._hold(srv.gate_open):  # the client gave up while this request waited at the gate
          with srv.lock:
            srv.inflight -= 1
          return
        prompt = body["messages"][-1]["content"]
        stage = STAGES[STAGE_RE.search(prompt).group(1)]
        if srv.latency_s:
          time.sleep(srv.latency_s)
        if srv.reject_response_format and "response_format" in body:  # llama.cpp / Ollama builds that refuse it
          with srv.lock:
            srv.inflight -= 1
            srv.calls["rejected response_format"] += 1
          self._send(400, {"error": {"message": "'response_format' is not supported by this server",
                                     "type": "invalid_request_error"}})
          return
        fault = srv.next_fault(stage)
        if fault in ("html", "bad_json", "no_choices"):  # a 200 that is no chat completion
          with srv.lock:
            srv.inflight -= 1
            srv.calls[f"200 {fault}"] += 1
          if fault == "html":  # a proxy's or captive portal's page
            self._send(200, None, raw=b"<html><body><h1>Gateway login</h1></body></html>", content_type="text/html")
          elif fault == "bad_json":
            self._send(200, None, raw=b'{"id": "chatcmpl-x", "choices": [{"message": {"content": tru')
          else:
            self._send(200, {"id": "chatcmpl-x", "object": "chat.completion", "model": body["model"]})
          return
        if fault == "401":  # the key was revoked mid-run
          with srv.lock:
            srv.inflight -= 1
          self._send(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
          return
        if fault == "hang":  # no answer at all: held until the client times out and closes the connection
          with srv.lock:
            srv.inflight -= 1  # the client abandons it at its timeout; don't count the zombie
          if not self._hold(srv.stopping):
            with srv.lock:
              srv.hung_then_abandoned += 1
            srv.abandoned.set()
          self.close_connection = True
          return
        code, headers, obj = 200, {}, None
        if fault == "429":
          code, headers, obj = 429, {"Retry-After": "0"}, {"error": {"message": "slow down", "type": "rate_limit"}}
        elif fault == "429_ratelimit_headers":  # OpenAI's headers, no Retry-After: the request window resets in 0.6s
          code, obj = 429, {"error": {"message": "Rate limit reached for requests", "type": "requests"}}
          headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": "600ms", "x-ratelimit-limit-tokens": "10000",
                     "x-ratelimit-remaining-tokens": "9000", "x-ratelimit-reset-tokens": "6m0s"}
        elif fault == "500":
          code, obj = 500, {"error": {"message": "internal", "type": "server_error"}}
        else:
          obj = _completion(body, "" if fault == "empty" else _answer(stage, prompt, fault))
          if not srv.usage:
            del obj["usage"]
          if srv.answer_model:
            obj["model"] = srv.answer_model
        with srv.lock:  # bookkeeping before the reply: the client may send its next request right after it
          srv.inflight -= 1
          if code == 200:
            srv.answered.append(h)
        self._send(code, obj, headers)

    return H


# ---- helpers -------------------------------------------------------------------------------------------
def _source() -> PhantomSource:
  # 6 images (ct + x-ray, 3 cases each); test_fraction 0.34 -> 4 train, 2 test images.
  return PhantomSource(num_cases=3, image_size=48, seed=0, modalities=("ct", "x"), slices_per_case=1)


def _cfg(server: FakeOpenAI, cache: Path | None, **kw: Any) -> LLMConfig:
  base = dict(base_url=server.base_url, model="gpt-4o-mini", api_key_env=KEY_ENV, concurrency=2, max_retries=3,
              timeout_s=1.5, cache_dir=cache, backoff_base_s=0.01, backoff_max_s=0.05, batch_poll_s=0.02,
              price_in=1.0, price_out=2.0)
  return LLMConfig(**{**base, **kw})


def _gen(out: Path, llm: LLMConfig, records_per_image: int = 2) -> dict[str, Any]:
  return generate_dataset(_source(), out, seed=0, test_fraction=0.34, max_turns=3, llm=llm,
                          records_per_image=records_per_image, write_stats=False)


def _all_bytes(*folders: Path) -> bytes:
  return b"".join(p.read_bytes() for d in folders for p in sorted(d.rglob("*")) if p.is_file())


def _records(out: Path) -> dict[str, list[dict]]:
  return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "manifest.json"}


def _facts_of(out: Path) -> dict[str, dict[tuple, set[str]]]:
  """image id -> {box: names}, rebuilt from the phantom's own masks (independent of data_gen's facts)."""
  from data_gen.boxes import label_to_name, mask_to_boxes

  truth: dict[str, dict[tuple, set[str]]] = {}
  for s in _source():
    t = truth.setdefault(s.image_id, {})
    for inst in s.instances:
      for b in mask_to_boxes(inst.mask):
        t.setdefault(b, set()).add(label_to_name(inst.label, s.meta.get("dataset")))
  return truth


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
  monkeypatch.setenv(KEY_ENV, KEY)
  return KEY


# ---- verify: the mask check on its own ----------------------------------------------------------------
def _tiny_facts() -> ImageFacts:
  def o(name: str, box: tuple[int, int, int, int]) -> ObjectFacts:
    return ObjectFacts(name=name, box=box, pixel_box=(0, 0, 1, 1), area_frac=0.01, size="small", shape="oval",
                       position="center", contrast="brighter than")

  return ImageFacts(image_id="ct_00--T--c--z_0000", case_id="c", modality="ct", width=100, height=100,
                    plane="axial", objects=[o("liver", (10, 10, 50, 50)), o("left kidney", (60, 60, 70, 70)),
                                            o("left kidney", (80, 60, 90, 70))])


@pytest.mark.parametrize("turns, reason", [
  ([{"user": "Where is the liver?", "assistant": "<ref>liver</ref><box>(10,10),(50,50)</box>"}], None),
  ([{"user": "Where is the liver?", "assistant": "<ref>liver</ref><box>(10,10),(50,51)</box>"}], "invented box"),
  ([{"user": "Where is the spleen?", "assistant": "<ref>spleen</ref><box>(10,10),(50,50)</box>"}], "unknown name"),
  ([{"user": "Where?", "assistant": "<ref>liver</ref><box>(60,60),(70,70)</box>"}],
   "box does not belong to the name"),
  ([{"user": "Kidney?", "assistant": "<ref>left kidney</ref><box>(60,60),(70,70)</box>"}], "incomplete grounding"),
  ([{"user": "Kidney?", "assistant": "<ref>left kidney</ref><box>(60,60),(70,70)</box><box>(80,60),(90,70)</box>"}],
   None),
  ([{"user": "What is at <box>(10,10),(50,50)</box>?", "assistant": "The left kidney."}],
   "answer does not name the structure at the box"),
  ([{"user": "What is at <box>(10,10),(50,50)</box>?", "assistant": "The liver."}], None),
  ([{"user": "What is at <box>(1,2),(3,4)</box>?", "assistant": "The liver."}], "invented box"),
  ([{"user": "What is at <box>(10, 10),(50,50)</box>?", "assistant": "The liver."}], "malformed box"),
  ([{"user": "Region?", "assistant": "It is <box>(10,10),(50,50)</box>."}], "box without ref"),
  ([{"user": "<img>x.png</img> hi", "assistant": "The liver."}], "unexpected tag"),
  ([{"user": "Hi", "assistant": ""}], "turn structure"),
  ([{"user": "Hi", "assistant": "Yes", "extra": 1}], "turn structure"),
  ([{"user": "a", "assistant": "b"}] * 4, "turn structure"),
  ([{"user": "What is at <box>(10,10),(50,50)</box>?", "assistant": "The liver."},
    {"user": "Where is the liver?", "assistant": "<ref>liver</ref><box>(10,10),(50,50)</box>"}],
   "asks again about an earlier turn's structure"),
  ([{"user": "What is at <box>(10,10),(50,50)</box>?", "assistant": "The liver."},
    {"user": "Where is the left kidney?",
     "assistant": "<ref>left kidney</ref><box>(60,60),(70,70)</box><box>(80,60),(90,70)</box>"}], None),
])
def test_verify_conversation_rules(turns, reason):
  got, why = verify.check_conversation(json.dumps({"turns": turns}), _tiny_facts(), max_turns=3)
  assert why == reason
  assert (got is None) == (reason is not None)


def test_verify_json_and_regions():
  f = _tiny_facts()
  assert verify.check_conversation("{turns: []", f, 3) == (None, "malformed JSON")
  assert verify.check_conversation('{"turns": [], "x": 1}', f, 3) == (None, "turn structure")
  fenced = '```json\n{"turns": [{"user": "Where is the liver?", "assistant": "<ref>liver</ref>' \
           '<box>(10,10),(50,50)</box>"}]}\n```'
  assert verify.check_conversation(fenced, f, 3)[1] is None
  regions = {"regions": [
    {"box": "<box>(10,10),(50,50)</box>", "description": "This region contains the liver."},
    {"box": "(60,60),(70,70)", "description": "This region contains the left kidney."},
    {"box": "<box>(1,1),(2,2)</box>", "description": "This region contains the liver."},
    {"box": "<box>(80,60),(90,70)</box>", "description": "This region contains the liver."},
  ], "overall": "An axial CT image."}
  got, overall, reasons = verify.check_regions(json.dumps(regions), f)
  assert got == {(10, 10, 50, 50): "This region contains the liver.",
                 (60, 60, 70, 70): "This region contains the left kidney."}
  assert overall == "An axial CT image."
  assert sorted(reasons) == ["description does not name the structure at the box", "invented box"]
  assert verify.check_description("This CT shows <ref>liver</ref>.", f) == (None, "tags in plain text")


# ---- end to end ----------------------------------------------------------------------------------------
def test_faults_retries_rejections_cache_and_secret(tmp_path, key_env, caplog):
  caplog.set_level(logging.DEBUG)  # everything, the openai/httpx loggers included
  faults = {"description": ["429", "500", "hang"],
            "conversation": ["malformed", "invented_box", "unknown_label"],
            "regions": ["invented_box"]}
  cache = tmp_path / "cache"
  with FakeOpenAI(faults=faults, gate_inflight=2) as srv:
    m = _gen(tmp_path / "a", _cfg(srv, cache))
    s = m["llm"]["stats"]
    # 6 descriptions + 2 region requests (test images) + 4 train images x 2 conversations.
    assert s["requests"] == 16 and s["cache_hits"] == 0
    assert s["retries"] == {"429": 1, "5xx": 1, "timeout": 1}
    assert s["failed"] == {}
    assert s["http_calls"] == srv.calls["chat"] == 16 + 3
    assert s["rejected"] == {"conversation: malformed JSON": 1, "conversation: invented box": 1,
                             "conversation: unknown name": 1, "regions: invented box": 1}
    assert s["accepted"]["conversation"] == 5 and s["accepted"]["description"] == 6
    assert s["fallback"]["train conversation"] == 3 and "test MII" not in s["fallback"]
    assert s["prompt_tokens"] == 100 * 16 and s["completion_tokens"] == 20 * 16  # the hung answer never arrived
    assert s["cost_usd"] == pytest.approx((100 * 16 * 1.0 + 20 * 16 * 2.0) / 1e6)
    assert 2 == srv.max_inflight  # bounded by --llm-concurrency, and actually concurrent
    # The hung request got no answer: the client timed out and closed that connection (the server sees it soon
    # after; the bound is only against waiting forever).
    assert srv.abandoned.wait(timeout=60) and srv.hung_then_abandoned == 1
    assert m["params"]["llm"]["model"] == "gpt-4o-mini"

    out = tmp_path / "a"
    blob = _all_bytes(out)
    for bad in (INVENTED.encode(), UNKNOWN.encode(), MALFORMED.encode()):
      assert bad not in blob
    recs = _records(out)
    llm_turns = [r for r in recs["train.json"] if "Where exactly is the" in r["conversations"][0][0]]
    assert len(llm_turns) == 5 and len(recs["train.json"]) == 8
    truth = _facts_of(out)
    for name, rs in recs.items():
      for r in rs:
        for q, a in r["conversations"]:
          for b in parse_boxes(q + a):
            assert b in truth[r["id"]], (name, r["id"], b)
    # GC references: the LLM's region description unless the one refused region happened to be the target.
    llm_gc = [r for r in recs["test_GC.json"] if "of the image that appears" not in r["conversations"][0][1]]
    assert len(llm_gc) >= 1 and len(llm_gc) + s["fallback"].get("test GC", 0) == 2
    assert all(r["conversations"][0][1].startswith("A ") for r in recs["test_MII.json"])  # LLM overall answers

    # Same cache, fresh output folder: zero HTTP calls, identical records.
    srv.reset_counts()
    m2 = _gen(tmp_path / "b", _cfg(srv, cache))
    assert srv.calls["chat"] == 0 and sum(srv.calls.values()) == 0
    s2 = m2["llm"]["stats"]
    assert s2["cache_hits"] == s2["requests"] == 16 and s2["http_calls"] == 0 and s2["cost_usd"] == 0
    assert s2["rejected"] == s["rejected"]
    assert _records(tmp_path / "b") == recs

  assert f"Bearer {KEY}" in srv.auth_seen  # the key really was sent...
  for where in (_all_bytes(tmp_path / "a", tmp_path / "b", cache), caplog.text.encode(),
                json.dumps(m).encode(), json.dumps(m2).encode()):
    assert KEY.encode() not in where  # ...and written nowhere
  assert caplog.text  # the openai/httpx loggers did talk, so the check above means something


def test_kill_mid_run_then_rerun_repeats_no_completed_call(tmp_path, key_env):
  cache = tmp_path / "cache"
  cmd = [sys.executable, "-m", "data_gen", "--source", "phantom", "--num-cases", "3", "--image-size", "48",
         "--modalities", "ct,x", "--slices-per-case", "1", "--test-fraction", "0.34", "--records-per-image", "2",
         "--llm-model", "gpt-4o-mini", "--llm-api-key-env", KEY_ENV, "--llm-concurrency", "1",
         "--llm-cache", str(cache), "--llm-timeout", "5"]
  env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO)}
  with FakeOpenAI() as srv:
    cmd += ["--llm-base-url", srv.base_url]
    # Killed by SIGKILL when request 9 arrives: all 6 descriptions + 2 round-two answers were completed.
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "a")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    srv.kill_pid, srv.kill_after = proc.pid, 8
    out1, err1 = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err1.decode()[-2000:]
    first = list(srv.answered)
    assert len(first) == 8 and not (tmp_path / "a").exists()  # the folder is published only when complete

    srv.reset_counts()
    srv.kill_after = None
    done = subprocess.run(cmd + ["--out", str(tmp_path / "a")], cwd=REPO, env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not set(srv.received) & set(first)  # nothing completed before the kill was asked again
    assert srv.calls["chat"] == 16 - 8
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["llm"]["stats"]["cache_hits"] == 8 and m["llm"]["stats"]["http_calls"] == 8
  for blob in (out1, err1, done.stdout, done.stderr, _all_bytes(tmp_path)):
    assert KEY.encode() not in blob
  assert b"llm gpt-4o-mini" in done.stdout  # the CLI summary line


def test_batch_api_end_to_end_and_resume(tmp_path, key_env, caplog):
  caplog.set_level(logging.DEBUG)
  cache = tmp_path / "cache"
  with FakeOpenAI(faults={"conversation": ["invented_box", "batch_error"]}) as srv:
    # First attempt: the batch never finishes within batch_timeout_s -> LLMError, batch id kept on disk.
    srv.batch_complete = False
    with pytest.raises(LLMError, match="rerun to resume"):
      _gen(tmp_path / "a", _cfg(srv, cache, batch=True, batch_timeout_s=0.2, max_failed_fraction=0.5))
    assert srv.calls["files.create"] == 1 and srv.calls["batches.create"] == 1
    assert list((cache / "batches").glob("*.state.json"))

    # Rerun: polls the SAME batch (no new upload, no new batch), then round two as a second batch.
    srv.batch_complete = True
    srv.reset_counts()
    m = _gen(tmp_path / "a", _cfg(srv, cache, batch=True, max_failed_fraction=0.5))
    s = m["llm"]["stats"]
    assert srv.calls["chat"] == 0  # everything went through the Batch API
    assert srv.calls["files.create"] == 1 and srv.calls["batches.create"] == 1  # round two only
    # The resumed round-one batch (6) and round two's new one (10): both are this dataset's batches.
    assert s["batches"] == 2 and s["resumed_batches"] == 1 and s["batch_requests"] == 16
    assert s["requests"] == 16 and s["cache_hits"] == 0
    assert s["rejected"] == {"conversation: invented box": 1}
    assert s["failed"] == {"batch: server_error": 1}
    assert s["fallback"] == {"train conversation": 2}
    assert s["cost_usd"] == pytest.approx(15 * (100 * 1.0 + 20 * 2.0) / 1e6 * 0.5)  # batch price: half
    assert not list((cache / "batches").glob("*.state.json"))
    assert INVENTED.encode() not in _all_bytes(tmp_path / "a")

    # Third run, new folder: only the one request that failed in the batch is sent again.
    srv.reset_counts()
    m3 = _gen(tmp_path / "b", _cfg(srv, cache, batch=True, max_failed_fraction=0.5))
    s3 = m3["llm"]["stats"]
    assert srv.calls["batches.create"] == 1 and s3["batch_requests"] == 1 and s3["cache_hits"] == 15
    assert s3["fallback"] == {"train conversation": 1} and srv.calls["chat"] == 0
  assert KEY.encode() not in _all_bytes(tmp_path) + caplog.text.encode()


def test_auth_error_is_fatal_and_redacted(tmp_path, key_env, caplog):
  caplog.set_level(logging.DEBUG)
  with FakeOpenAI(api_key="sk-other-key") as srv:  # our key is wrong; the server echoes it back
    with pytest.raises(LLMError) as ei:
      _gen(tmp_path / "a", _cfg(srv, tmp_path / "cache"))
    assert srv.calls["chat"] == 0 and len(srv.auth_seen) >= 1  # refused at the door
  msg = str(ei.value)
  assert "HTTP 401" in msg and KEY not in msg and "***" in msg
  assert ei.value.__cause__ is None and ei.value.__suppress_context__  # no chained openai error holding the body
  assert KEY not in caplog.text
  assert not (tmp_path / "a").exists()


def test_missing_key_env_and_retry_exhaustion(tmp_path, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  with FakeOpenAI() as srv:
    with pytest.raises(LLMError, match=KEY_ENV):
      _gen(tmp_path / "a", _cfg(srv, None))
    monkeypatch.setenv(KEY_ENV, KEY)
    srv.faults = {"description": deque(["500", "500", "429"])}
    client = LLMClient(_cfg(srv, tmp_path / "c", max_retries=1))

    async def go() -> list:
      async with client:
        msgs = [[{"role": "user", "content": f"Task: global description.\nFacts:\n"
                  f'{{"modality": "CT", "plane": null, "structures": [{{"name": "liver{i}"}}]}}'}] for i in range(2)]
        bodies = [client.build_request(m) for m in msgs]
        assert cache_key(bodies[0]) != cache_key(bodies[1])
        return await client.complete_many([bodies[0]]) + await client.complete_many([bodies[1]])

    first, second = asyncio.run(go())
    assert first is None and second is not None  # 500,500 -> gave up after 1 retry; 429 -> retried, succeeded
    assert client.stats.failed == {"retries exhausted (5xx)": 1}
    assert client.stats.retries == {"5xx": 1, "429": 1}
  assert redact(f"Authorization: Bearer {KEY} and {KEY}", KEY) == "Authorization: Bearer *** and ***"


def test_without_llm_the_template_path_is_untouched(tmp_path, monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no key needed, no LLM code path taken
  m = generate_dataset(_source(), tmp_path / "t", seed=0, test_fraction=0.34, max_turns=3, records_per_image=2,
                       write_stats=False)
  assert "llm" not in m and "llm" not in m["params"]
  assert not list(tmp_path.glob("*.llm-cache"))
