"""Smoke test of the train-step benchmark (the GPU check's workhorse) at a toy size: it runs the real step,
learns on its synthetic rows and reports what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_speed_runs_the_real_step_and_reports(tmp_path):
  out = tmp_path / "r.json"
  r = subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.train_step_speed", "--config=cpu_demo", "--steps=3",
                      "--warmup=1", "--config.train.batch_size=4", "--config.train.lr=3e-3",
                      "--config.train.warmup_ratio=0.0", f"--json={out}"],
                     cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["devices"] == 1 and report["batch"] == 4 and report["seq_len"] == 96
  assert report["step_s"] > 0 and report["tokens_per_s_per_device"] > 0 and report["mfu"] is None
  assert report["last_loss"] < report["first_loss"]
  assert "MFU n/a" in r.stdout


def test_train_step_speed_bad_counts_are_one_line():
  r = subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.train_step_speed", "--config=cpu_demo", "--steps=0",
                      "--warmup=x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    "error: --steps=0 --warmup=x: --steps takes a positive integer, --warmup a non-negative one")
