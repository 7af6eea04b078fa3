"""Med-GRIT task templates: per-object facts -> VG / RO / GC / MII question-answer pairs and records.

Questions vary in phrasing (several templates each); answers are canonical so a small model can learn them
and the caption metrics compare like with like:
  VG  "<ref>{name}</ref><box>(x1,y1),(x2,y2)</box>[<box>..</box>...]"  (all boxes of that class on the image)
  RO  "{name}"                                                          (plain lower-case class name)
  GC  one sentence built from the object's facts (size, shape, position, contrast)
  MII a paragraph: modality (+ plane when known) and every object's facts.
The facts come from the mask and the saved image only (plus a phantom's known shape), never from an LLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_gen.boxes import Box, format_box, format_ref_boxes, normalize_box
from data_gen.sources.base import modality_from_id

TASKS: tuple[str, ...] = ("VG", "RO", "GC", "MII")

VG_QUESTIONS = (
  "Where is the {name} in the image?",
  "Where is the {name} located in the image?",
  "Please locate the {name} in this image.",
  "Can you find the {name} in this image?",
  "Show the location of the {name}.",
  "Identify the position of the {name} in the image.",
  "Where can the {name} be seen?",
  "Give the bounding box of the {name}.",
)
RO_QUESTIONS = (
  "What is the object at {box}?",
  "What anatomical structure is present at {box}?",
  "What is shown in the region {box}?",
  "Which structure is located at {box}?",
  "Identify the object in {box}.",
  "What does the region {box} contain?",
)
GC_QUESTIONS = (
  "Describe the region {box}.",
  "Can you describe the content within {box}?",
  "Can you describe the visual features of the area {box}?",
  "What can you tell me about the region {box}?",
  "Please describe what is in {box}.",
)
MII_QUESTIONS = (
  "What can you interpret from the overall image?",
  "Please provide an interpretation from this image.",
  "Describe this image.",
  "What does this image show?",
  "Give an overall description of the image.",
)
MII_MAX_DETAILS = 4
QUESTIONS = {"VG": VG_QUESTIONS, "RO": RO_QUESTIONS, "GC": GC_QUESTIONS, "MII": MII_QUESTIONS}
# How often each task type opens a turn in a training conversation (renormalised over what is available).
TASK_WEIGHTS = {"VG": 0.35, "RO": 0.3, "GC": 0.2, "MII": 0.15}

MODALITY_WORDS = {
  "ct": "CT", "mr": "MR", "x": "X-ray", "pet": "PET", "endoscopy": "endoscopic",
  "dermoscopy": "dermoscopic", "fundus": "fundus", "ultrasound": "ultrasound",
}
SHAPE_WORDS = {
  "ellipse": "oval", "rectangle": "rectangular", "ring": "ring-shaped", "triangle": "triangular",
  "diamond": "diamond-shaped", "cross": "cross-shaped",
}


def image_prefix(image_id: str) -> str:
  return f"Picture 1: <img>images/{image_id}.png</img>\n"


@dataclasses.dataclass
class ObjectFacts:
  """One groundable object: one connected component of one instance (JSON-friendly)."""

  name: str
  box: Box  # contract box in [0, 1000)
  pixel_box: tuple[int, int, int, int]  # inclusive pixel extents on the saved image
  area_frac: float  # object pixels / image pixels
  size: str
  shape: str
  position: str
  contrast: str


@dataclasses.dataclass
class ImageFacts:
  image_id: str
  case_id: str
  modality: str
  width: int
  height: int
  plane: str | None
  objects: list[ObjectFacts]

  def groups(self) -> dict[str, list[Box]]:
    """class name -> all its boxes, in reading order (the VG answer lists them in this order)."""
    out: dict[str, list[Box]] = {}
    for o in sorted(self.objects, key=lambda o: (o.box[1], o.box[0])):
      out.setdefault(o.name, []).append(tuple(o.box))  # type: ignore[arg-type]
    return out

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ImageFacts:
    objs = [ObjectFacts(**{**o, "box": tuple(o["box"]), "pixel_box": tuple(o["pixel_box"])})
            for o in d["objects"]]
    return cls(**{**d, "objects": objs})


# ---- facts ---------------------------------------------------------------------------------------------
def _position(box: Box) -> str:
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  row = "upper" if cy < 333 else ("lower" if cy >= 667 else "center")
  col = "left" if cx < 333 else ("right" if cx >= 667 else "center")
  if row == col == "center":
    return "center"
  if row == "center":
    return f"center {col}"
  return f"{row} {col}"


def _size(box: Box) -> str:
  frac = (box[2] - box[0]) * (box[3] - box[1]) / 1e6
  return "small" if frac < 0.02 else ("medium-sized" if frac < 0.08 else "large")


def _shape(meta_shape: str | None, pixel_box: tuple[int, int, int, int], area: int) -> str:
  if meta_shape in SHAPE_WORDS:
    return SHAPE_WORDS[meta_shape]
  w = pixel_box[2] - pixel_box[0] + 1
  h = pixel_box[3] - pixel_box[1] + 1
  if max(w, h) >= 2.5 * min(w, h):
    return "elongated"
  return "irregular" if area < 0.5 * w * h else "compact"


def _gray(image: np.ndarray) -> np.ndarray:
  if image.ndim == 3:
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return image.astype(np.float32)


def _contrast(gray: np.ndarray, mask: np.ndarray, pb: tuple[int, int, int, int]) -> str:
  """Object mean vs a ring of pixels around its box (excluding the object)."""
  h, w = gray.shape
  pad = max(2, (pb[2] - pb[0] + pb[3] - pb[1]) // 8)
  y0, y1 = max(0, pb[1] - pad), min(h, pb[3] + 1 + pad)
  x0, x1 = max(0, pb[0] - pad), min(w, pb[2] + 1 + pad)
  g, m = gray[y0:y1, x0:x1], mask[y0:y1, x0:x1]
  inside = g[m]
  outside = g[~m]
  if inside.size == 0 or outside.size == 0:
    return "similar in intensity to"
  d = float(inside.mean() - outside.mean())
  return "brighter than" if d > 12 else ("darker than" if d < -12 else "similar in intensity to")


def object_facts(name: str, mask: np.ndarray, image: np.ndarray, pixel_boxes: list[tuple[int, int, int, int]],
                 meta_shape: str | None = None, gray: np.ndarray | None = None) -> list[ObjectFacts]:
  """Facts for each component box of one instance mask (pixel_boxes from boxes.mask_to_pixel_boxes)."""
  h, w = mask.shape
  gray = _gray(image) if gray is None else gray
  out = []
  for pb in pixel_boxes:
    crop = mask[pb[1]:pb[3] + 1, pb[0]:pb[2] + 1]
    area = int(crop.sum())
    box = normalize_box(pb, w, h)
    out.append(ObjectFacts(
      name=name, box=box, pixel_box=tuple(int(v) for v in pb), area_frac=round(area / (h * w), 6),
      size=_size(box), shape=_shape(meta_shape, pb, area), position=_position(box),
      contrast=_contrast(gray, mask, pb),
    ))
  return out


# ---- answers -------------------------------------------------------------------------------------------
def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" or word.startswith(("MR", "X-ray")) else "a"


def gc_answer(o: ObjectFacts) -> str:
  return (f"This region contains the {o.name}, {_article(o.size)} {o.size} {o.shape} structure in the "
          f"{o.position} of the image that appears {o.contrast} the surrounding tissue.")


def mii_answer(f: ImageFacts) -> str:
  mod = MODALITY_WORDS.get(f.modality, f.modality)
  head = f"{f.plane} {mod}" if f.plane else mod
  names = list(f.groups())
  if len(names) == 1:
    listed = f"the {names[0]}"
  else:
    listed = ", ".join(f"the {n}" for n in names[:-1]) + f" and the {names[-1]}"
  n = len(f.objects)
  parts = [f"This is {_article(head)} {head} image. It shows {n} labelled structure{'s' if n != 1 else ''}: "
           f"{listed}."]
  # Detail only the largest few: real slices carry 15+ masks, and BiRD decodes MII with max_new_tokens=100.
  largest = sorted(f.objects, key=lambda o: -o.area_frac)[:MII_MAX_DETAILS]
  for o in sorted(largest, key=lambda o: (o.box[1], o.box[0])):
    parts.append(f"The {o.name} is {_article(o.size)} {o.size} {o.shape} region in the {o.position}, "
                 f"{o.contrast} the surrounding tissue.")
  return " ".join(parts)


def make_qa(task: str, facts: ImageFacts, target: Any, rng: np.random.Generator) -> tuple[str, str]:
  """One (question, answer). target: a class name for VG, an object index for RO/GC, None for MII."""
  template = QUESTIONS[task][int(rng.integers(len(QUESTIONS[task])))]
  if task == "VG":
    return template.format(name=target), format_ref_boxes(target, facts.groups()[target])
  if task == "RO":
    o = facts.objects[target]
    return template.format(box=format_box(o.box)), o.name
  if task == "GC":
    o = facts.objects[target]
    return template.format(box=format_box(o.box)), gc_answer(o)
  if task == "MII":
    return template, mii_answer(facts)
  raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def _pool(facts: ImageFacts) -> dict[str, list[Any]]:
  objs = list(range(len(facts.objects)))
  return {"VG": list(facts.groups()), "RO": list(objs), "GC": list(objs), "MII": [None]}


def conversation(facts: ImageFacts, n_turns: int, rng: np.random.Generator,
                 task_weights: dict[str, float] | None = None) -> tuple[list[list[str]], str]:
  """A multi-turn conversation of up to n_turns distinct (task, target) pairs; returns (turns, task field).
  Each turn's task is drawn with `task_weights` (default TASK_WEIGHTS) among tasks with targets left.

  A structure is asked about once: after a VG, RO or GC turn has put its name next to its box, no later turn
  asks for either (its answer would be a copy of the earlier turn, which teaches copying, not grounding; the
  test questions are single turns)."""
  weights = TASK_WEIGHTS if task_weights is None else task_weights
  pool = {t: targets for t, targets in _pool(facts).items() if weights.get(t, 0) > 0}
  subject = lambda t, x: x if t == "VG" else (None if t == "MII" else facts.objects[x].name)
  turns: list[list[str]] = []
  used: list[str] = []
  for _ in range(n_turns):
    avail = [t for t in TASKS if pool.get(t)]
    if not avail:
      break
    p = np.array([weights[t] for t in avail])
    task = avail[int(rng.choice(len(avail), p=p / p.sum()))]
    target = pool[task].pop(int(rng.integers(len(pool[task]))))
    turns.append(list(make_qa(task, facts, target, rng)))
    used.append(task)
    told = subject(task, target)
    if told is not None:
      pool = {t: [x for x in xs if subject(t, x) != told] for t, xs in pool.items()}
  turns[0][0] = image_prefix(facts.image_id) + turns[0][0]
  kind = used[0] if len(set(used)) == 1 else "mixed"
  return turns, kind


def parse_task_weights(text: str) -> dict[str, float]:
  """"VG=0.45,RO=0.35,GC=0.1,MII=0.1" -> weights (ROC is read as RO); tasks left out get 0."""
  weights: dict[str, float] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    task, sep, value = part.partition("=")
    task = task.strip().upper()
    task = "RO" if task == "ROC" else task  # the paper's name for RO
    if not sep or task not in TASKS:
      raise ValueError(f"task weight {part!r}: use TASK=WEIGHT with TASK in {', '.join(TASKS)}")
    weights[task] = float(value)
  if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
    raise ValueError(f"task weights {text!r} must be non-negative with a positive sum")
  return weights


def one_turn(facts: ImageFacts, task: str, rng: np.random.Generator) -> list[list[str]]:
  """The "OneConv" test form: one question of `task` about a random target."""
  targets = _pool(facts)[task]
  target = targets[int(rng.integers(len(targets)))]
  q, a = make_qa(task, facts, target, rng)
  return [[image_prefix(facts.image_id) + q, a]]


def record(facts: ImageFacts, conversations: list[list[str]], task: str) -> dict[str, Any]:
  return {"id": facts.image_id, "conversations": conversations, "task": task, "case_id": facts.case_id}


def modality_of(rec: dict[str, Any]) -> str:
  return modality_from_id(str(rec.get("id", "")))


def classify_turn(question: str, answer: str) -> str:
  """Which task a (question, answer) pair is, from its form (works for any Med-GRIT-style folder)."""
  if "<box>" in answer:
    return "VG"
  if "<box>" in question:
    return "RO" if len(answer.split()) <= 6 and not answer.rstrip().endswith(".") else "GC"
  return "MII"
