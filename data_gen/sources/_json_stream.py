"""Stream the members of one top-level JSON object, one (key, value) pair at a time, in bounded memory.

SA-Med2D-20M's `SAMed2D_v1.json` is a single object of ~3.7M image -> [masks] members (several GB): `json.load`
would hold all of it, twice over while parsing. `iter_json_object` reads the file in binary chunks, decodes them
incrementally (UTF-8; a leading BOM is allowed) and hands each member's value to the standard library's
`json.JSONDecoder.raw_decode`, so values are parsed exactly as `json.load` parses them. Only the unconsumed tail
of the buffer plus the value being read are held: memory is O(chunk size + largest value), not O(file).

Tokens may straddle chunk boundaries. When a value cannot be decoded from what is buffered, more is read and the
value is decoded again only if the failure can be a cut (an unterminated string, or an error within a few
characters of the buffer's end); any other error is a real one. A value that decodes but ends exactly at the
buffer's end is also decoded again with more data if it is a number that may go on (`12` of `1234`, or `1` of
`1.5e3` cut after `1.`). Each extra read at least doubles what is buffered past the value's start, so a long
value costs O(its length), not O(length^2).

Differences from `json.load` that streaming cannot avoid: members come out before the end of the file is
checked, so a truncated or malformed file raises *after* yielding the members before the fault; and a
duplicated key comes out twice (`json.load` keeps its last value). Errors are one-line ValueErrors naming the
file and the byte offset of the fault.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_CHUNK = 1 << 20  # 1 MiB of file per read
_WS = re.compile(r"[ \t\n\r]*")
_NUM_TAIL = re.compile(r"[0-9.eE+-]*")  # what could still extend a number cut by the buffer's end
_NEAR_END = 16  # a decode error this close to the buffer's end may be a value cut by the chunk boundary
_BOM = codecs.BOM_UTF8


class JsonStreamError(ValueError):
  """A malformed or truncated JSON object file; the message is one line: `<file>: <what> at byte <offset>`."""


class _Reader:
  """A text buffer over a binary file that knows the byte offset of every buffered character."""

  def __init__(self, f: BinaryIO, path: Path, chunk_size: int):
    self.f = f
    self.path = path
    self.chunk_size = chunk_size
    self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
    self.buf = ""
    self.pos = 0  # next unconsumed character of buf
    self.base_bytes = 0  # file offset of buf[0]
    self.bytes_read = 0
    self.eof = False
    self.first = True

  def more(self, min_chars: int = 1) -> bool:
    """Append at least min_chars more characters (fewer only at EOF), dropping the consumed prefix.

    -> False when nothing could be added (end of file)."""
    if self.pos:
      done = self.buf[:self.pos]
      self.base_bytes += len(done) if done.isascii() else len(done.encode("utf-8"))
      self.buf = self.buf[self.pos:]
      self.pos = 0
    parts = []
    got = 0
    while got < min_chars and not self.eof:
      raw = self.f.read(max(self.chunk_size, min_chars - got, len(_BOM) if self.first else 0))
      start = self.bytes_read
      self.bytes_read += len(raw)
      self.eof = not raw
      if self.first:
        self.first = False
        if raw.startswith(_BOM):
          raw = raw[len(_BOM):]
          self.base_bytes += len(_BOM)
          start += len(_BOM)
      pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the previous read
      try:
        text = self.decoder.decode(raw, final=self.eof)
      except UnicodeDecodeError as e:
        raise self.error(f"invalid UTF-8 ({e.reason})", byte=start - pending + e.start) from None
      parts.append(text)
      got += len(text)
    if not got:
      return False
    self.buf += "".join(parts)
    return True

  def byte_at(self, i: int) -> int:
    """File offset of buf[i]."""
    head = self.buf[:i]
    return self.base_bytes + (len(head) if head.isascii() else len(head.encode("utf-8")))

  def error(self, what: str, *, at: int | None = None, byte: int | None = None) -> JsonStreamError:
    if byte is None:
      byte = self.byte_at(self.pos if at is None else at)
    return JsonStreamError(f"{self.path}: {what} at byte {byte}")

  def peek(self) -> str:
    """The next non-whitespace character ('' at end of file), not consumed."""
    while True:
      i = self.pos = _WS.match(self.buf, self.pos).end()
      if i < len(self.buf):
        return self.buf[i]
      if not self.more():
        return ""

  def value(self, decoder: json.JSONDecoder, what: str) -> Any:
    """Decode the JSON value at pos (which is not whitespace) and consume it."""
    while True:
      n = len(self.buf)
      try:
        obj, end = decoder.raw_decode(self.buf, self.pos)
      except json.JSONDecodeError as e:
        if not self.eof and (e.msg.startswith("Unterminated string") or e.pos >= n - _NEAR_END):
          self.more(max(self.chunk_size, n - self.pos))
          continue
        cut = e.msg.startswith("Unterminated string") or e.pos >= n - 1
        msg = f"{e.msg} (the file ends there: truncated?)" if cut else e.msg
        raise self.error(f"malformed {what}: {msg}", at=e.pos) from None
      if not self.eof and self.buf[self.pos] in "-0123456789" and _NUM_TAIL.match(self.buf, end).end() == n:
        # a number is complete only when something that cannot continue it follows (`12` of `1234`, `1` of `1.5`)
        self.more(max(self.chunk_size, n - self.pos))
        continue
      self.pos = end
      return obj

  def expect(self, ch: str, what: str) -> None:
    got = self.peek()
    if got != ch:
      raise self.error(f"expected {what}, found {_describe(got)}")
    self.pos += 1


def _describe(ch: str) -> str:
  return "end of file" if not ch else repr(ch)


def iter_json_object(path: str | Path, *, chunk_size: int = DEFAULT_CHUNK,
                     decoder: json.JSONDecoder | None = None) -> Iterator[tuple[str, Any]]:
  """Yield the (key, value) members of the JSON object in `path`, in file order, reading it once.

  Raises JsonStreamError (a ValueError) naming the file and byte offset if the file is not a single JSON
  object; members before the fault have been yielded by then."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  path = Path(path)
  dec = decoder or json.JSONDecoder()
  with open(path, "rb") as f:
    r = _Reader(f, path, chunk_size)
    first = r.peek()
    if first != "{":
      raise r.error(f"expected a JSON object ('{{'), found {_describe(first)}")
    r.pos += 1
    ch = r.peek()
    if ch == "}":
      r.pos += 1
    else:
      while True:
        if ch != '"':
          raise r.error(f"expected a member name (a string), found {_describe(ch)}")
        key = r.value(dec, "member name")
        r.expect(":", "':' after a member name")
        if not r.peek():
          raise r.error("truncated file: expected a value")
        val = r.value(dec, f"value of {key!r}" if len(key) <= 200 else "value")
        yield key, val
        ch = r.peek()
        if ch not in (",", "}"):
          raise r.error(f"expected ',' or '}}' after a member, found {_describe(ch)}")
        r.pos += 1
        if ch == "}":
          break
        ch = r.peek()
    trailing = r.peek()
    if trailing:
      raise r.error(f"extra data after the top-level object: {_describe(trailing)}")
