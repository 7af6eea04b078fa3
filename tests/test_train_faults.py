"""The trainer's fault promises (docs/fault_tolerance.md), on real `python -m bird_jax.train` processes killed with
real signals: SIGTERM saves the current step and exits 0, the rerun resumes there; kill -9 at random moments and
during an async checkpoint write, rerun until done, gives the uninterrupted run's weights, optimizer state and
per-step losses bit for bit; a NaN loss stops with its step and keeps the last good checkpoint; a damaged newest
checkpoint is skipped with one warning; no record fitting seq_len is one line; TensorBoard event files hold the
metrics.jsonl values. A toy model (1 layer, 32 px images), data prepared once and copied per run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = [
  "--config=cpu_demo", "--config.data.source=phantom", "--config.data.phantom_cases=4",
  "--config.data.phantom_slices=1", "--config.data.worker_count=0", "--config.model.hidden_size=32",
  "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.intermediate_size=64",
  "--config.model.vision_width=32", "--config.model.vision_layers=1", "--config.model.vision_heads=2",
  "--config.model.image_size=32", "--config.model.patch_size=8", "--config.model.vision_pos_grid=4",
  "--config.model.n_queries=16", "--config.model.resampler_heads=2", "--config.train.batch_size=2",
  "--config.train.log_every=1", "--config.train.max_minutes=0.0", "--config.eval.at_end=false",
  "--config.eval.every=0", "--config.train.max_to_keep=3",
]


def env() -> dict[str, str]:
  e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device: the run of the user, not the tests'
  return e


def command(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "bird_jax.train", *TOY, f"--config.workdir={workdir}", *extra]


def run(workdir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
  where = tmp_path_factory.mktemp("prepared")
  subprocess.run([sys.executable, "-m", "bird_jax.prepare", *TOY, f"--config.workdir={where}"], cwd=ROOT, env=env(),
                 check=True, capture_output=True, timeout=300)
  return where


def fresh_workdir(prepared: Path, where: Path) -> Path:
  for name in ("data", "tokenizer", "tfds"):
    shutil.copytree(prepared / name, where / name)
  return where


def losses(workdir: Path) -> dict[int, float]:
  """step -> loss; a step logged twice (redone after a kill) must have logged the same loss both times."""
  out: dict[int, float] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    assert out.setdefault(r["step"], r["loss"]) == r["loss"], f"step {r['step']} redone with another loss"
  return out


def final_integrity(workdir: Path, step: int) -> dict:
  """The array checksums and data digest saved with `step` (Checkpointer.save): equal iff the arrays are."""
  return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["integrity"]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, f"the run ended early (rc {proc.returncode})"
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.02)


def steps_logged(workdir: Path) -> int:
  f = workdir / "metrics.jsonl"
  return len(f.read_text().splitlines()) if f.exists() else 0


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(prepared, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  proc = subprocess.Popen(command(workdir, "--config.train.steps=500", "--config.train.checkpoint_every=1000"),
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: steps_logged(workdir) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("bird-jax: SIGTERM at step ") and "rerun the same command to resume" in last
  step = int(last.split("at step ")[1].split(":")[0])
  assert step >= 3 and "Traceback" not in err
  # checkpoint_every=1000: the only checkpoint is the one SIGTERM asked for, complete (async write finished)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]
  assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
  rerun = run(workdir, f"--config.train.steps={step + 2}", "--config.train.checkpoint_every=1000")
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from {workdir / 'checkpoints'} at step {step}" in rerun.stdout
  assert sorted(losses(workdir)) == list(range(1, step + 3))


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_run_bit_for_bit(prepared, tmp_path):
  """SIGKILL twice at random moments and twice while an async checkpoint is being written (a
  `*.orbax-checkpoint-tmp*` folder exists), rerunning the same command each time, then once to the end."""
  steps = ["--config.train.steps=16", "--config.train.checkpoint_every=2"]
  ref = fresh_workdir(prepared, tmp_path / "ref")
  done = run(ref, *steps)
  assert done.returncode == 0, done.stderr[-2000:]
  workdir = fresh_workdir(prepared, tmp_path / "killed")
  rng = random.Random(0)
  ckpts = workdir / "checkpoints"
  kills = []
  for moment in ("random", "during checkpoint write", "random", "during checkpoint write"):
    proc = subprocess.Popen(command(workdir, *steps), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = steps_logged(workdir)
    if moment == "random":
      wait_for(lambda s=start: steps_logged(workdir) > s, proc)  # training (not only start-up) is under way
      time.sleep(rng.uniform(0.0, 1.0))
    else:
      wait_for(lambda: ckpts.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()), proc)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append((moment, steps_logged(workdir)))
  final = run(workdir, *steps)
  assert final.returncode == 0, final.stderr[-2000:]
  assert losses(workdir) == losses(ref) and sorted(losses(ref)) == list(range(1, 17))
  assert final_integrity(workdir, 16) == final_integrity(ref, 16), kills


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  # lr 1e30: the first update makes the weights inf, so step 2's loss is not finite
  r = run(workdir, "--config.train.steps=6", "--config.train.checkpoint_every=1", "--config.train.lr=1e30",
          "--config.train.warmup_ratio=0.0", "--config.train.schedule=constant")
  assert r.returncode == 1
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("error: loss became ") and "Traceback" not in r.stderr
  bad = int(err[-1].split("at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad and f"last good checkpoint is step {max(saved)}" in err[-1]
  assert all(json.loads(line)["loss"] < 1e30 for line in (workdir / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_older_one_and_tensorboard_matches_metrics(prepared, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  first = run(workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2")
  assert first.returncode == 0, first.stderr[-2000:]
  (workdir / "checkpoints" / "4" / "data" / "metadata").write_text("{garbage")
  again = run(workdir, "--config.train.steps=6", "--config.train.checkpoint_every=2")
  assert again.returncode == 0, again.stderr[-2000:]
  warnings = [line for line in again.stdout.splitlines() if " WARNING " in line and "checkpoint" in line]
  assert len(warnings) == 1 and "skipped damaged step(s) 4 (" in warnings[0] and "resumed from step 2" in warnings[0]
  assert (workdir / "checkpoints.damaged" / "4").is_dir() and (workdir / "checkpoints" / "6").is_dir()

  from bird_jax.metric_writer import read_events

  events = read_events(workdir / "tensorboard")
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(s, round(v, 5)) for s, v in events["train/loss"]] == [(r["step"], round(r["loss"], 5)) for r in logged]
  for tag in ("train/grad_norm", "train/learning_rate", "perf/step_time_s", "perf/tokens_per_s_per_device",
              "perf/data_wait_s"):
    assert [s for s, _ in events[tag]] == [r["step"] for r in logged], tag


def test_no_record_fitting_seq_len_is_one_line(prepared, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  r = run(workdir, "--config.train.steps=2", "--config.data.seq_len=8", timeout=120)
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no record fits data.seq_len=8: the shortest first turn")
  assert "raise --config.data.seq_len to at least" in err[0]
