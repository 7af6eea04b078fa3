"""Checks LLM output against the image's masks before anything is written.

Rules (each failure has a reason string; stage.py counts them as "<stage>: <reason>"):
  * tags: only <ref>, </ref>, <box>, </box> may appear; every <box> must be the strict contract form
    `<box>(x1,y1),(x2,y2)</box>` (integers, no spaces) and every <ref> closed -> "malformed box"/"malformed ref"/
    "unexpected tag";
  * every box, in questions and answers, must equal a real instance box of this image -> "invented box";
  * every <ref> name must be a label of this image -> "unknown name";
  * in answers, `<ref>name</ref><box>..</box>..` must list boxes of that name ("box does not belong to the
    name") and all of them ("incomplete grounding"); a box outside a <ref> group -> "box without ref";
  * a question about one box answered without boxes must name a structure at that box -> "answer does not
    name the structure at the box" (catches a model that misreads which box is which);
  * conversations: strict JSON `{"turns": [{"user": str, "assistant": str}, ...]}` with 1..max_turns turns
    -> "malformed JSON" / "turn structure"; plain-text fields must carry no tags -> "tags in plain text".
A single code fence around the JSON (```json ... ```) is tolerated; anything else around it is not.
"""

from __future__ import annotations

import json
import re
from typing import Any

from data_gen.boxes import Box, parse_boxes
from data_gen.llm.prompts import OVERALL_MAX_WORDS
from data_gen.tasks import ImageFacts

MAX_TEXT_CHARS = 2000
BOX_RE = re.compile(r"<box>\((\d{1,3}),(\d{1,3})\),\((\d{1,3}),(\d{1,3})\)</box>")
REF_RE = re.compile(r"<ref>([^<>]*)</ref>")
GROUP_RE = re.compile(r"<ref>([^<>]*)</ref>((?:<box>\(\d{1,3},\d{1,3}\),\(\d{1,3},\d{1,3}\)</box>)*)")
TAG_RE = re.compile(r"</?([A-Za-z_][A-Za-z0-9_]*)[^<>]*>")
ALLOWED_TAGS = frozenset({"ref", "box"})
FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


class Known:
  """What the masks say about one image: names, their boxes, and who lives at each box."""

  def __init__(self, facts: ImageFacts) -> None:
    self.boxes_of: dict[str, set[Box]] = {}
    self.names_at: dict[Box, set[str]] = {}
    for o in facts.objects:
      b = tuple(int(v) for v in o.box)
      self.boxes_of.setdefault(o.name.lower(), set()).add(b)  # type: ignore[arg-type]
      self.names_at.setdefault(b, set()).add(o.name.lower())  # type: ignore[arg-type]


def _norm(name: str) -> str:
  return " ".join(name.split()).lower()


def _mentions(text: str, name: str) -> bool:
  return re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", text.lower()) is not None


def check_tags(text: str) -> str | None:
  """Grammar only (no facts): a reason, or None."""
  for m in TAG_RE.finditer(text):
    if m.group(1).lower() not in ALLOWED_TAGS:
      return "unexpected tag"
  if text.count("<box>") != len(BOX_RE.findall(text)) or text.count("</box>") != text.count("<box>"):
    return "malformed box"
  if text.count("<ref>") != len(REF_RE.findall(text)) or text.count("</ref>") != text.count("<ref>"):
    return "malformed ref"
  return None


def check_text(text: str, known: Known, *, answer: bool) -> str | None:
  """Tags, boxes and names of one question (answer=False) or answer (answer=True)."""
  why = check_tags(text)
  if why:
    return why
  for b in parse_boxes(text):
    if b not in known.names_at:
      return "invented box"
  for name in REF_RE.findall(text):
    if _norm(name) not in known.boxes_of:
      return "unknown name"
  if answer:
    grouped = 0
    for m in GROUP_RE.finditer(text):
      boxes = set(parse_boxes(m.group(2)))
      grouped += len(parse_boxes(m.group(2)))
      if not boxes:
        continue  # a bare <ref>name</ref> mention: the name was checked above
      truth = known.boxes_of[_norm(m.group(1))]
      if not boxes <= truth:
        return "box does not belong to the name"
      if boxes != truth:
        return "incomplete grounding"
    if grouped != len(parse_boxes(text)):
      return "box without ref"
  return None


def check_plain(text: Any, *, max_chars: int = MAX_TEXT_CHARS) -> tuple[str | None, str | None]:
  """A plain-text field (description, overall answer) -> (clean text, None) or (None, reason)."""
  if not isinstance(text, str) or not text.strip():
    return None, "empty"
  text = " ".join(text.split())
  if len(text) > max_chars:
    return None, "too long"
  if "<" in text and TAG_RE.search(text):
    return None, "tags in plain text"
  if text.startswith(("{", "[", "```")):
    return None, "not plain text"
  return text, None


def parse_json_object(content: str) -> tuple[dict[str, Any] | None, str | None]:
  s = content.strip()
  m = FENCE_RE.match(s)
  if m:
    s = m.group(1).strip()
  try:
    obj = json.loads(s)
  except json.JSONDecodeError:
    return None, "malformed JSON"
  if not isinstance(obj, dict):
    return None, "malformed JSON"
  return obj, None


def check_description(content: str, facts: ImageFacts) -> tuple[str | None, str | None]:
  """Stage (a): a plain paragraph. It only feeds the later prompts, but a bad one would poison them."""
  return check_plain(content)


def check_regions(content: str, facts: ImageFacts) -> tuple[dict[Box, str], str | None, list[str]]:
  """Stage (b) -> ({box: description}, overall answer or None, [reasons for every refused item])."""
  obj, why = parse_json_object(content)
  if obj is None:
    return {}, None, [why or "malformed JSON"]
  regions, overall = obj.get("regions"), obj.get("overall")
  if not isinstance(regions, list) or set(obj) - {"regions", "overall"}:
    return {}, None, ["wrong structure"]
  known = Known(facts)
  out: dict[Box, str] = {}
  reasons: list[str] = []
  for r in regions:
    if not isinstance(r, dict) or not isinstance(r.get("box"), str) or set(r) != {"box", "description"}:
      reasons.append("wrong structure")
      continue
    box_text = r["box"].strip()
    if not box_text.startswith("<box>"):
      box_text = f"<box>{box_text}</box>"
    boxes = parse_boxes(box_text)
    if len(boxes) != 1 or BOX_RE.fullmatch(box_text) is None:
      reasons.append("malformed box")
      continue
    box = boxes[0]
    if box not in known.names_at:
      reasons.append("invented box")
      continue
    text, why = check_plain(r["description"])
    if text is None:
      reasons.append(why or "empty")
      continue
    if not any(_mentions(text, n) for n in known.names_at[box]):
      reasons.append("description does not name the structure at the box")
      continue
    out.setdefault(box, text)
  ov, why = check_plain(overall)
  if ov is not None and len(ov.split()) > 2 * OVERALL_MAX_WORDS:  # some slack: refuse rambling, not a long sentence
    ov, why = None, "too long"
  if ov is None:
    reasons.append(f"overall {why}")
  return out, ov, reasons


def check_conversation(content: str, facts: ImageFacts, max_turns: int
                       ) -> tuple[list[list[str]] | None, str | None]:
  """Stage (c) -> ([[user, assistant], ...], None) or (None, reason). One bad turn refuses the conversation."""
  obj, why = parse_json_object(content)
  if obj is None:
    return None, why
  turns = obj.get("turns")
  if set(obj) != {"turns"} or not isinstance(turns, list) or not 1 <= len(turns) <= max_turns:
    return None, "turn structure"
  known = Known(facts)
  out: list[list[str]] = []
  said: set[tuple[int, ...]] = set()  # boxes of earlier turns: asking about them again is answered by copying
  for t in turns:
    if (not isinstance(t, dict) or set(t) != {"user", "assistant"}
        or not all(isinstance(t[k], str) and t[k].strip() for k in ("user", "assistant"))):
      return None, "turn structure"
    q, a = t["user"].strip(), t["assistant"].strip()
    if len(q) > MAX_TEXT_CHARS or len(a) > MAX_TEXT_CHARS:
      return None, "too long"
    why = check_text(q, known, answer=False) or check_text(a, known, answer=True)
    if why:
      return None, why
    q_boxes, a_boxes = parse_boxes(q), parse_boxes(a)
    boxes = {tuple(b) for b in q_boxes + a_boxes}
    if boxes & said:
      return None, "asks again about an earlier turn's structure"
    said |= boxes
    if len(q_boxes) == 1 and not a_boxes:
      if not any(_mentions(a, n) for n in known.names_at[q_boxes[0]]):
        return None, "answer does not name the structure at the box"
    out.append([q, a])
  return out, None
