"""Tokenizers for Qwen-VL(-Chat) and for small demo models, behind one interface, plus ChatML helpers.

Two backends:

* Qwen (`qwen.tiktoken`): a `tiktoken.Encoding` built exactly like Qwen-VL's `tokenization_qwen.py`:
  the rank file, Qwen's pre-tokenisation regex (every digit is its own piece), NFC, and the special
  tokens numbered after the ranks (endoftext, im_start, im_end, 205 extras, then the 9 VL tags; with the
  real file that is 151643 ... 151859).
* Demo (`tokenizer.json`): a byte-level BPE trained with HF `tokenizers` on our own texts, using the same
  pre-tokenisation regex so box coordinates also tokenize digit by digit. Vocabulary layout (fixed so that
  image-slot byte ids can never collide with special ids):

    ids 0..255    the 256 single bytes, id b = byte b (GPT-2 byte-to-unicode surface forms)
    ids 256..267  the 12 special tokens in `SPECIAL_TOKENS` order (endoftext=256 ... img_pad=267)
    ids 268..     learned merges, in merge order

  Saved as `<dir>/tokenizer.json` plus `<dir>/bird_tokenizer.json` ({"image_tokens": N, "special": ...}).

Image spans follow Qwen's rule in both backends: `<img>P</img>` becomes img_start, the UTF-8 bytes of P as
ids (byte b -> id b), img_pad up to `image_tokens`, img_end. The model overwrites the slot rows with image
features, so only their count matters to it; the path bytes are kept so that decoding round-trips.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Name -> surface form. The order is also the demo backend's id order (256 + index).
SPECIAL_TOKENS: dict[str, str] = {
  "endoftext": "<|endoftext|>",
  "im_start": "<|im_start|>",
  "im_end": "<|im_end|>",
  "ref_start": "<ref>",
  "ref_end": "</ref>",
  "box_start": "<box>",
  "box_end": "</box>",
  "quad_start": "<quad>",
  "quad_end": "</quad>",
  "img_start": "<img>",
  "img_end": "</img>",
  "img_pad": "<imgpad>",
}
# Tags that may appear inside message content (Qwen's make_context allows only these there).
VL_TAG_NAMES = ("ref_start", "ref_end", "box_start", "box_end", "quad_start", "quad_end",
                "img_start", "img_end", "img_pad")
QWEN_NUM_EXTRAS = 205
QWEN_IMAGE_TOKENS = 256
DEFAULT_SYSTEM = "You are a helpful assistant."
DEMO_CONFIG_NAME = "bird_tokenizer.json"

# Qwen's tiktoken pattern: like cl100k but `\p{N}` (one digit per piece) instead of `\p{N}{1,3}`.
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_IMG_SPAN_RE = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def _alternation(surfaces: Iterable[str]) -> re.Pattern[str]:
  # Longest first so that no surface form is shadowed by a prefix of another.
  return re.compile("|".join(re.escape(s) for s in sorted(surfaces, key=len, reverse=True)))


class Tokenizer:
  """Backend-independent part: special tokens, `<img>` spans, decoding of image spans.

  Subclasses implement `_encode_ordinary` (text without any recognised special token) and `_decode_ids`
  (ids without image spans; special ids decode to their surface form).
  """

  backend: str = "base"

  def __init__(self, *, vocab_size: int, image_tokens: int, surfaces: Mapping[str, int],
               source_path: str | None) -> None:
    if image_tokens < 1:
      raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
    self.vocab_size = int(vocab_size)
    self.image_tokens = int(image_tokens)
    self.source_path = source_path
    self._surface_to_id = dict(surfaces)
    self._id_to_surface = {i: s for s, i in self._surface_to_id.items()}
    self.special = {name: self._surface_to_id[s] for name, s in SPECIAL_TOKENS.items()}
    self.special_ids = frozenset(self._surface_to_id.values())
    self._all_re = _alternation(self._surface_to_id)
    self._vl_re = _alternation(SPECIAL_TOKENS[n] for n in VL_TAG_NAMES)
    if min(self.special.values()) < 256:
      raise ValueError(f"special ids must be >= 256 so image-slot byte ids cannot collide: {self.special}")

  # Convenience ids.
  @property
  def pad_id(self) -> int:
    return self.special["endoftext"]

  @property
  def eos_id(self) -> int:
    return self.special["endoftext"]

  def __len__(self) -> int:
    return self.vocab_size

  def __reduce__(self) -> tuple[Any, ...]:
    # Grain workers receive transforms by pickle; re-loading from the file keeps the pickle small and
    # avoids relying on the backends' own pickling.
    if self.source_path is None:
      raise TypeError("this tokenizer has no source file and cannot be pickled; save/load it first")
    return (load_tokenizer, (self.source_path, self.image_tokens))

  # ---- backend hooks ----
  def _encode_ordinary(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_ids(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  # ---- public API ----
  def image_span_ids(self, path: str) -> list[int]:
    """img_start, UTF-8 bytes of `path` (byte b -> id b), img_pad up to image_tokens, img_end."""
    raw = list(unicodedata.normalize("NFC", path).encode("utf-8"))
    if len(raw) > self.image_tokens:
      raise ValueError(f"image path {path[:60]!r}... is {len(raw)} bytes, more than the {self.image_tokens} "
                       "image slots; use a shorter path (see fit_image_paths)")
    pad = [self.special["img_pad"]] * (self.image_tokens - len(raw))
    return [self.special["img_start"], *raw, *pad, self.special["img_end"]]

  def encode(self, text: str, *, allow_chat_specials: bool = True) -> list[int]:
    """Text -> ids. Special surface forms are recognised (with `allow_chat_specials=False` only the 9 VL
    tags are, as Qwen does for message content); each `<img>P</img>` becomes an image span."""
    text = unicodedata.normalize("NFC", text)
    pattern = self._all_re if allow_chat_specials else self._vl_re
    img_start, img_end = SPECIAL_TOKENS["img_start"], SPECIAL_TOKENS["img_end"]
    ids: list[int] = []
    pos = 0
    while True:
      m = pattern.search(text, pos)
      if m is None:
        break
      if m.start() > pos:
        ids += self._encode_ordinary(text[pos:m.start()])
      if m.group() == img_start:
        close = text.find(img_end, m.end())
        if close < 0:
          raise ValueError(f"unclosed <img> in {text[:80]!r}: add </img> after the image path")
        ids += self.image_span_ids(text[m.end():close])
        pos = close + len(img_end)
      else:
        ids.append(self._surface_to_id[m.group()])
        pos = m.end()
    if pos < len(text):
      ids += self._encode_ordinary(text[pos:])
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Inverse of `encode` (image spans come back as `<img>P</img>`; with skip_special_tokens only P).
    Ids outside the vocabulary (padded embedding rows) are dropped."""
    ids = [int(i) for i in ids]
    s_start, s_end, s_pad = self.special["img_start"], self.special["img_end"], self.special["img_pad"]
    pieces: list[str] = []
    run: list[int] = []

    def flush() -> None:
      kept = [i for i in run if 0 <= i < self.vocab_size
              and not (skip_special_tokens and i in self.special_ids)]
      if kept:
        pieces.append(self._decode_ids(kept))
      run.clear()

    k = 0
    while k < len(ids):
      i = ids[k]
      if i == s_start and s_end in ids[k + 1:]:
        e = ids.index(s_end, k + 1)
        slot = ids[k + 1:e]
        raw = slot[:slot.index(s_pad)] if s_pad in slot else slot
        path = bytes(b for b in raw if 0 <= b < 256).decode("utf-8", errors="replace")
        flush()
        pieces.append(path if skip_special_tokens else f"<img>{path}</img>")
        k = e + 1
        continue
      run.append(i)
      k += 1
    flush()
    return "".join(pieces)

  def token_id(self, surface: str) -> int:
    """Id of a special surface form, e.g. '<|im_end|>'."""
    return self._surface_to_id[surface]


# ------------------------------------------------------------------------------------------------
# Qwen tiktoken backend


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
  """Parses a `qwen.tiktoken` file (lines 'base64(token) rank'; LF or CRLF) like Qwen's loader does."""
  text = Path(path).read_bytes()
  ranks: dict[bytes, int] = {}
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}")
    ranks[base64.b64decode(parts[0])] = int(parts[1])
  return ranks


class QwenTokenizer(Tokenizer):
  backend = "qwen_tiktoken"

  def __init__(self, tiktoken_file: str | Path, image_tokens: int = QWEN_IMAGE_TOKENS) -> None:
    import tiktoken

    ranks = load_tiktoken_ranks(tiktoken_file)
    names = ([SPECIAL_TOKENS["endoftext"], SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"]]
             + [f"<|extra_{i}|>" for i in range(QWEN_NUM_EXTRAS)]
             + [SPECIAL_TOKENS[n] for n in VL_TAG_NAMES])
    start = len(ranks)  # Qwen numbers specials right after the ranks.
    surfaces = {s: start + i for i, s in enumerate(names)}
    self._enc = tiktoken.Encoding("Qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=surfaces)
    super().__init__(vocab_size=start + len(names), image_tokens=image_tokens, surfaces=surfaces,
                     source_path=str(tiktoken_file))

  def _encode_ordinary(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def _decode_ids(self, ids: Sequence[int]) -> str:
    return self._enc.decode(list(ids), errors="replace")


# ------------------------------------------------------------------------------------------------
# HF `tokenizers` backend (demo)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable char map (the surface forms HF's ByteLevel uses)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _hf_pipeline_parts() -> tuple[Any, Any, Any]:
  from tokenizers import Regex, decoders, normalizers, pre_tokenizers

  pre = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  return normalizers.NFC(), pre, decoders.ByteLevel()


class HFTokenizer(Tokenizer):
  backend = "hf_tokenizers"

  def __init__(self, tokenizer_json: str | Path, image_tokens: int | None = None,
               source_path: str | None = None) -> None:
    from tokenizers import Tokenizer as HFTok

    tokenizer_json = Path(tokenizer_json)
    try:
      self._hf = HFTok.from_file(str(tokenizer_json))
    except Exception as e:  # the Rust error does not name the file
      raise ValueError(f"{tokenizer_json}: cannot be read by HF tokenizers ({e}); retrain/re-save it") from e
    cfg_path = tokenizer_json.parent / DEMO_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if image_tokens is None:
      image_tokens = cfg.get("image_tokens")
    if image_tokens is None:
      raise ValueError(f"{tokenizer_json}: no {DEMO_CONFIG_NAME} beside it; pass image_tokens=N")
    surfaces = {}
    for name, s in SPECIAL_TOKENS.items():
      tid = self._hf.token_to_id(s)
      if tid is None:
        raise ValueError(f"{tokenizer_json}: special token {s} ({name}) missing; train it with "
                         "bird_jax.tokenizer.train_demo_tokenizer")
      surfaces[s] = tid
    super().__init__(vocab_size=self._hf.get_vocab_size(with_added_tokens=True), image_tokens=image_tokens,
                     surfaces=surfaces, source_path=source_path or str(tokenizer_json.parent))

  def _encode_ordinary(self, text: str) -> list[int]:
    # HF always matches added tokens; a chat special inside content (only possible with
    # allow_chat_specials=False) is broken after its first char so that it stays plain text.
    out: list[int] = []
    pos = 0
    for m in self._all_re.finditer(text):
      out += self._hf.encode(text[pos:m.start() + 1], add_special_tokens=False).ids
      pos = m.start() + 1
    out += self._hf.encode(text[pos:], add_special_tokens=False).ids
    return out

  def _decode_ids(self, ids: Sequence[int]) -> str:
    # Specials are decoded by us: HF would otherwise merge them into the byte-level stream oddly.
    pieces: list[str] = []
    run: list[int] = []
    for i in ids:
      if i in self.special_ids:
        if run:
          pieces.append(self._hf.decode(run, skip_special_tokens=False))
          run = []
        pieces.append(self._id_to_surface[i])
      else:
        run.append(i)
    if run:
      pieces.append(self._hf.decode(run, skip_special_tokens=False))
    return "".join(pieces)


def _ordinary_chunks(texts: Iterable[str]) -> Iterator[str]:
  """Training text without special tokens or image paths (those never reach the BPE at encode time)."""
  special_re = _alternation(SPECIAL_TOKENS.values())
  for t in texts:
    t = _IMG_SPAN_RE.sub(" ", unicodedata.normalize("NFC", t))
    for chunk in special_re.split(t):
      if chunk:
        yield chunk


def train_demo_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int = 1024,
                         image_tokens: int = 64, min_frequency: int = 2) -> HFTokenizer:
  """Trains a byte-level BPE (layout in the module docstring) and saves it to the directory `out_path`.

  `vocab_size` is an upper bound: a small corpus may yield fewer merges; the result's `vocab_size` is exact.
  """
  from tokenizers import AddedToken, models, trainers
  from tokenizers import Tokenizer as HFTok

  n_special = len(SPECIAL_TOKENS)
  base = 256 + n_special
  if vocab_size < base:
    raise ValueError(f"vocab_size must be >= {base} (256 bytes + {n_special} specials), got {vocab_size}")
  normalizer, pre, dec = _hf_pipeline_parts()
  draft = HFTok(models.BPE())
  draft.normalizer, draft.pre_tokenizer = normalizer, pre
  from tokenizers import pre_tokenizers

  trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - n_special, 256), min_frequency=min_frequency,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                show_progress=False)
  draft.train_from_iterator(_ordinary_chunks(texts), trainer=trainer)
  merges_raw = json.loads(draft.to_str())["model"]["merges"]
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges_raw]

  # Re-number: bytes in byte order, then specials, then merge results in merge order.
  vocab: dict[str, int] = {ch: b for b, ch in _bytes_to_unicode().items()}
  for k, s in enumerate(SPECIAL_TOKENS.values()):
    vocab[s] = 256 + k
  for a, b in merges:
    if a + b not in vocab:
      vocab[a + b] = len(vocab)
  tok = HFTok(models.BPE(vocab=vocab, merges=merges))
  tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, dec
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS.values()])
  for s, want in zip(SPECIAL_TOKENS.values(), range(256, base), strict=True):
    assert tok.token_to_id(s) == want, (s, tok.token_to_id(s), want)

  out = Path(out_path)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  (out / DEMO_CONFIG_NAME).write_text(json.dumps({
    "format": "bird_jax demo tokenizer: ids 0..255 bytes, 256..267 specials, then merges",
    "image_tokens": int(image_tokens),
    "special": {n: 256 + k for k, n in enumerate(SPECIAL_TOKENS)},
  }, indent=2) + "\n")
  return HFTokenizer(out / "tokenizer.json", source_path=str(out))


def load_tokenizer(path: str | Path, image_tokens: int | None = None) -> Tokenizer:
  """A directory with `qwen.tiktoken` (or the file itself) -> Qwen backend; a directory with
  `tokenizer.json` (or that file) -> HF backend. `image_tokens` overrides the stored/default value."""
  p = Path(path)
  if p.is_dir():
    if (p / "qwen.tiktoken").is_file():
      return QwenTokenizer(p / "qwen.tiktoken", image_tokens or QWEN_IMAGE_TOKENS)
    if (p / "tokenizer.json").is_file():
      return HFTokenizer(p / "tokenizer.json", image_tokens, source_path=str(p))
    raise FileNotFoundError(f"{p}: neither qwen.tiktoken nor tokenizer.json inside; point at a tokenizer dir")
  if p.is_file() and p.suffix == ".tiktoken":
    return QwenTokenizer(p, image_tokens or QWEN_IMAGE_TOKENS)
  if p.is_file() and p.suffix == ".json":
    return HFTokenizer(p, image_tokens, source_path=str(p))
  raise FileNotFoundError(f"{p}: not a tokenizer; expected a dir holding qwen.tiktoken or tokenizer.json, "
                          "or one of those files")


# ------------------------------------------------------------------------------------------------
# ChatML


def fit_image_paths(text: str, image_tokens: int) -> str:
  """Rewrites `<img>P</img>` spans whose path is longer than the image slots: the basename if it fits,
  else empty. The model overwrites the slots anyway; only their count matters."""
  def repl(m: re.Match[str]) -> str:
    path = m.group(1)
    if len(path.encode("utf-8")) <= image_tokens:
      return m.group(0)
    base = path.replace("\\", "/").rsplit("/", 1)[-1]
    return f"<img>{base if len(base.encode('utf-8')) <= image_tokens else ''}</img>"
  return _IMG_SPAN_RE.sub(repl, text)


def as_turn_pairs(conversations: Any) -> list[tuple[str, str]]:
  """Accepts [[user, assistant], ...], [{"user": .., "assistant": ..}, ...] or a TFDS-decoded
  {"user": [...], "assistant": [...]} (bytes or str) and returns a list of (user, assistant) strings."""
  def s(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes | bytearray) else str(x)

  if isinstance(conversations, Mapping):
    users, assistants = list(conversations["user"]), list(conversations["assistant"])
    if len(users) != len(assistants):
      raise ValueError(f"conversations: {len(users)} user vs {len(assistants)} assistant strings")
    return [(s(u), s(a)) for u, a in zip(users, assistants, strict=True)]
  pairs = []
  for k, turn in enumerate(conversations):
    if isinstance(turn, Mapping):
      pairs.append((s(turn["user"]), s(turn["assistant"])))
    elif isinstance(turn, Sequence) and not isinstance(turn, str | bytes) and len(turn) == 2:
      pairs.append((s(turn[0]), s(turn[1])))
    else:
      raise ValueError(f"conversations[{k}] must be [user, assistant], got {str(turn)[:80]!r}")
  return pairs


def _role_block(tok: Tokenizer, role: str, content: str, supervise_content: bool, official: bool,
                fit_paths: bool) -> tuple[list[int], list[int]]:
  """`<|im_start|>role\\ncontent<|im_end|>\\n` with its loss mask (1 = token is a training target)."""
  nl = tok._encode_ordinary("\n")
  head = [tok.special["im_start"], *tok._encode_ordinary(role), *nl]
  if fit_paths:
    content = fit_image_paths(content, tok.image_tokens)
  body = tok.encode(content, allow_chat_specials=False)
  ids = head + body + [tok.special["im_end"]] + nl
  c = 1 if supervise_content else 0
  mask = [0] * len(head) + [c] * len(body) + [c] + [0] * len(nl)
  if official:  # finetune.py keeps <|im_start|>, <|im_end|> and the trailing "\n" of every turn.
    mask[0] = 1
    mask[len(head) + len(body)] = 1
    for j in range(len(nl)):
      mask[-1 - j] = 1
  return ids, mask


def chatml_segments(tok: Tokenizer, conversations: Any, system: str | None = DEFAULT_SYSTEM,
                    loss_on: str = "assistant", fit_paths: bool = True) -> list[tuple[list[int], list[int]]]:
  """[(ids, mask) of the system block (omitted when system is None)] + [(ids, mask) per user+assistant
  turn]. Concatenated they give `chatml_tokenize`; the pipeline drops whole trailing turns to fit."""
  if loss_on not in ("assistant", "qwen_official"):
    raise ValueError(f"loss_on must be 'assistant' or 'qwen_official', got {loss_on!r}")
  official = loss_on == "qwen_official"
  segments = []
  if system is not None:
    segments.append(_role_block(tok, "system", system, False, official, fit_paths))
  for user, assistant in as_turn_pairs(conversations):
    u_ids, u_mask = _role_block(tok, "user", user, False, official, fit_paths)
    a_ids, a_mask = _role_block(tok, "assistant", assistant, True, official, fit_paths)
    segments.append((u_ids + a_ids, u_mask + a_mask))
  return segments


def chatml_tokenize(tok: Tokenizer, conversations: Any, system: str | None = DEFAULT_SYSTEM,
                    loss_on: str = "assistant", fit_paths: bool = True) -> tuple[list[int], list[int]]:
  """Whole conversation -> (ids, loss_mask). Layout per turn: `<|im_start|>user\\nU<|im_end|>\\n
  <|im_start|>assistant\\nA<|im_end|>\\n`. loss_on="assistant": mask = A's tokens + its <|im_end|>;
  "qwen_official": additionally every turn's <|im_start|>, <|im_end|> and trailing "\\n" (finetune.py).
  The mask marks target tokens at their own positions; shift it with the ids to get label masks."""
  ids: list[int] = []
  mask: list[int] = []
  for s_ids, s_mask in chatml_segments(tok, conversations, system, loss_on, fit_paths):
    ids += s_ids
    mask += s_mask
  return ids, mask


def chat_prompt_ids(tok: Tokenizer, history: Any, query: str, system: str | None = DEFAULT_SYSTEM,
                    fit_paths: bool = True) -> list[int]:
  """Generation prompt: system block, history turns, the query, then `<|im_start|>assistant\\n`."""
  ids, _ = chatml_tokenize(tok, history or [], system, "assistant", fit_paths)
  u_ids, _ = _role_block(tok, "user", query, False, False, fit_paths)
  tail = [tok.special["im_start"], *tok._encode_ordinary("assistant"), *tok._encode_ordinary("\n")]
  return ids + u_ids + tail
