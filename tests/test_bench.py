"""`python -m bird_jax.bench`: each benchmark runs at toy size (figures asserted nowhere), the train benchmark's
two sides compute the same losses, the results file keeps one entry per benchmark, and the host-memory
setting the CPU trainer runs with really stops fresh page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bird_jax.bench import record
from bird_jax.benchmarks.common import BenchResult

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1").items() if k != "XLA_FLAGS"}


def _run(*args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                        timeout=timeout)


def test_train_and_decode_benchmarks_run_at_toy_size(tmp_path):
  out = tmp_path / "toy.json"
  proc = _run("-m", "bird_jax.bench", "--toy", "--only", "train,decode", f"--json={out}",
              f"--results={tmp_path / 'never.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "== train_step_vs_torch ==" in proc.stdout and "== decode_vs_transformers ==" in proc.stdout
  assert not (tmp_path / "never.json").exists()  # toy runs are never recorded
  train, decode = json.loads(out.read_text())
  sides = {r["implementation"]: r for r in train["rows"]}
  assert "bird_jax" in sides and "torch eager" in sides
  for name, row in sides.items():
    if not name.startswith("speed-up"):
      # same weights, same batch, same optimizer: the losses of every round agree (float32 noise only)
      assert row["loss Δ max"] < 1e-4, (name, row)
      assert row["step s"] > 0 and 0 < row["cpu eff"]
  assert train["summary"]["speedup_vs_torch_eager"] > 0 and train["summary"]["matmul_peak_gflops"] > 0
  assert train["shapes"]["params"] > 0 and "torch" in train["shapes"]["versions"]
  assert all(r["same tokens"] for r in decode["rows"])
  assert {r["implementation"] for r in decode["rows"]} == {"bird_jax", "transformers"}


def test_unknown_benchmark_is_a_one_line_error():
  proc = _run("-m", "bird_jax.bench", "--only", "train,nope", timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown benchmark nope; choose from train")


def test_results_file_keeps_the_latest_entry_per_benchmark(tmp_path):
  path = tmp_path / "results.json"
  for name, value in (("train_step_vs_torch", 1.0), ("data_gen", 2.0), ("train_step_vs_torch", 3.0)):
    record(path, BenchResult(name=name, shapes={"n": 1}, rows=[{"x": value}], summary={"v": value}), "cmd", 1.0)
  data = json.loads(path.read_text())
  assert sorted(data) == ["data_gen", "train_step_vs_torch"]
  assert data["train_step_vs_torch"]["summary"] == {"v": 3.0} and data["data_gen"]["rows"] == [{"x": 2.0}]
  entry = data["data_gen"]
  assert entry["command"] == "cmd" and entry["date"].endswith("UTC") and entry["commit"]
  assert "jax" in entry["machine"]


FAULTS = """
import ctypes, resource
from bird_jax.host_memory import keep_freed_memory
applied, why = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_fresh_block(n=64 * 2**20):  # 64 MiB: above glibc's largest mmap threshold
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)  # what a computation writing its temporaries does
  after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  libc.free(p)
  return after - before
faults_of_fresh_block()
print(applied, why, faults_of_fresh_block())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning")
@pytest.mark.parametrize("enabled", [True, False])
def test_host_memory_reuse_stops_page_faults_on_freed_blocks(enabled):
  env = dict(ENV, BIRD_JAX_HEAP_REUSE="1" if enabled else "0")
  proc = _run("-c", FAULTS, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, *_, faults = proc.stdout.split()
  pages = 64 * 2**20 // 4096
  if enabled:
    assert applied == "True" and int(faults) < pages // 20  # the freed block came back without touching the kernel
  else:
    assert applied == "False" and "BIRD_JAX_HEAP_REUSE=0" in proc.stdout
    assert int(faults) > pages // 2  # stock malloc: a fresh mmap, every page faulted in again
