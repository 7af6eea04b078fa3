"""Tokenizer: exact Qwen-VL ids (original tokenizer's output in the fixture), the tiktoken-file loader on a
file written here, the demo BPE layout, digit splitting, image spans, ChatML and its loss masks."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest

from bird_jax.tokenizer import (
  SPECIAL_TOKENS,
  chat_prompt_ids,
  chatml_tokenize,
  fit_image_paths,
  load_tokenizer,
  train_demo_tokenizer,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official"
BOX = "(517,508),(589,611)"


@pytest.fixture(scope="module")
def qwen():
  return load_tokenizer(FIXTURE / "checkpoint")


@pytest.fixture(scope="module")
def reference():
  return json.loads((FIXTURE / "reference.json").read_text())["prompts"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  texts = [
    "Picture 1: <img>images/ct_00--Tiny--case_0001--z_0001.png</img>\nWhere is the liver in the image?",
    f"<ref>left kidney</ref><box>{BOX}</box>", "What is the object at <box>(1,2),(3,4)</box>?",
    "The CT image in the axial plane shows the liver, the spleen and both kidneys. Ünïcödé façade.",
  ] * 30
  return train_demo_tokenizer(texts, tmp_path_factory.mktemp("demo_tok"), vocab_size=400, image_tokens=48)


# ---- Qwen backend against the original implementation ----------------------------------------------

def test_qwen_reproduces_original_input_ids(qwen, reference):
  for name, prompt in reference.items():
    text = prompt["text"].replace("IMAGE_PATH", "ct_slice.png")
    ids = qwen.encode(text)
    assert ids == prompt["input_ids"], name
    assert qwen.decode(ids) == text


def test_qwen_chat_prompt_matches_original(qwen, reference):
  ids = chat_prompt_ids(qwen, [], "Picture 1: <img>ct_slice.png</img>\nWhere is the liver?")
  assert ids == reference["grounding"]["input_ids"]
  query = ("Picture 1: <img>ct_slice.png</img>\n"
           "What is at <ref>this region</ref><box>(120,340),(560,780)</box>?")
  assert chat_prompt_ids(qwen, [], query, system=None) == reference["referring"]["input_ids"]


def test_qwen_special_ids_and_known_pieces(qwen):
  assert qwen.vocab_size == 151860 and qwen.image_tokens == 256
  assert qwen.special == {
    "endoftext": 151643, "im_start": 151644, "im_end": 151645, "ref_start": 151851, "ref_end": 151852,
    "box_start": 151853, "box_end": 151854, "quad_start": 151855, "quad_end": 151856,
    "img_start": 151857, "img_end": 151858, "img_pad": 151859}
  assert qwen.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
  assert qwen.encode("Picture 1:") == [24669, 220, 16, 25]
  assert qwen.encode("\n") == [198]
  # The qwen_vl.md example: a.jpg -> <img>, bytes, 251 pads, </img>.
  ids = qwen.encode("<img>a.jpg</img>")
  assert ids == [151857, 97, 46, 106, 112, 103] + [151859] * 251 + [151858]
  assert qwen.decode(ids, skip_special_tokens=True) == "a.jpg"
  # Ids beyond n_vocab (the embedding is padded to 151936) decode to nothing instead of crashing.
  assert qwen.decode([24669, 151900]) == "Picture"


def test_qwen_content_cannot_inject_chat_tokens(qwen):
  ids = qwen.encode("a<|im_end|>b", allow_chat_specials=False)
  assert qwen.special["im_end"] not in ids and qwen.decode(ids) == "a<|im_end|>b"
  assert qwen.encode("a<|im_end|>b") == qwen.encode("a") + [151645] + qwen.encode("b")
  # VL tags stay special inside content (Qwen's make_context allows exactly those).
  assert qwen.special["box_start"] in qwen.encode("<box>(1,2),(3,4)</box>", allow_chat_specials=False)


def test_image_span_errors_and_fitting(qwen):
  with pytest.raises(ValueError, match="257 bytes"):
    qwen.encode("<img>" + "a" * 257 + "</img>")
  with pytest.raises(ValueError, match="unclosed <img>"):
    qwen.encode("Picture 1: <img>x.png")
  long = "/very/long/" + "d" * 300 + "/x.png"
  assert fit_image_paths(f"<img>{long}</img> q", 256) == "<img>x.png</img> q"
  assert fit_image_paths("<img>" + "e" * 300 + "</img>", 256) == "<img></img>"
  assert fit_image_paths("<img>short.png</img>", 256) == "<img>short.png</img>"


def _finetune_py_targets(tok, system, turns):
  """Literal port of Qwen-VL finetune.py `preprocess` (IGNORE = -100) for one source."""
  ignore = -100
  im_start, im_end = tok.special["im_start"], tok.special["im_end"]
  nl = tok.encode("\n")
  roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
  input_id, target = [], []
  sys_ids = [im_start] + tok.encode("system") + nl + tok.encode(system) + [im_end] + nl
  input_id += sys_ids
  target += [im_start] + [ignore] * (len(sys_ids) - 3) + [im_end] + nl
  for user, assistant in turns:
    for role, value in (("user", user), ("assistant", assistant)):
      r = tok.encode(roles[role])
      _input = r + nl + tok.encode(value) + [im_end] + nl
      input_id += _input
      if role == "user":
        target += [im_start] + [ignore] * (len(_input) - 3) + [im_end] + nl
      else:
        target += [im_start] + [ignore] * len(r) + _input[len(r) + 1:-2] + [im_end] + nl
  return input_id, target


def test_qwen_official_mask_matches_finetune_py(qwen):
  turns = [["Picture 1: <img>ct_slice.png</img>\nWhere is the liver?", f"<ref>liver</ref><box>{BOX}</box>"],
           ["And the spleen?", "It is at the upper left."]]
  want_ids, target = _finetune_py_targets(qwen, "You are a helpful assistant.", turns)
  ids, mask = chatml_tokenize(qwen, turns, loss_on="qwen_official")
  assert ids == want_ids
  assert mask == [int(t != -100) for t in target]


# ---- a real-format qwen.tiktoken written here ------------------------------------------------------

def _write_tiktoken(path: Path, merges: list[bytes]) -> dict[bytes, int]:
  # Like the real file: single bytes first (not in byte order), then merges by rank.
  singles = [bytes([b]) for b in range(33, 256)] + [bytes([b]) for b in range(33)]
  ranks = {t: r for r, t in enumerate(singles + merges)}
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  return ranks


def test_small_tiktoken_file_through_production_loader(tmp_path):
  merges = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12"]
  ranks = _write_tiktoken(tmp_path / "qwen.tiktoken", merges)
  for target in (tmp_path, tmp_path / "qwen.tiktoken"):
    tok = load_tokenizer(target, image_tokens=8)
    n = len(ranks)
    assert tok.special["endoftext"] == n and tok.special["im_start"] == n + 1
    assert tok.special["ref_start"] == n + 3 + 205 and tok.special["img_pad"] == n + 3 + 205 + 8
    assert tok.vocab_size == n + 3 + 205 + 9
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    # "12" is a merge, but Qwen's regex splits digits first, so it is never used.
    assert tok.encode("x12") == [ranks[b"x"], ranks[b"1"], ranks[b"2"]]
    ids = tok.encode("<|im_start|>hi<img>p.png</img>")
    assert ids[0] == n + 1 and ids[3:] == [tok.special["img_start"], *b"p.png", *[tok.special["img_pad"]] * 3,
                                           tok.special["img_end"]]
    assert tok.decode(ids) == "<|im_start|>hi<img>p.png</img>"
    with pytest.raises(ValueError, match="9 bytes"):
      tok.encode("<img>123456789</img>")


def test_tiktoken_file_errors_name_the_line(tmp_path):
  (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-a-valid-line\n")
  with pytest.raises(ValueError, match=r"qwen.tiktoken:2"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a tokenizer"):
    load_tokenizer(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither qwen.tiktoken nor tokenizer.json"):
    load_tokenizer(tmp_path / "empty")


# ---- both backends --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["qwen", "demo"])
def test_digits_split_individually(backend, qwen, demo):
  tok = qwen if backend == "qwen" else demo
  ids = tok.encode(BOX)
  assert len(ids) == 17
  pieces = [tok.decode([i]) for i in ids]
  assert [p for p in pieces if p.isdigit()] == list("517508589611")
  assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
  assert "".join(pieces) == BOX


@pytest.mark.parametrize("backend", ["qwen", "demo"])
def test_round_trip_and_chatml_assistant_mask(backend, qwen, demo):
  tok = qwen if backend == "qwen" else demo
  text = "Ünïcödé façade 12 <ref>x</ref><box>(1,2),(3,4)</box>\n\n  tabs\tand spaces  "
  assert tok.decode(tok.encode(text)) == text
  turns = [["Picture 1: <img>images/ct_00--Tiny--case_0001--z_0001.png</img>\nWhere is the liver?",
            f"<ref>liver</ref><box>{BOX}</box>"],
           ["What is the object at <box>(1,2),(3,4)</box>?", "spleen"]]
  ids, mask = chatml_tokenize(tok, turns)
  assert len(ids) == len(mask)
  supervised = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
  assert supervised == "".join(a + "<|im_end|>" for _, a in turns)
  full = tok.decode(ids)
  assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
  assert full.endswith("<|im_start|>assistant\nspleen<|im_end|>\n")
  prompt = chat_prompt_ids(tok, turns[:1], "And the aorta?")
  first = chatml_tokenize(tok, turns[:1])[0]
  assert prompt[:len(first)] == first
  assert tok.decode(prompt).endswith("<|im_start|>user\nAnd the aorta?<|im_end|>\n<|im_start|>assistant\n")


# ---- demo backend ---------------------------------------------------------------------------------

def test_demo_layout_and_reload(demo, tmp_path):
  assert demo.special == {name: 256 + k for k, name in enumerate(SPECIAL_TOKENS)}
  assert 268 < demo.vocab_size <= 400
  for b in b"abcXYZ(),<>019 \n":
    assert demo.decode([b]) == chr(b)  # id b is byte b
  for name, surface in SPECIAL_TOKENS.items():
    if name != "img_start":  # a lone <img> is an error (unclosed span), as in Qwen
      assert demo.encode(surface) == [demo.special[name]]
  text = "Where is the liver in the image? <|im_end|>"
  re_loaded = load_tokenizer(demo.source_path)
  assert re_loaded.encode(text) == demo.encode(text)
  assert load_tokenizer(Path(demo.source_path) / "tokenizer.json").image_tokens == 48
  assert pickle.loads(pickle.dumps(demo)).encode(text) == demo.encode(text)
  # Image slots hold raw bytes below 256, so they can never be read as specials.
  span = demo.encode("<img>images/ct.png</img>")
  assert span[0] == demo.special["img_start"] and span[-1] == demo.special["img_end"] and len(span) == 50
  assert all(i < 256 for i in span[1:14]) and bytes(span[1:14]) == b"images/ct.png"
  ids = demo.encode("a<|im_end|>b", allow_chat_specials=False)
  assert demo.special["im_end"] not in ids and demo.decode(ids) == "a<|im_end|>b"


def test_demo_training_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab_size must be >= 268"):
    train_demo_tokenizer(["x"], tmp_path, vocab_size=100)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="tokenizer.json: cannot be read"):
    load_tokenizer(tmp_path)
