"""Notebook API and chat CLI on the tiny official-format Qwen-VL-Chat checkpoint.

The fixture's reference.json holds the original tokenizer's input_ids and the original model's greedy tokens
for three prompts, so `ask` reproducing both proves the whole path: prompt text -> ids -> image -> model ->
decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bird_jax import api
from bird_jax.tokenizer import chat_prompt_ids

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official"
CKPT = FIXTURE / "checkpoint"
IMAGE = FIXTURE / "ct_slice.png"  # 320 x 290
ROOT = Path(__file__).resolve().parents[1]

GROUNDING_Q = "Where is the liver?"
TEXT_Q = "Describe a CT scan of the abdomen in 12 words."
# reference box (120,340),(560,780) of the 320x290 image, typed in pixels
REFERRING_Q_PX = "What is at <ref>this region</ref>[38.4, 98.6, 179.2, 226.2]?"


@pytest.fixture(scope="module")
def loaded():
  assert FIXTURE.is_dir(), f"fixture missing: {FIXTURE} (../shared must sit next to the repo; CI always has it)"
  ref = json.loads((FIXTURE / "reference.json").read_text())["prompts"]
  return api.load(CKPT), ref


def test_ask_reproduces_the_original_prompt_ids_and_greedy_tokens(loaded):
  model, ref = loaded
  # grounding: default system prompt, first turn gets "Picture 1: <img>ct_slice.png</img>\n"
  a = model.ask(str(IMAGE), GROUNDING_Q, max_new_tokens=8)
  assert a.prompt_ids == ref["grounding"]["input_ids"]
  assert a.tokens == ref["grounding"]["greedy_next8"]
  assert a.text == model.tokenizer.decode(ref["grounding"]["greedy_next8"])
  assert a.history == [(f"Picture 1: <img>ct_slice.png</img>\n{GROUNDING_Q}", a.text)]
  # referring, no system turn, box typed in pixels -> the reference's <box>(120,340),(560,780)</box>
  with Image.open(IMAGE) as im:
    pil = im.copy()
  b = model.ask(np.asarray(pil), REFERRING_Q_PX, max_new_tokens=8, system=None)
  want = ref["referring"]["input_ids"]
  img = model.tokenizer.special["img_start"]
  # an in-memory image is named "image.png" inside <img>; only those byte slots may differ from the file's
  slot = slice(want.index(img) + 1, want.index(img) + 1 + model.tokenizer.image_tokens)
  assert len(b.prompt_ids) == len(want)
  assert b.prompt_ids[: slot.start] == want[: slot.start] and b.prompt_ids[slot.stop :] == want[slot.stop :]
  assert b.tokens == ref["referring"]["greedy_next8"]
  assert b.question_boxes == [(120, 340, 560, 780)]
  # text only: no image, no Picture prefix
  c = model.ask(None, TEXT_Q, max_new_tokens=8, system=None)
  assert c.prompt_ids == ref["text"]["input_ids"]
  assert c.tokens == ref["text"]["greedy_next8"]


def test_ask_batch_equals_individual_asks(loaded):
  model, ref = loaded
  images = [IMAGE, None, IMAGE]
  questions = [GROUNDING_Q, TEXT_Q, REFERRING_Q_PX]
  batch = model.ask_batch(images, questions, max_new_tokens=8, system=None)
  alone = [model.ask(i, q, max_new_tokens=8, system=None) for i, q in zip(images, questions, strict=True)]
  assert [a.tokens for a in batch] == [a.tokens for a in alone]
  assert [a.text for a in batch] == [a.text for a in alone]
  assert [a.prompt_ids for a in batch] == [a.prompt_ids for a in alone]
  # the rows really differ (the text row is not the image rows' constant token)
  assert batch[1].tokens == ref["text"]["greedy_next8"] != batch[0].tokens
  assert batch[2].prompt_ids == ref["referring"]["input_ids"]


def test_multi_turn_puts_the_picture_in_the_first_turn_only(loaded):
  model, _ = loaded
  first = model.ask(IMAGE, GROUNDING_Q, max_new_tokens=8)
  second = model.ask(IMAGE, "And the spleen?", history=first.history, max_new_tokens=8)
  tok = model.tokenizer
  assert second.prompt_ids.count(tok.special["img_start"]) == 1
  expected_history = [(f"Picture 1: <img>ct_slice.png</img>\n{GROUNDING_Q}", first.text)]
  assert second.prompt_ids == chat_prompt_ids(tok, expected_history, "And the spleen?")
  assert second.history == expected_history + [("And the spleen?", second.text)]
  with pytest.raises(ValueError, match="no image was passed"):
    model.build_prompt(None, "and?", history=first.history)


def test_boxes_are_parsed_scaled_and_drawn():
  text = ("<ref>liver</ref><box>(100,200),(500,600)</box> and <ref>kidneys</ref><box>(600,300),(700,400)</box>"
          "<box>(750,300),(850,1200)</box><|im_end|>")
  ans = api.parse_answer(text, (320, 290), query="Where? <box>(0,0),(50,50)</box>")
  assert ans.refs == ["liver", "kidneys"]
  assert ans.boxes == [(100, 200, 500, 600), (600, 300, 700, 400), (750, 300, 850, 999)]  # clipped to 999
  assert ans.objects[0] == ("liver", (100, 200, 500, 600)) and ans.objects[2][0] == "kidneys"
  np.testing.assert_allclose(ans.boxes_px[0], (32.0, 58.0, 160.0, 174.0))
  assert ans.question_boxes == [(0, 0, 50, 50)]

  img = np.zeros((290, 320), np.uint8)  # grey-level input is accepted
  drawn = np.asarray(api.draw(img, ans, labels=False, min_size=100))
  assert drawn.shape == (290, 320, 3)
  assert tuple(drawn[100, 32]) == api.PRED_COLOUR  # left edge of the liver box (x=32 px)
  assert tuple(drawn[100, 80]) == (0, 0, 0)  # inside it: untouched
  assert tuple(drawn[5, 1]) == api.QUESTION_COLOUR  # the question's box at the top-left corner
  big = api.draw(img, ans, min_size=580)  # upscaled for viewing, boxes scale with it
  assert big.size == (640, 580) and tuple(np.asarray(big)[200, 64]) == api.PRED_COLOUR


def test_pixel_boxes_convert_to_the_grid_and_back():
  rng = np.random.default_rng(0)
  for w, h in ((320, 290), (512, 512), (97, 1013)):
    for _ in range(200):
      x1, x2 = sorted(rng.integers(0, 1000, 2))
      y1, y2 = sorted(rng.integers(0, 1000, 2))
      px = api.boxes_to_pixels([(x1, y1, x2, y2)], (w, h))[0]
      assert api.box_from_pixels((w, h), px) == f"<box>({x1},{y1}),({x2},{y2})</box>"
  # Med-GRIT rule for inclusive pixel extents xmin..xmax: x2 = floor(1000 * (xmax + 1) / W), capped at 999
  assert api.box_from_pixels((128, 128), (0, 10, 127 + 1, 20 + 1)) == "<box>(0,78),(999,164)</box>"
  assert api.box_from_pixels((100, 100), (50, 60, 10, 20)) == "<box>(100,200),(500,600)</box>"  # corners sorted
  got = api.pixel_boxes_to_grid("what is at [10, 20,30 ,40] and [1.5,2,3,4]? [1,2,3]", (100, 200))
  assert got == "what is at <box>(100,100),(300,200)</box> and <box>(15,10),(30,20)</box>? [1,2,3]"


def test_load_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a Hugging Face Qwen-VL dir"):
    api.load(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no config.json in its run folder"):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    api.load(tmp_path / "run")


def test_chat_cli_with_piped_stdin(tmp_path):
  assert FIXTURE.is_dir(), f"fixture missing: {FIXTURE} (../shared must sit next to the repo; CI always has it)"
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", XLA_FLAGS="")
  stdin = "/box 10 10 100 100\nWhat is the object at {box}?\n/reset\nWhere is the liver?\n/quit\n"
  r = subprocess.run(
    [sys.executable, "-m", "bird_jax.chat", f"--checkpoint={CKPT}", f"--image={IMAGE}", "--out", str(tmp_path / "o"),
     "--max_new_tokens", "8"],
    input=stdin, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  assert "you> What is the object at {box}?" in lines
  answers = [ln for ln in lines if ln.startswith("bird> ")]
  assert len(answers) == 2 and all(len(a) > len("bird> ") for a in answers)
  assert "<box>(31,34),(312,344)</box>" in r.stdout  # 10..100 px of 320x290 in Qwen's grid
  drawn = tmp_path / "o" / "turn_1.png"  # the question's box is drawn
  assert drawn.is_file() and str(drawn) in r.stdout
  assert not (tmp_path / "o" / "turn_2.png").exists()  # no boxes in turn 2 -> nothing drawn


def test_training_checkpoint_loads_from_its_run_folder_or_config_name(tmp_path):
  """A 1-step cpu_demo run: load(run folder) uses its saved config.json; load(flags, checkpoints/) the named
  config. Both give the same model, prompts follow the run's (empty) system prompt, and ask answers."""
  work = tmp_path / "run"
  flags = ["--config=cpu_demo", f"--config.workdir={work}", "--config.data.phantom.cases=8",
           "--config.train.steps=1", "--config.train.checkpoint_every=1", "--config.eval.at_end=false",
           "--config.train.batch_size=8", "--config.model.num_layers=1", "--config.model.vision_layers=1",
           "--config.data.curriculum.steps=0"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-m", "bird_jax.train", *flags], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  image = sorted((work / "data" / "med_grit_phantom" / "images").glob("ct_*.png"))[0]

  model = api.load(work)
  assert model.meta["step"] == 1 and model.system is None  # cpu_demo trains without a system turn
  a = model.ask(image, "Where is the liver? [0, 0, 64, 64]", max_new_tokens=8)
  tok = model.tokenizer
  assert a.prompt_ids == chat_prompt_ids(tok, [], f"Picture 1: <img>{image.name}</img>\nWhere is the liver? "
                                         "<box>(0,0),(500,500)</box>", system=None)
  assert len(a.tokens) <= 8 and a.text == tok.decode(a.tokens)

  again = api.load(flags, work / "checkpoints" / "1")
  b = again.ask(image, "Where is the liver? [0, 0, 64, 64]", max_new_tokens=8)
  assert b.tokens == a.tokens
