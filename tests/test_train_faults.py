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
  "--config=cpu_demo", "--config.data.source=phantom", "--config.data.phantom.cases=4",
  "--config.data.phantom.slices=1", "--config.data.worker_count=0", "--config.model.hidden_size=32",
  "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.intermediate_size=64",
  "--config.model.vision_width=32", "--config.model.vision_layers=1", "--config.model.vision_heads=2",
  "--config.model.image_size=32", "--config.model.patch_size=8", "--config.model.vision_pos_grid=4",
  "--config.model.n_queries=16", "--config.model.resampler_heads=2", "--config.train.batch_size=2",
  "--config.train.log_every=1", "--config.train.max_minutes=0.0", "--config.eval.at_end=false",
  "--config.eval.every=0", "--config.train.max_to_keep=3",
]


STEPS = ["--config.train.steps=16", "--config.train.checkpoint_every=2"]


def env(cache: Path | None = None) -> dict[str, str]:
  e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device: the run of the user, not the tests'
  if cache is not None:
    # Compiled programs shared between the runs (saves most of each start-up). Not for runs that get SIGKILLed:
    # JAX writes cache entries in place, so a kill mid-write could leave a truncated one for the next run.
    e.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return e


def command(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "bird_jax.train", *TOY, f"--config.workdir={workdir}", *extra]


def run(workdir: Path, *extra: str, cache: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(cache), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
  where = tmp_path_factory.mktemp("prepared")
  subprocess.run([sys.executable, "-m", "bird_jax.prepare", *TOY, f"--config.workdir={where}"], cwd=ROOT, env=env(),
                 check=True, capture_output=True, timeout=300)
  return where


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jit_cache")


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, jit_cache) -> Path:
  """The uninterrupted 16-step run (a checkpoint every 2 steps) the interrupted ones must equal."""
  workdir = fresh_workdir(prepared, tmp_path_factory.mktemp("reference"))
  done = run(workdir, *STEPS, cache=jit_cache)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(losses(workdir)) == list(range(1, 17))
  return workdir


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


def final_integrity(workdir: Path, step: int = 16) -> dict:
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


def saved_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_run_bit_for_bit(prepared, reference, tmp_path):
  """SIGKILL once at a random moment of training and twice while an async checkpoint is being written (a
  `*.orbax-checkpoint-tmp*` folder exists), rerunning the same command each time, then once to the end."""
  workdir = fresh_workdir(prepared, tmp_path / "killed")
  rng = random.Random(0)
  ckpts = workdir / "checkpoints"
  for moment in ("random", "during checkpoint write", "during checkpoint write"):
    proc = subprocess.Popen(command(workdir, *STEPS), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = steps_logged(workdir)
    if moment == "random":
      wait_for(lambda s=start: steps_logged(workdir) > s, proc)  # training (not only start-up) is under way
      time.sleep(rng.uniform(0.0, 0.5))
    else:
      wait_for(lambda: ckpts.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()), proc)
    assert proc.poll() is None, f"{moment}: the run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  final = run(workdir, *STEPS)
  assert final.returncode == 0, final.stderr[-2000:]
  assert losses(workdir) == losses(reference)
  assert final_integrity(workdir) == final_integrity(reference)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(prepared, reference, jit_cache, tmp_path):
  """SIGTERM while the run starts up (its handler is installed before data preparation): the run trains its first
  step, saves it (though checkpoint_every is 2), exits 0 with one line; the rerun resumes at step 1 and ends with
  the reference run's weights."""
  workdir = fresh_workdir(prepared, tmp_path / "run")
  proc = subprocess.Popen(command(workdir, *STEPS), cwd=ROOT, env=env(jit_cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  log_file = workdir / "train.log"
  wait_for(lambda: log_file.exists() and " model: " in log_file.read_text(), proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-2000:]
  assert out.strip().splitlines()[-1] == (
    f"bird-jax: SIGTERM at step 1: checkpoint saved in {workdir / 'checkpoints'}; rerun the same command to resume")
  assert "Traceback" not in err and saved_steps(workdir) == [1]
  assert (workdir / "checkpoints" / "1" / "commit_success.txt").exists()  # the async write was finished
  rerun = run(workdir, *STEPS, cache=jit_cache)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from {workdir / 'checkpoints'} at step 1" in rerun.stdout
  assert losses(workdir) == losses(reference)
  assert final_integrity(workdir) == final_integrity(reference)


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_older_one(prepared, reference, jit_cache, tmp_path):
  """Step 16 of a finished run gets a garbage iterator state: the rerun warns once, sets step 16 aside, resumes at
  14 and ends with the reference run's step 16 again."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  (workdir / "checkpoints" / "16" / "data" / "metadata").write_text("{garbage")
  again = run(workdir, *STEPS, cache=jit_cache)
  assert again.returncode == 0, again.stderr[-2000:]
  warnings = [line for line in again.stdout.splitlines() if " WARNING " in line and "checkpoint" in line]
  assert len(warnings) == 1 and "skipped damaged step(s) 16 (" in warnings[0] and "resumed from step 14" in warnings[0]
  assert (workdir / "checkpoints.damaged" / "16").is_dir() and 14 in saved_steps(workdir)
  assert final_integrity(workdir) == final_integrity(reference)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(prepared, jit_cache, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  # lr 1e30: the first update makes the weights inf, so step 2's loss is not finite
  r = run(workdir, "--config.train.steps=4", "--config.train.checkpoint_every=1", "--config.train.lr=1e30",
          "--config.train.warmup_ratio=0.0", "--config.train.schedule=constant", cache=jit_cache)
  assert r.returncode == 1
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("error: loss became ") and "Traceback" not in r.stderr
  bad = int(err[-1].split("at step ")[1].split(";")[0])
  saved = saved_steps(workdir)
  assert saved and max(saved) < bad and f"the last good checkpoint is step {max(saved)} " in err[-1]
  assert all(json.loads(line)["loss"] < 1e30 for line in (workdir / "metrics.jsonl").read_text().splitlines())


def test_wall_clock_interval_checkpoints_between_checkpoint_every_steps(prepared, jit_cache, tmp_path):
  """train.checkpoint_minutes: a save whenever that much time passed since the last one (here: every step, the
  interval being shorter than a step), though checkpoint_every is larger than the run."""
  workdir = fresh_workdir(prepared, tmp_path / "run")
  r = run(workdir, "--config.train.steps=3", "--config.train.checkpoint_every=100",
          "--config.train.checkpoint_minutes=0.00001", cache=jit_cache)
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]
  r = run(fresh_workdir(prepared, tmp_path / "steps_only"), "--config.train.steps=3",
          "--config.train.checkpoint_every=100", cache=jit_cache)
  assert r.returncode == 0, r.stderr[-2000:]
  saved = sorted(int(p.name) for p in (tmp_path / "steps_only" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [3]  # without the interval: the last step only


def test_tensorboard_event_files_hold_the_metrics(reference):
  from bird_jax.metric_writer import read_events

  events = read_events(reference / "tensorboard")
  logged = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
  assert [(s, round(v, 5)) for s, v in events["train/loss"]] == [(r["step"], round(r["loss"], 5)) for r in logged]
  assert [(s, round(v, 5)) for s, v in events["train/grad_norm"]] == [(r["step"], round(r["grad_norm"], 5))
                                                                      for r in logged]
  for tag in ("train/learning_rate", "perf/step_time_s", "perf/tokens_per_s_per_device", "perf/data_wait_s",
              "perf/tflops_per_device"):
    assert [s for s, _ in events[tag]] == [r["step"] for r in logged], tag
  assert events["train/learning_rate"][0][1] == pytest.approx(1e-3)  # cpu_demo's lr, cosine from step 1


def test_no_record_fitting_seq_len_is_one_line(prepared, jit_cache, tmp_path):
  workdir = fresh_workdir(prepared, tmp_path / "run")
  r = run(workdir, "--config.train.steps=2", "--config.data.seq_len=8", cache=jit_cache, timeout=120)
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no record fits data.seq_len=8: the shortest first turn")
  assert "raise --config.data.seq_len to at least" in err[0]
