"""Smoke test of the input-pipeline benchmark at its toy size: it builds its phantom set, runs the real Grain
training stream with 0 and 1 workers and reports well-formed, self-consistent figures (no speed thresholds).
In a subprocess, as `python -m`, because it starts Grain worker processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bird_jax.benchmarks.input_pipeline import HOSTS

ROOT = Path(__file__).resolve().parents[1]


def test_input_pipeline_toy_reports_consistent_figures(tmp_path):
  out = tmp_path / "r.json"
  r = subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.input_pipeline", "--toy", f"--json={out}"],
                     cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "== input_pipeline ==" in r.stdout and "summary:" in r.stdout
  res = json.loads(out.read_text())
  assert set(res) == {"name", "shapes", "rows", "summary", "notes"} and res["name"] == "input_pipeline"
  seq = res["shapes"]["seq_len"]
  assert (seq, res["shapes"]["image_size"]) == (256, 64)

  rows = res["rows"]
  assert [row["workers"] for row in rows] == [0, 1]
  for row in rows:
    for key in ("samples_per_s", "rows_per_s", "tokens_per_s", "tokens_per_s_per_core", "samples_per_row", "fill",
                "first_batch_s"):
      assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert math.isclose(row["tokens_per_s"], row["rows_per_s"] * seq, rel_tol=1e-9)
    assert math.isclose(row["tokens_per_s_per_core"], row["tokens_per_s"] / max(1, row["workers"]), rel_tol=1e-9)
    assert row["samples_per_row"] >= 1 and 0 < row["fill"] <= 1
    if row["cpu_busy"] is not None:
      assert row["cpu_busy"] > 0 and row["tok_per_cpu_s"] > 0

  s = res["summary"]
  assert s["tokens_per_s_per_core"] == min(row["tokens_per_s_per_core"] for row in rows if row["workers"] > 0)
  assert 1e10 < s["flops_per_token"] < 1e12  # ~6 x 9.6B parameters, plus attention and the image towers
  factors = []
  for host in HOSTS:
    key = host.name.lower().replace(" ", "_")
    chip, factor = s[f"chip_tokens_per_s_{key}"], s[f"factor_{key}"]
    assert math.isfinite(chip) and chip > 0 and math.isfinite(factor) and factor > 0
    assert math.isclose(factor, s["tokens_per_s_per_core"] * host.vcpus / (chip * host.chips), rel_tol=1e-9)
    factors.append(factor)
  assert {h.name for h in HOSTS} == {"TPU v4", "TPU v5e", "TPU v5p", "8x H100"}
  assert s["min_factor"] == min(factors)
  assert s["meets_goal"] == (s["min_factor"] >= 10) and s["goal"] == ">= 10x per host"
  assert any(n.startswith("versions: ") for n in res["notes"])
