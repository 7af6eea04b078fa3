"""Every command's bad input, run as the user runs it (`python -m ...` in a subprocess): exit status 2, no traceback,
and the last line of stderr is one line that names the file or flag and the fix. Each case fails before any heavy
work, so the whole file takes seconds (a config-reading command pays ~3 s of JAX import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "qwen_vl_tiny_official"
TRUNCATED = '[{"id": "a", "conversations": [["q", "a"]]},\n {"id": "b", "conv'  # breaks at line 2 column 14


def run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def error_line(r: subprocess.CompletedProcess) -> str:
  """Asserts exit status 2 and no traceback; returns stderr's last line."""
  out = r.stdout + r.stderr
  assert r.returncode == 2, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  lines = r.stderr.strip().splitlines()
  assert lines, out[-3000:]
  return lines[-1]


# ---- bird_jax.train / bird_jax.prepare -------------------------------------------------------------------
def test_train_with_a_corrupt_train_json(tmp_path):
  raw = tmp_path / "med_grit"
  raw.mkdir()
  (raw / "train.json").write_text(TRUNCATED)
  r = run("bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}", "--config.data.source=folder",
          f"--config.data.raw_dir={raw}")
  assert error_line(r) == (
    f"error: {raw / 'train.json'}: not valid JSON at line 2 column 14 (char 58: Unterminated string starting at); "
    "fix or regenerate it (`python -m data_gen --out DIR`), or point --config.data.raw_dir at a valid Med-GRIT "
    "folder")


def test_train_with_a_corrupt_train_json_and_a_given_tokenizer(tmp_path):
  # With data.tokenizer set no demo tokenizer is trained: the corrupt file is met by the TFDS build instead.
  assert FIXTURE.is_dir(), f"fixture missing: {FIXTURE} (../shared must sit next to the repo; CI always has it)"
  raw = tmp_path / "med_grit"
  raw.mkdir()
  (raw / "train.json").write_text(TRUNCATED)
  r = run("bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}", "--config.data.source=folder",
          f"--config.data.raw_dir={raw}", f"--config.data.tokenizer={FIXTURE / 'checkpoint'}")
  assert error_line(r) == (
    f"error: {raw / 'train.json'}: cannot read records (Unterminated string starting at: line 2 column 14 (char 58)); "
    "fix or remove the file, or point --config.data.raw_dir at a valid Med-GRIT folder")


def test_train_with_an_unknown_config_field(tmp_path):
  r = run("bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}", "--config.train.stepz=3")
  line = error_line(r)
  assert line.startswith("error: unknown config field 'train.stepz' in cpu_demo; fields under train: "), line
  assert " steps," in line
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_prepare_without_a_config():
  r = run("bird_jax.prepare")
  assert error_line(r).startswith("error: --config=NAME is required; available: cpu_crowded, cpu_demo, ")


def test_prepare_prepares_the_data_of_a_config(tmp_path):
  # The counterpart of the error above: `python -m bird_jax.prepare` does the work (it used to exit 0 doing nothing).
  from bird_jax.data.tiny_dataset import write_tiny_med_grit

  raw = tmp_path / "med_grit"
  write_tiny_med_grit(raw, n_train=4, n_test_per_task=1)
  work = tmp_path / "w"
  r = run("bird_jax.prepare", "--config=cpu_demo", f"--config.workdir={work}", "--config.data.source=folder",
          f"--config.data.raw_dir={raw}")
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert f"TFDS data_dir    {work / 'tfds'} (med_grit/generated)" in r.stdout
  built = work / "tfds" / "med_grit" / "generated" / "1.0.0"
  assert sorted(p.name for p in built.glob("*.array_record*")) == [
    "med_grit-test.array_record-00000-of-00001", "med_grit-train.array_record-00000-of-00001"]
  assert (work / "tokenizer" / "tokenizer.json").is_file()


# ---- bird_jax.chat ---------------------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path) -> Path:
  from PIL import Image

  path = tmp_path / "slice.png"
  Image.new("RGB", (16, 12)).save(path)
  return path


def test_chat_with_a_missing_image(tmp_path):
  missing = tmp_path / "nope.png"
  r = run("bird_jax.chat", f"--checkpoint={tmp_path / 'ckpt'}", f"--image={missing}")
  assert error_line(r) == (f"error: image {missing} does not exist; pass a path to a PNG/JPEG, a PIL image or a "
                           "uint8 array")


def test_chat_with_a_missing_checkpoint(tmp_path, image):
  missing = tmp_path / "ckpt"
  r = run("bird_jax.chat", f"--checkpoint={missing}", f"--image={image}")
  line = error_line(r)
  assert line.startswith(f"error: {missing}: not a Hugging Face Qwen-VL dir (config.json) nor a training "
                         "run/checkpoint folder"), line


@pytest.mark.parametrize("flag", ["--image", "--checkpoint"])
def test_chat_without_a_required_flag(tmp_path, image, flag):
  given = {"--image": f"--image={image}", "--checkpoint": f"--checkpoint={tmp_path}"}
  r = run("bird_jax.chat", *(v for k, v in given.items() if k != flag))
  assert error_line(r) == f"python -m bird_jax.chat: error: the following arguments are required: {flag}"


# ---- bird_jax.export -------------------------------------------------------------------------------------
def test_export_without_a_checkpoint(tmp_path):
  work = tmp_path / "run"
  r = run("bird_jax.export", "--config=cpu_demo", f"--config.workdir={work}", f"--out={tmp_path / 'hf'}")
  assert error_line(r) == (f"error: checkpoint folder {work / 'checkpoints'} does not exist; pass "
                           "<workdir>/checkpoints or a step in it")
  assert not (tmp_path / "hf").exists()


# ---- bird_jax.eval ---------------------------------------------------------------------------------------
def test_eval_with_missing_predictions(tmp_path):
  missing = tmp_path / "preds.jsonl"
  r = run("bird_jax.eval", f"--predictions={missing}")
  assert error_line(r) == (f"error: predictions file {missing} does not exist; pass --predictions=FILE.jsonl (one "
                           "JSON object per line: id, image, annotation, response)")


def test_eval_with_corrupt_predictions(tmp_path):
  preds = tmp_path / "preds.jsonl"
  good = {"id": "ct_00--A--b--c", "image": "x.png", "annotation": "yes", "response": "yes", "task": "RO"}
  preds.write_text(json.dumps(good) + "\n" + '{"id": "ct_00--A--b--d", "respo\n')
  r = run("bird_jax.eval", f"--predictions={preds}")
  line = error_line(r)
  assert line.startswith(f"error: {preds}:2: not valid JSON (") and line.endswith("; write one JSON object per line")
  assert not (tmp_path / "preds_scores").exists()


# ---- data_gen --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,expected", [
  ("msd", "error: {root}/dataset.json not found; --root must be the MSD dataset folder (the one holding "
          "dataset.json, imagesTr/, labelsTr/)"),
  ("png_folder", "error: {root}/images not found; expected images/, masks/<stem>/ or labels/ (see "
                 "data_gen/sources/png_folder.py)"),
  ("sam_med2d", "error: SA-Med2D root {root} is not a folder; pass the SAMed2Dv1/ or data_demo/ folder"),
], ids=["msd", "png_folder", "sam_med2d"])
def test_data_gen_with_a_bad_root(tmp_path, source, expected):
  root = tmp_path / "no_such_dataset"
  r = run("data_gen", "--source", source, "--root", str(root), "--out", str(tmp_path / "out"))
  assert error_line(r) == expected.format(root=root)
  assert not (tmp_path / "out").exists()


def test_data_gen_without_a_root(tmp_path):
  r = run("data_gen", "--source", "msd", "--out", str(tmp_path / "out"))
  assert error_line(r) == "error: --source msd needs --root DIR (the folder holding dataset.json)"


# ---- tfds build (bird_jax.data.tfds_cli, the project's `tfds` console script) ----------------------------
def test_tfds_build_with_a_missing_manual_dir(tmp_path):
  missing = tmp_path / "no_such_folder"
  r = run("bird_jax.data.tfds_cli", "build", "med_grit", "--data_dir", str(tmp_path / "tfds"),
          "--manual_dir", str(missing))
  assert error_line(r) == (f"tfds build: error: --manual_dir {missing} does not exist or is empty; pass the folder "
                           "holding the Med-GRIT files, see the instructions above")
  assert 'config "generated": pass --manual_dir=' in r.stderr  # the instructions are there, above it


def test_tfds_build_with_a_corrupt_train_json(tmp_path):
  raw = tmp_path / "med_grit"
  raw.mkdir()
  (raw / "train.json").write_text(TRUNCATED)
  r = run("bird_jax.data.tfds_cli", "build", "med_grit", "--data_dir", str(tmp_path / "tfds"),
          "--manual_dir", str(raw))
  assert error_line(r) == (f"tfds build: error: {raw / 'train.json'}: cannot read records (Unterminated string "
                           "starting at: line 2 column 14 (char 58)); fix or remove the file")
