"""Notebook API: load a Qwen-VL(-Chat) or BiRD checkpoint and ask grounded questions about images.

  from bird_jax import api
  model = api.load("/ckpt/Qwen-VL-Chat")                      # Hugging Face checkpoint dir (safetensors)
  model = api.load("cpu_demo", "runs/cpu_demo/checkpoints")   # training config name + checkpoint folder
  model = api.load("runs/cpu_demo/checkpoints")               # a run folder: its saved config.json is used
  ans = model.ask("ct.png", "Where is the liver?")
  ans.text, ans.boxes, ans.boxes_px, ans.refs                 # boxes in [0,1000), boxes_px in image pixels
  ans = model.ask("ct.png", "What is at [40, 98, 180, 226]?", history=ans.history)   # pixel box -> <box>
  api.draw("ct.png", ans).save("liver.png")

Prompts follow Qwen-VL's chat: ChatML with the model's system prompt, and the first turn of a conversation
starts with `Picture 1: <img>NAME</img>\\n` (NAME = the file's basename; the model overwrites those slots with
image features, so the name never changes an answer). Every `<img>` in the conversation gets the image passed
to `ask`. Boxes in questions are `<box>(x1,y1),(x2,y2)</box>` in Qwen's [0,1000) grid, or `[x1, y1, x2, y2]`
in pixels of the image (converted with `box_from_pixels`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bird_jax.data.image import preprocess_image, to_pil_rgb
from bird_jax.metrics import parse_boxes
from bird_jax.tokenizer import DEFAULT_SYSTEM, Tokenizer, as_turn_pairs, chat_prompt_ids

ImageInput = str | os.PathLike | Image.Image | np.ndarray | None
IntBox = tuple[int, int, int, int]
PixelBox = tuple[float, float, float, float]

# `[x1, y1, x2, y2]` typed by a user in pixels (ints or decimals, optional spaces).
_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
PIXEL_BOX_PATTERN = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_TAG_PATTERN = re.compile(r"<ref>(.*?)</ref>|<box>.*?</box>", re.DOTALL)
_USE_MODEL_SYSTEM = object()

PRED_COLOUR = (230, 20, 20)
QUESTION_COLOUR = (0, 200, 0)


# ------------------------------------------------------------------------------------------- boxes


def box_from_pixels(image_size: tuple[int, int], box: Sequence[float]) -> str:
  """Pixel corners (x1, y1, x2, y2) of an image of size (W, H) -> `<box>(x1,y1),(x2,y2)</box>` in [0,1000).

  x2/y2 are exclusive corners (PIL/numpy slicing), so a box of inclusive pixel extents xmin..xmax is
  (xmin, ..., xmax + 1, ...) and converts exactly like the Med-GRIT data: floor(1000 * x / W), capped at 999.
  Inverse of `Answer.boxes_px` (x * W / 1000) up to flooring."""
  w, h = image_size
  if len(box) != 4:
    raise ValueError(f"a box needs 4 numbers x1, y1, x2, y2; got {list(box)}")
  x1, x2 = sorted((float(box[0]), float(box[2])))
  y1, y2 = sorted((float(box[1]), float(box[3])))

  def grid(v: float, size: int) -> int:
    # the epsilon undoes float error of a value that came from g * size / 1000
    return min(999, max(0, math.floor(1000.0 * v / size + 1e-6)))

  return f"<box>({grid(x1, w)},{grid(y1, h)}),({grid(x2, w)},{grid(y2, h)})</box>"


def pixel_boxes_to_grid(text: str, image_size: tuple[int, int]) -> str:
  """Rewrites every `[x1, y1, x2, y2]` (pixels) in text as a `<box>` in Qwen's [0,1000) grid."""
  return PIXEL_BOX_PATTERN.sub(lambda m: box_from_pixels(image_size, [float(g) for g in m.groups()]), text)


def _grid_box(b: Sequence[float]) -> IntBox:
  x1, y1, x2, y2 = (min(999, max(0, int(round(v)))) for v in b)
  return (x1, y1, x2, y2)


def grounded_objects(text: str) -> list[tuple[str | None, IntBox]]:
  """(phrase, box) for every `<box>` in text; a box belongs to the last `<ref>` before it (None if none).
  Unparsable boxes are skipped; coordinates are rounded and clipped to [0, 999]."""
  out: list[tuple[str | None, IntBox]] = []
  ref: str | None = None
  for m in _TAG_PATTERN.finditer(text):
    if m.group(1) is not None:
      ref = m.group(1).strip()
      continue
    parsed = parse_boxes(m.group(0), fallback=False)
    if parsed and parsed[0] is not None:
      out.append((ref, _grid_box(parsed[0])))
  return out


def boxes_to_pixels(boxes: Sequence[Sequence[float]], image_size: tuple[int, int]) -> list[PixelBox]:
  w, h = image_size
  return [(b[0] * w / 1000, b[1] * h / 1000, b[2] * w / 1000, b[3] * h / 1000) for b in boxes]


# ------------------------------------------------------------------------------------------- answers


@dataclass
class Answer:
  text: str  # decoded answer, tags (<ref>, <box>) kept, stop token removed
  boxes: list[IntBox]  # every <box> of the answer, Qwen grid [0, 1000)
  boxes_px: list[PixelBox]  # the same in pixels of the image (x * W / 1000); [] without an image
  refs: list[str]  # the <ref> phrases, in order
  history: list[tuple[str, str]]  # conversation including this turn; pass it to the next ask()
  objects: list[tuple[str | None, IntBox]] = field(default_factory=list)  # (phrase, box) pairs
  question_boxes: list[IntBox] = field(default_factory=list)  # boxes the question referred to (grid)
  tokens: list[int] = field(default_factory=list, repr=False)  # generated ids (without the stop id)
  prompt_ids: list[int] = field(default_factory=list, repr=False)
  image_size: tuple[int, int] | None = None  # (W, H)

  def __str__(self) -> str:
    return self.text


def parse_answer(text: str, image_size: tuple[int, int] | None = None, *, query: str = "",
                 history: Sequence[tuple[str, str]] = (), tokens: Sequence[int] = (),
                 prompt_ids: Sequence[int] = ()) -> Answer:
  """An Answer from a decoded reply: boxes/refs parsed, boxes scaled to the (W, H) image, history extended
  with (query, text)."""
  objects = grounded_objects(text)
  boxes = [b for _, b in objects]
  return Answer(
    text=text,
    boxes=boxes,
    boxes_px=boxes_to_pixels(boxes, image_size) if image_size else [],
    refs=[m.strip() for m in re.findall(r"<ref>(.*?)</ref>", text, re.DOTALL)],
    history=list(history) + [(query, text)],
    objects=objects,
    question_boxes=[b for _, b in grounded_objects(query)],
    tokens=list(tokens),
    prompt_ids=list(prompt_ids),
    image_size=image_size,
  )


@dataclass
class Prompt:
  ids: list[int]
  pixel_values: np.ndarray | None  # [N, S, S, 3]: one copy of the image per <img> of the conversation
  query: str  # the user turn as sent (with the Picture prefix on a first turn)
  history: list[tuple[str, str]]
  image_size: tuple[int, int] | None


def open_image(image: ImageInput) -> tuple[Image.Image | None, str]:
  """(RGB PIL image or None, the name used in the prompt: the basename of a path, else "image.png")."""
  if image is None:
    return None, ""
  if isinstance(image, str | os.PathLike):
    path = Path(image)
    if not path.is_file():
      raise FileNotFoundError(f"image {path} does not exist; pass a path to a PNG/JPEG, a PIL image or a uint8 array")
    with Image.open(path) as f:
      return to_pil_rgb(f), path.name
  return to_pil_rgb(image), "image.png"


def draw(image: ImageInput, answer: Answer, *, show_question_boxes: bool = True, min_size: int = 320,
         labels: bool = True) -> Image.Image:
  """Copy of the image (upscaled to at least min_size px on its short side) with the answer's boxes in red,
  labelled with their <ref> phrase, and the boxes the question referred to in green."""
  im, _ = open_image(image)
  if im is None:
    raise ValueError("draw needs the image the question was asked about")
  if min(im.size) < min_size:
    f = min_size / min(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.NEAREST)
  d = ImageDraw.Draw(im)
  width = max(2, min(im.size) // 160)
  objects = answer.objects or [(None, b) for b in answer.boxes]
  layers = [(objects, PRED_COLOUR, width)]
  if show_question_boxes:
    layers.append(([(None, b) for b in answer.question_boxes], QUESTION_COLOUR, width))
  for objs, colour, wd in layers:
    for ref, b in objs:
      x1, y1, x2, y2 = boxes_to_pixels([b], im.size)[0]
      d.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=wd)
      if labels and ref:
        tx, ty = min(x1, x2) + wd, max(0, min(y1, y2) - 12)
        bbox = d.textbbox((tx, ty), ref)
        d.rectangle(bbox, fill=colour)
        d.text((tx, ty), ref, fill=(255, 255, 255))
  return im


# ------------------------------------------------------------------------------------------- model


@dataclass
class BirdModel:
  """A loaded model plus its tokenizer; `ask`, `ask_batch` and `draw` are the whole interface."""

  model: Any  # bird_jax.model.QwenVL
  params: Any
  tokenizer: Tokenizer
  system: str | None = DEFAULT_SYSTEM  # None: no system turn (what the model was trained with)
  mesh: Any = None
  rules: Any = None
  source: str = ""
  meta: dict[str, Any] = field(default_factory=dict)

  @property
  def config(self) -> Any:
    return self.model.config

  @property
  def stop_ids(self) -> list[int]:
    s = self.tokenizer.special
    # Qwen's chat() stops at <|im_end|> and <|im_start|>; <|endoftext|> ends a base-model continuation.
    return [s["im_end"], s["im_start"], s["endoftext"]]

  def build_prompt(self, image: ImageInput, question: str, *, history: Any = None, system: Any = _USE_MODEL_SYSTEM,
                   pixel_boxes: bool = True) -> Prompt:
    """The ids and pixels `ask` sends to the model (exposed to inspect or to batch by hand)."""
    pil, name = open_image(image)
    size = pil.size if pil is not None else None
    hist = [(u, a) for u, a in as_turn_pairs(history or [])]
    if pixel_boxes and size is not None:
      question = pixel_boxes_to_grid(question, size)
    query = question
    if pil is not None and not any("<img>" in u for u, _ in hist):
      query = f"Picture 1: <img>{name}</img>\n{question}"
    ids = chat_prompt_ids(self.tokenizer, hist, query, system=self.system if system is _USE_MODEL_SYSTEM else system)
    n_images = ids.count(self.tokenizer.special["img_start"])
    pixels = None
    if n_images:
      if pil is None:
        raise ValueError("the conversation holds <img> turns but no image was passed; pass the image to ask()")
      one = preprocess_image(pil, self.config.image_size)
      pixels = np.repeat(one[None], n_images, axis=0)
    return Prompt(ids, pixels, query, hist, size)

  def ask(self, image: ImageInput, question: str, *, history: Any = None, max_new_tokens: int = 80,
          temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
          system: Any = _USE_MODEL_SYSTEM, pixel_boxes: bool = True) -> Answer:
    """One question about `image` (a path, PIL image, uint8 array, or None for text only). temperature 0 =
    greedy. history: `Answer.history` of the previous turn (or [(user, assistant), ...])."""
    return self.ask_batch([image], [question], histories=[history], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system,
                          pixel_boxes=pixel_boxes)[0]

  def ask_batch(self, images: Sequence[ImageInput], questions: Sequence[str], *,
                histories: Sequence[Any] | None = None, max_new_tokens: int = 80, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0, system: Any = _USE_MODEL_SYSTEM,
                pixel_boxes: bool = True) -> list[Answer]:
    """Several independent questions decoded together in one batched generate call. Each row's answer is
    the one `ask` would give alone (padding is masked per row)."""
    import jax

    from bird_jax.generate import generate

    if len(images) != len(questions):
      raise ValueError(f"ask_batch: {len(images)} images but {len(questions)} questions")
    histories = list(histories) if histories is not None else [None] * len(questions)
    if len(histories) != len(questions):
      raise ValueError(f"ask_batch: {len(histories)} histories but {len(questions)} questions")
    if not questions:
      return []
    prompts = [self.build_prompt(img, q, history=h, system=system, pixel_boxes=pixel_boxes)
               for img, q, h in zip(images, questions, histories, strict=True)]
    n_max = max(0 if p.pixel_values is None else len(p.pixel_values) for p in prompts)
    pixels = None
    if n_max:
      s = self.config.image_size
      pixels = np.zeros((len(prompts), n_max, s, s, 3), np.float32)
      for i, p in enumerate(prompts):
        if p.pixel_values is not None:
          pixels[i, :len(p.pixel_values)] = p.pixel_values
    new_tokens = generate(self.model, self.params, [p.ids for p in prompts], pixels, max_new_tokens=max_new_tokens,
                          stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id, temperature=temperature,
                          top_k=top_k, top_p=top_p, rng=jax.random.key(seed), mesh=self.mesh, rules=self.rules)
    return [self._answer(p, toks) for p, toks in zip(prompts, new_tokens, strict=True)]

  def _answer(self, prompt: Prompt, tokens: list[int]) -> Answer:
    return parse_answer(self.tokenizer.decode(tokens), prompt.image_size, query=prompt.query,
                        history=prompt.history, tokens=tokens, prompt_ids=prompt.ids)

  def draw(self, image: ImageInput, answer: Answer, **kwargs: Any) -> Image.Image:
    return draw(image, answer, **kwargs)


# ------------------------------------------------------------------------------------------- loading


def _is_hf_checkpoint(path: Path) -> bool:
  cfg = path / "config.json"
  if not cfg.is_file():
    return False
  try:
    data = json.loads(cfg.read_text())
  except json.JSONDecodeError:
    return False
  return "visual" in data or data.get("model_type") == "qwen"


def _checkpoint_folder(path: Path) -> Path:
  """A run folder -> its checkpoints/ folder; checkpoints/ or checkpoints/<step> unchanged."""
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _run_dir(ckpt: Path) -> Path | None:
  for p in (ckpt, ckpt.parent):
    if p.name == "checkpoints":
      return p.parent
  return None


def _training_config(config: Any, run_dir: Path | None, ckpt: Path) -> Any:
  import ml_collections

  from bird_jax.config_util import get_config, parse_config_flags

  if config is None:
    saved = run_dir / "config.json" if run_dir else None
    if saved is None or not saved.is_file():
      raise FileNotFoundError(f"{ckpt}: no config.json in its run folder; pass the training config name too, "
                              "e.g. load('cpu_demo', checkpoint)")
    config = ml_collections.ConfigDict(json.loads(saved.read_text()))
    with config.mesh.ignore_type():
      config.mesh.shape = tuple(config.mesh.shape)
  elif isinstance(config, list | tuple):  # command-line flags: ["--config=NAME", "--config.a.b=v", ...]
    config = parse_config_flags(list(config))[0]
  elif isinstance(config, str):
    config = parse_config_flags(shlex.split(config))[0] if config.startswith("--config") else get_config(config)
  else:
    config = ml_collections.ConfigDict(config.to_dict()) if hasattr(config, "to_dict") else config
  if run_dir is not None:
    # the checkpoint's own run folder holds the tokenizer and data it was trained with
    config.workdir = str(run_dir)
  return config


def load(path_or_config: Any, checkpoint: str | os.PathLike | None = None, *,
         dtype: str | None = "float32") -> BirdModel:
  """A Hugging Face Qwen-VL(-Chat) dir (config.json + safetensors/bin + qwen.tiktoken), or a training checkpoint:
  load(config, checkpoint) with config a name in configs/ (a ConfigDict, or --config flags as a list or string),
  or load(run_or_checkpoint_folder) which uses the run's saved config.json. dtype: compute dtype (None: the
  training config's)."""
  if checkpoint is None and isinstance(path_or_config, str | os.PathLike):
    path = Path(path_or_config)
    if _is_hf_checkpoint(path):
      return _load_hf(path, dtype or "float32")
    if path.is_dir():
      return _load_training(None, path, dtype)
    raise FileNotFoundError(f"{path}: not a Hugging Face Qwen-VL dir (config.json) nor a training run/checkpoint "
                            "folder; for a training checkpoint call load(config_name, checkpoint_folder)")
  if checkpoint is None:
    raise ValueError("load(config) needs the checkpoint folder too: load(config, checkpoint)")
  if _is_hf_checkpoint(Path(checkpoint)):
    return _load_hf(Path(checkpoint), dtype or "float32")
  return _load_training(path_or_config, Path(checkpoint), dtype)


def _load_hf(path: Path, dtype: str) -> BirdModel:
  from bird_jax.model import QwenVL
  from bird_jax.model.convert import load_pretrained
  from bird_jax.tokenizer import load_tokenizer

  if not (path / "qwen.tiktoken").is_file():
    raise FileNotFoundError(f"{path}: no qwen.tiktoken; copy the tokenizer files of the Qwen-VL release next to "
                            "the weights")
  cfg, params = load_pretrained(path, dtype=dtype)
  tok = load_tokenizer(path)
  if tok.special["img_start"] != cfg.image_start_id:
    raise ValueError(f"{path}: tokenizer <img> id {tok.special['img_start']} != config image_start_id "
                     f"{cfg.image_start_id}")
  return BirdModel(QwenVL(cfg), params, tok, system=DEFAULT_SYSTEM, source=str(path))


def _load_training(config: Any, checkpoint: Path, dtype: str | None) -> BirdModel:
  from bird_jax import sharding as shd
  from bird_jax.run_state import load_checkpoint

  ckpt = _checkpoint_folder(checkpoint.absolute())
  if not ckpt.is_dir():
    raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist; pass <workdir>/checkpoints or a step in it")
  config = _training_config(config, _run_dir(ckpt), ckpt)
  if dtype is not None:
    config.model.dtype = dtype
  model, params, tok, _, mesh, meta = load_checkpoint(config, ckpt)
  return BirdModel(model, params, tok, system=config.data.system_prompt or None, mesh=mesh,
                   rules=shd.rules_from_config(config.mesh.rules), source=str(ckpt), meta=dict(meta))
