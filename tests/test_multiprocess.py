"""The multi-host path with real processes: 2 JAX processes × 4 fake CPU devices on 127.0.0.1 (gloo) train
the same tiny model as one process with 8 devices, each process feeding only its own half of the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import portpicker
import pytest

WORKER = textwrap.dedent("""
  import json, os, sys
  import numpy as np
  import jax
  if os.environ.get("BIRD_COORDINATOR"):
    jax.distributed.initialize(os.environ["BIRD_COORDINATOR"], int(os.environ["BIRD_NUM_PROCESSES"]),
                               int(os.environ["BIRD_PROCESS_ID"]))
  sys.path.insert(0, os.environ["TESTS_DIR"])
  from test_train import fixed_batch, setup, train_config
  from bird_jax.checkpoint import Checkpointer
  from bird_jax.train import to_global

  full = fixed_batch(batch=8)
  n, i = jax.process_count(), jax.process_index()
  local = {k: v[i * 8 // n:(i + 1) * 8 // n] for k, v in full.items()}  # this process's rows only
  mesh, state, step, shardings = setup((2, 2, 2), jax.devices(), train_config())
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, metrics = step(state, to_global(local, mesh))
      losses.append(float(metrics["loss"]))
  ckpt = Checkpointer(os.environ["CKPT_DIR"])
  ckpt.save(3, state, data_state={"process_count": n}, meta={"scan_layers": False})
  ckpt.close()
  print("RESULT", json.dumps({"process": i, "losses": losses}), flush=True)
""")


def _launch(n_proc: int, devices_per_proc: int, tmp_path: Path, tag: str, worker: str = WORKER) -> list[dict]:
  port = portpicker.pick_unused_port()
  script = tmp_path / f"worker_{tag}.py"
  script.write_text(worker)
  procs = []
  for i in range(n_proc):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
               TESTS_DIR=str(Path(__file__).parent), CKPT_DIR=str(tmp_path / f"ckpt_{tag}"))
    if n_proc > 1:
      env.update(BIRD_COORDINATOR=f"127.0.0.1:{port}", BIRD_NUM_PROCESSES=str(n_proc), BIRD_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
  return results


CLOCK_WORKER = textwrap.dedent("""
  import json, os
  import jax
  jax.distributed.initialize(os.environ["BIRD_COORDINATOR"], int(os.environ["BIRD_NUM_PROCESSES"]),
                             int(os.environ["BIRD_PROCESS_ID"]))
  from bird_jax.train import agree_on_clock

  i = jax.process_index()
  # each process's own clock says something else; every process must act on process 0's reading
  got = [agree_on_clock(step, 2, i == 0, i == 1) for step in (1, 2, 3, 4)]
  print("RESULT", json.dumps({"process": i, "got": got}), flush=True)
""")


def test_clock_decisions_are_process_0s_on_every_process(tmp_path):
  """train.max_minutes / checkpoint_minutes: both processes save and stop at the same steps (a checkpoint only
  one process saves hangs the run): process 0's flags at logged steps (log_every 2), none between."""
  results = _launch(2, 1, tmp_path, "clock", worker=CLOCK_WORKER)
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    assert r["got"] == [[False, False], [True, False], [False, False], [True, False]]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  two = _launch(2, 4, tmp_path, "two")
  one = _launch(1, 8, tmp_path, "one")
  assert sorted(r["process"] for r in two) == [0, 1]
  assert two[0]["losses"] == two[1]["losses"]  # every process sees the same global loss
  assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5, abs=1e-5)
  assert two[0]["losses"][-1] < two[0]["losses"][0]
  assert (tmp_path / "ckpt_two" / "3").is_dir()  # one checkpoint written jointly by both processes
