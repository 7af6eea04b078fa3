"""Smoke test of the scaling benchmark at its toy size: every sweep point runs (each in its own process with its
own fake device count) and reports well-formed figures. No speed or memory thresholds: CPU timings vary."""

from __future__ import annotations

import json
import math

import pytest

from bird_jax.benchmarks import scaling

FIGURES = ("compile_s", "step_s", "tokens_per_s", "state_mib", "step_mib", "step_mib_dev", "xla_temp_mib",
           "kib_per_token")


def test_scaling_toy_rows_cover_every_point(tmp_path):
  out = tmp_path / "scaling.json"
  result = scaling.main(["--toy", f"--json={out}"])
  plan = scaling.plan(toy=True)

  seq = [r for r in result.rows if r["sweep"] == "seq"]
  assert [r["seq_len"] for r in seq] == list(plan.seq_lens)
  assert all(r["devices"] == 1 and r["batch"] == plan.seq_batch and r["mesh"] == "1x1x1" for r in seq)

  dev = [r for r in result.rows if r["sweep"] == "devices"]
  expected = [(1, "all")] + [(n, name) for n in plan.device_counts if n > 1 for name in scaling.LAYOUTS]
  assert [(r["devices"], r["layout"]) for r in dev] == expected
  want_mesh = {"fsdp": "1x2x1", "data": "2x1x1", "tensor": "1x1x2", "all": "1x1x1"}
  for r in dev:
    assert r["seq_len"] == plan.device_seq_len and r["batch"] == plan.device_batch
    assert math.prod(int(k) for k in r["mesh"].split("x")) == r["devices"]
    assert r["mesh"] == want_mesh[r["layout"]]

  for r in result.rows:
    assert r["status"] == "ok", r
    for k in FIGURES:
      assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert r["step_mib_dev"] == pytest.approx(r["step_mib"] / r["devices"])
  # Sharding the state over 2 devices leaves each of them less of it; replicating it (data) does not.
  by_layout = {r["layout"]: r for r in dev}
  assert by_layout["fsdp"]["state_mib"] < by_layout["all"]["state_mib"]
  assert by_layout["data"]["state_mib"] == pytest.approx(by_layout["all"]["state_mib"])

  lo, hi = plan.seq_lens[0], plan.seq_lens[-1]
  for k in ("mib_per_token_fit", f"per_token_ratio_{hi}_vs_{lo}", "fsdp2_step_time_x", "tensor2_step_mib_dev_x"):
    assert math.isfinite(result.summary[k]), k
  saved = json.loads(out.read_text())
  assert saved["name"] == "scaling" and len(saved["rows"]) == len(result.rows)


def test_scaling_child_env_sets_its_own_device_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false")
  env = scaling.child_env(4)
  assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu"


def test_scaling_bad_flags_are_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    scaling.main(["--only=both"])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().startswith("error: --only=both:")
