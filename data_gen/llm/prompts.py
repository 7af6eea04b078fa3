"""Prompts for the three Med-GRIT generation stages (BiRD paper, Sec. "Generation pipeline"):

  (a) description   instance facts (modality, plane, structures, boxes) -> a global description (plain text)
  (b) regions       facts + description -> RC/GC region descriptions and the MIA/MII whole-image answer (JSON)
  (c) conversation  facts + description -> a multi-turn refer/ground conversation (strict JSON)

The model never sees the image: it gets the facts data_gen measured on the masks (name, box, size, shape,
position, intensity) and is told to copy names and boxes verbatim, so verify.py can hold every box it writes
to a real instance box. The paper's own prompts were not released; these follow its stage structure and the
BiRD demo answers ("This region contains the lumbar vertebra, ...", "The CT image in the coronal plane ...").

Each user message starts with a "Task: ..." line naming its stage; the facts follow as one JSON object.
"""

from __future__ import annotations

import json
from typing import Any

from data_gen.boxes import format_box
from data_gen.tasks import MODALITY_WORDS, ImageFacts

PROMPT_VERSION = "1"  # bump when a prompt changes: it is part of the dataset params (and of every cache key)
STAGES = ("description", "regions", "conversation")
OVERALL_MAX_WORDS = 60  # BiRD decodes MII answers with max_new_tokens=100

SYSTEM = (
  "You are an expert in medical imaging who writes training data for a biomedical vision-language model. "
  "You cannot see the image; you are given facts measured on its segmentation masks. Use only these facts: "
  "never invent structures, findings, diagnoses, measurements or coordinates."
)
GRAMMAR = (
  "Boxes are written <box>(x1,y1),(x2,y2)</box>: integers in [0,1000) relative to the image, (x1,y1) the "
  "top-left and (x2,y2) the bottom-right corner, no spaces. A structure is grounded as "
  "<ref>name</ref><box>(x1,y1),(x2,y2)</box>, with one <box> per instance when it has several. Copy names "
  "and boxes exactly as they appear in the facts; never write a box or a name that is not in the facts."
)
STYLE_REGION = (
  "A region description is one or two sentences that name the structure in the region (e.g. \"This region "
  "contains the {name}, ...\") and say what the facts give: its size, shape, position and intensity "
  "relative to the surrounding tissue."
)
STYLE_OVERALL = (
  f"A whole-image interpretation (at most {OVERALL_MAX_WORDS} words) names the modality and plane and the "
  "visible structures and where they lie."
)


def facts_json(f: ImageFacts) -> str:
  """The facts block: what the model may say, nothing else (no file name, no dataset name)."""
  objs = sorted(f.objects, key=lambda o: (o.box[1], o.box[0], o.name))
  d: dict[str, Any] = {
    "modality": MODALITY_WORDS.get(f.modality, f.modality),
    "plane": f.plane,
    "image_size": f"{f.width}x{f.height} pixels",
    "structures": [
      {"name": o.name, "box": format_box(o.box), "size": o.size, "shape": o.shape, "position": o.position,
       "intensity": f"{o.contrast} the surrounding tissue", "area_percent": round(100 * o.area_frac, 2)}
      for o in objs
    ],
  }
  return json.dumps(d, ensure_ascii=False, indent=1)


def _messages(user: str) -> list[dict[str, str]]:
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def description_messages(f: ImageFacts) -> list[dict[str, str]]:
  """Stage (a): the global description the later stages build on."""
  return _messages(
    "Task: global description.\n"
    f"Facts:\n{facts_json(f)}\n\n"
    "Write a global description of this image in one paragraph of 3 to 6 sentences: the modality and plane, "
    "which structures are visible, and where they lie relative to each other. Plain text only: no boxes, "
    "no <ref> tags, no lists, no JSON."
  )


def regions_messages(f: ImageFacts, description: str) -> list[dict[str, str]]:
  """Stage (b): one description per box (the RC/GC answers) and the overall answer (MIA/MII)."""
  return _messages(
    "Task: region descriptions.\n"
    f"Facts:\n{facts_json(f)}\n\n"
    f"Global description:\n{description}\n\n"
    f"{GRAMMAR}\n{STYLE_REGION}\n{STYLE_OVERALL}\n\n"
    'Return only a JSON object {"regions": [{"box": "<box>(x1,y1),(x2,y2)</box>", "description": "..."}], '
    '"overall": "..."} with one entry in "regions" for every structure in the facts, its "box" copied exactly; '
    'descriptions and "overall" are plain text without tags. "overall" answers "What can you interpret from '
    'the overall image?".'
  )


def conversation_messages(f: ImageFacts, description: str, n_turns: int, variant: int) -> list[dict[str, str]]:
  """Stage (c): a refer/ground conversation of n_turns turns (variant k: the k-th one for this image)."""
  other = "" if variant == 0 else (f" This is conversation number {variant + 1} about this image: choose other "
                                   "structures or other kinds of turns than an obvious first conversation would.")
  return _messages(
    "Task: conversation.\n"
    f"Facts:\n{facts_json(f)}\n\n"
    f"Global description:\n{description}\n\n"
    f"{GRAMMAR}\n\n"
    f"Write a conversation of {n_turns} turn{'s' if n_turns != 1 else ''} between a user who looks at this "
    "image and an assistant. Each turn is one of:\n"
    "- grounding: the user names a structure; the assistant answers with <ref>name</ref> followed by the "
    "boxes of every instance of that structure;\n"
    "- referring: the user gives one box and asks what it shows; the assistant answers with the structure's "
    "name;\n"
    f"- region description: the user gives one box and asks about it; the assistant describes it. {STYLE_REGION}"
    "\n"
    f"- whole-image interpretation: no boxes. {STYLE_OVERALL}\n"
    "Ask about each structure at most once (a later turn must not be answerable by copying an earlier "
    "one). Vary the phrasing, do not repeat a question, do not mention files or this list of facts, and do not "
    f"write any box outside <ref>..</ref> in the assistant's answers.{other}\n\n"
    'Return only a JSON object {"turns": [{"user": "...", "assistant": "..."}, ...]}.'
  )
