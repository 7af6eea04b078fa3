"""The commands a user types: config resolution errors, and the whole demo end to end on a tiny setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bird_jax.config_util import ConfigError, available_configs, get_config, parse_config_flags

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_config_loads_and_validates():
  names = available_configs()
  assert {"cpu_demo", "cpu_crowded", "tpu_v4", "tpu_v5e", "tpu_v5p", "gpu_h100", "gpu_h200", "tpu_v5p_lora",
          "gpu_lora"} <= set(names)
  from bird_jax.model import QwenVLConfig

  for name in names:
    c = get_config(name)
    QwenVLConfig(**c.model.to_dict())  # every model block is a valid model config
    assert c.train.batch_size % c.train.grad_accum == 0, name


def test_overrides_are_typed_and_unknown_names_fail_with_one_line():
  c, name, rest = parse_config_flags(["--config=cpu_demo", "--config.train.steps=7", "--config.train.lr=0.5",
                                      "--config.data.packing=true", "--config.mesh.shape=(2,-1,1)", "--other"])
  got = (name, c.train.steps, c.train.lr, c.data.packing, tuple(c.mesh.shape))
  assert got == ("cpu_demo", 7, 0.5, True, (2, -1, 1))
  assert rest == ["--other"]
  with pytest.raises(ConfigError, match="unknown config 'nope'; available: cpu_crowded, cpu_demo, "):
    parse_config_flags(["--config=nope"])
  with pytest.raises(ConfigError, match=r"unknown config field 'train\.stepz'.*fields under train: .*steps"):
    parse_config_flags(["--config=cpu_demo", "--config.train.stepz=3"])
  with pytest.raises(ConfigError, match="bad value"):
    parse_config_flags(["--config=cpu_demo", "--config.train.steps=many"])


def test_train_command_reports_config_errors_in_one_line(tmp_path):
  r = run(["-m", "bird_jax.train", "--config=cpu_dem"], cwd=tmp_path)
  assert r.returncode == 2
  expected = f"error: unknown config 'cpu_dem'; available: {', '.join(available_configs())}"
  assert r.stderr.strip().splitlines() == [expected]


def test_curriculum_without_a_first_stage_folder_is_a_one_line_error(tmp_path):
  (tmp_path / "mine").mkdir()
  r = run(["-m", "bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}",
           "--config.data.source=folder", f"--config.data.raw_dir={tmp_path / 'mine'}"], cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"error: Med-GRIT folder {tmp_path / 'mine'} is empty; generate it with `python -m data_gen --out "
    f"{tmp_path / 'mine'}` or fix --config.data.raw_dir"], r.stderr[-2000:]
  r = run(["-m", "bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}",
           "--config.data.source=folder", f"--config.data.raw_dir={tmp_path / 'gone'}"], cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"error: Med-GRIT folder {tmp_path / 'gone'} does not exist; generate it with `python -m data_gen --out "
    f"{tmp_path / 'gone'}` or fix --config.data.raw_dir"], r.stderr[-2000:]
  # cpu_crowded trains a first stage: with a folder source it needs a folder for it too
  (tmp_path / "mine" / "train.json").write_text("[]")
  r = run(["-m", "bird_jax.train", "--config=cpu_crowded", f"--config.workdir={tmp_path / 'w'}",
           "--config.data.source=folder", f"--config.data.raw_dir={tmp_path / 'mine'}"], cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
    "error: data.curriculum.steps=600 needs a first-stage folder when data.source is not phantom: add "
    "--config.data.curriculum.raw_dir=DIR, or --config.data.curriculum.steps=0"]
  missing = tmp_path / "no_such_folder"
  r = run(["-m", "bird_jax.train", "--config=cpu_crowded", f"--config.workdir={tmp_path / 'w'}",
           "--config.data.source=folder", f"--config.data.raw_dir={tmp_path / 'mine'}",
           f"--config.data.curriculum.raw_dir={missing}"], cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"error: curriculum folder {missing} does not exist; fix --config.data.curriculum.raw_dir"]
  r = run(["-m", "bird_jax.train", "--config=cpu_demo", f"--config.workdir={tmp_path / 'w'}",
           "--config.data.curriculum.keep=1.0"], cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    "error: data.curriculum.keep=1.0: use a fraction in [0, 1)"]


def test_a_phantom_set_made_with_other_settings_is_refused_not_reused(tmp_path):
  from bird_jax.prepare import ensure_curriculum_dataset, ensure_raw_dataset

  config = get_config("cpu_crowded")  # the set with a first stage
  config.data.phantom.cases, config.data.phantom.slices = 2, 1
  raw = ensure_curriculum_dataset(config, tmp_path)
  made = (raw / "manifest.json").stat().st_mtime_ns
  assert ensure_curriculum_dataset(config, tmp_path) == raw  # same settings: reused as it is
  assert (raw / "manifest.json").stat().st_mtime_ns == made
  config.data.phantom.curriculum.task_weights = "VG=1,RO=1"
  with pytest.raises(ConfigError, match=r"^\S+med_grit_phantom_curriculum holds a phantom set made with other "
                                        r"settings \(task_weights differ\); use a new --config.workdir"):
    ensure_curriculum_dataset(config, tmp_path)
  ensure_raw_dataset(config, tmp_path)
  config.data.phantom.objects, config.data.phantom.slices = "1,2", 2
  with pytest.raises(ConfigError, match=r"\((slices_per_case|min_objects|max_objects)(, (slices_per_case|"
                                        r"min_objects|max_objects)){2} differ\)"):
    ensure_raw_dataset(config, tmp_path)
  config.data.phantom.objects, config.data.phantom.slices = "", 0
  config.data.phantom.layout, config.data.phantom.texture = "anatomical", 30.0
  with pytest.raises(ConfigError, match=r"[(,] ?layout, home_jitter, texture_amplitude differ\)"):
    ensure_raw_dataset(config, tmp_path)
  config.data.phantom.layout, config.data.phantom.texture, config.data.phantom.palette = "random", 0.0, "hue"
  with pytest.raises(ConfigError, match=r"[(,] ?palette differ\)"):
    ensure_raw_dataset(config, tmp_path)
  config.data.phantom.palette = "rainbow"
  with pytest.raises(ConfigError, match=r"^data.phantom: phantom palette 'rainbow' is unknown; use one of "
                                        r"grey, hue$"):
    ensure_raw_dataset(config, tmp_path)
  config.data.phantom.palette, config.data.phantom.size = "grey", "0.5,0.25"
  with pytest.raises(ConfigError, match=r"^data.phantom: structure size 0.5,0.25: need 0.02 <= MIN <= MAX"):
    ensure_raw_dataset(config, tmp_path)


@pytest.mark.slow
def test_demo_command_end_to_end_then_resume_then_eval(tmp_path):
  work = tmp_path / "demo"
  small = ["--config=cpu_demo", f"--config.workdir={work}", "--config.data.phantom.cases=8",
           "--config.data.phantom.slices=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
           "--config.eval.max_examples=6", "--config.eval.batch_size=8", "--config.eval.max_new_tokens=24",
           "--config.train.batch_size=8", "--config.data.curriculum.steps=2"]
  # Run from another directory: config names resolve from the installed package.
  r = run(["-m", "bird_jax.train", *small, "--config.train.steps=3"], cwd=tmp_path)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "VG recall@0.5 on held-out cases" in r.stdout and "RO accuracy on held-out cases" in r.stdout
  summary = json.loads((work / "summary.json").read_text())
  assert summary["steps"] == 3 and set(summary["eval"]) == {"VG", "RO"}
  # next to the constant baselines, the class prior (reads the question, not the image) is scored and saved
  assert {"model", "baseline", "class_prior"} <= set(summary["eval"]["VG"])
  assert 0.0 <= summary["eval"]["RO"]["class_prior"]["accuracy"] <= 1.0
  assert (work / "eval" / "baseline_class_prior" / "metrics.json").is_file()
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
  assert (work / "tfds" / "med_grit" / "generated" / "1.0.0").is_dir()
  main_set = json.loads((work / "data" / "med_grit_phantom" / "manifest.json").read_text())["params"]
  assert main_set["source_params"]["slices_per_case"] == 2 and main_set["source_params"]["num_cases"] == 8
  # the demo's set (docs/demo_findings.md): one coloured structure per image, boxes 0.25-0.5 of the side, VG/ROC
  assert main_set["source_params"]["min_objects"] == main_set["source_params"]["max_objects"] == 1
  assert main_set["source_params"]["palette"] == "hue" and main_set["source_params"]["min_frac"] == 0.25
  assert main_set["task_weights"] == {"VG": 0.5, "RO": 0.5}
  # Steps 1-2 read the curriculum set: one structure per image, VG only, its own seed (no held-out layouts).
  first = json.loads((work / "data" / "med_grit_phantom_curriculum" / "manifest.json").read_text())["params"]
  assert first["source_params"]["min_objects"] == first["source_params"]["max_objects"] == 1
  assert first["task_weights"] == {"VG": 1.0} and first["seed"] == 1
  assert (work / "tfds_curriculum" / "med_grit" / "generated" / "1.0.0").is_dir()
  assert "step 2: curriculum stage done" in r.stdout
  preds = (work / "eval" / "predictions_VG.jsonl").read_text().splitlines()
  assert len(preds) == 6 and {"id", "question", "annotation", "response"} <= set(json.loads(preds[0]))
  metrics = json.loads((work / "eval" / "metrics.json").read_text())["results"]
  assert 0.0 <= metrics["VG"]["mean_official"]["recall@0.5"] <= 1.0
  losses = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in losses] == [1, 2, 3] and [m["data"] for m in losses] == ["first", "first", "main"]
  # every log line carries step time, tokens/s per device and achieved TFLOP/s; MFU needs a known peak (not CPU)
  for m in losses:
    assert m["step_time_s"] > 0 and m["tokens_per_s_per_device"] > 0 and m["tflops_per_device"] > 0
    assert "mfu" not in m
  assert "MFU n/a" in r.stdout + r.stderr

  # Same command with more steps resumes from step 3 instead of starting over; with eval.every it scores
  # held-out questions during training (step 4 only: the last step is the final evaluation's, off here).
  # With data.curriculum.keep=0.5 every other main-stage step still reads the first-stage set (step 4 here).
  r = run(["-m", "bird_jax.train", *small, "--config.train.steps=5", "--config.eval.at_end=false",
           "--config.eval.every=2", "--config.eval.every_max_examples=2", "--config.data.curriculum.keep=0.5"],
          cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "at step 3" in r.stdout
  losses = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in losses] == [1, 2, 3, 4, 5]
  assert [m["data"] for m in losses] == ["first", "first", "main", "first", "main"]
  curve = [json.loads(line) for line in (work / "eval_curve.jsonl").read_text().splitlines()]
  assert [c["step"] for c in curve] == [4] and set(curve[0]) == {"step", "VG", "RO"}
  assert 0.0 <= curve[0]["VG"]["recall@0.5"] <= 1.0 and 0.0 <= curve[0]["RO"]["accuracy"] <= 1.0
  assert len((work / "eval" / "step_4" / "predictions_RO.jsonl").read_text().splitlines()) == 2
  assert "step 4 held-out: VG recall@0.5" in r.stdout + r.stderr
  assert json.loads((work / "summary.json").read_text())["eval_curve"] == curve

  # The eval command restores the newest checkpoint and scores it.
  r = run(["-m", "bird_jax.eval", "--config=cpu_demo", *small[1:], f"--checkpoint={work / 'checkpoints'}",
           f"--out={tmp_path / 'ev'}"], cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "recall@0.5" in r.stdout and (tmp_path / "ev" / "metrics.json").exists()

  # Export the run as a Hugging Face directory: the weights, config and tokenizer `init_from` reads back.
  out = tmp_path / "hf"
  r = run(["-m", "bird_jax.export", "--config=cpu_demo", *small[1:], f"--out={out}"], cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  import dataclasses

  import jax
  import numpy as np

  from bird_jax.model.convert import load_pretrained
  from bird_jax.run_state import load_checkpoint
  from bird_jax.tokenizer import load_tokenizer

  config, _, _ = parse_config_flags(small)
  model, params, tok, *_ = load_checkpoint(config, work / "checkpoints")
  cfg, exported = load_pretrained(out)
  assert dataclasses.replace(cfg, resampler_init="local") == model.config  # the init is not a weight
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(exported))
  text = "<ref>liver</ref><box>(12,345),(678,999)</box>"
  assert load_tokenizer(out / "tokenizer.json").encode(text) == tok.encode(text)
  r = run(["-m", "bird_jax.export", "--config=cpu_demo", *small[1:], f"--out={out}"], cwd=tmp_path)
  assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
