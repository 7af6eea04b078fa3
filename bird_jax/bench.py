"""The benchmark suite: every speed claim of the project, each against a baseline measured in the same run.

  python -m bird_jax.bench                                   # all of them (about 25 min on a 2-core machine)
  python -m bird_jax.bench --only train decode               # some
  python -m bird_jax.bench --toy                             # tiny shapes: checks that each one runs (~3 min)
  python -m bird_jax.bench --results=docs/bench_results.json # where the results are kept (that is the default)

  train     our jitted train step vs the same Qwen-VL in PyTorch (eager and torch.compile), A/B interleaved,
            same weights and batch (their losses must agree), with the CPU efficiency: executed FLOP/s ÷ a
            float32 matmul peak measured in the same run        (bird_jax/benchmarks/train_vs_torch.py)
  decode    jitted KV-cache generate vs transformers' generate   (bird_jax/benchmarks/generate_speed.py)
  input     Grain training pipeline at 448 px, 2,048-token packing, workers 0/1/2, and the factor over one
            accelerator's consumption at 50 % MFU               (bird_jax/benchmarks/input_pipeline.py)
  data_gen  masks/s/core, images/s, 1 vs 2 worker processes     (data_gen/benchmark.py)
  scaling   step time and peak memory vs sequence length and vs fake CPU devices with fsdp/data/tensor
            layouts                                              (bird_jax/benchmarks/scaling.py)

Each prints its shapes, library versions, a table with medians and per-pair ratios, and a summary line. Full
runs (not --toy) are written to the results file: one entry per benchmark, replaced by its latest run, each
with the command, machine, date and git commit, so the README and docs/benchmarks.md can say where every
figure came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bird_jax.benchmarks.common import BenchResult, report

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "bench_results.json"


def _train(toy: bool) -> BenchResult:
  from bird_jax.benchmarks.train_vs_torch import run

  return run(toy)


def _decode(toy: bool) -> BenchResult:
  from bird_jax.benchmarks.generate_speed import bench

  return bench(toy)


def _input(toy: bool) -> BenchResult:
  from bird_jax.benchmarks.input_pipeline import run

  return run(toy)


def _data_gen(toy: bool) -> BenchResult:
  from data_gen.benchmark import run

  return run(toy)


def _scaling(toy: bool) -> BenchResult:
  from bird_jax.benchmarks.scaling import run

  return run(toy)


BENCHMARKS: dict[str, Callable[[bool], BenchResult]] = {
  "train": _train, "decode": _decode, "input": _input, "data_gen": _data_gen, "scaling": _scaling}


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=Path(__file__).resolve().parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def record(results: Path, result: BenchResult, command: str, seconds: float) -> None:
  """Replaces this benchmark's entry in the results file (a JSON object keyed by benchmark name)."""
  from bird_jax.benchmarks.common import versions

  data = json.loads(results.read_text()) if results.exists() else {}
  data[result.name] = {
    "command": command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": _git_commit(), "machine": versions(),
    "seconds": round(seconds, 1), **result.to_json()}
  results.parent.mkdir(parents=True, exist_ok=True)
  results.write_text(json.dumps(dict(sorted(data.items())), indent=1, default=str) + "\n")


def _in_child(name: str, toy: bool) -> BenchResult:
  """Each benchmark in its own process: no thread pool, allocator state or memory high-water of one
  benchmark can colour the next."""
  with tempfile.TemporaryDirectory(prefix="bird_jax_bench_") as tmp:
    dest = Path(tmp) / "result.json"
    cmd = [sys.executable, "-m", "bird_jax.bench", "--one", name, str(dest)] + (["--toy"] if toy else [])
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not dest.exists():
      raise SystemExit(f"error: benchmark {name} failed (exit code {proc.returncode}); its output is above")
    return BenchResult(**json.loads(dest.read_text()))


def main(argv: list[str] | None = None) -> list[BenchResult]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                  help=f"run these (of {', '.join(BENCHMARKS)}; commas also separate)")
  ap.add_argument("--toy", action="store_true", help="tiny shapes; nothing is written to the results file")
  ap.add_argument("--results", default=str(RESULTS), help="results file for full runs (default: %(default)s)")
  ap.add_argument("--no_record", action="store_true", help="do not write the results file")
  ap.add_argument("--json", default=None, help="also write this run's results (toy ones too) here")
  ap.add_argument("--one", nargs=2, default=None, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:  # the child: one benchmark in a fresh process
    name, dest = args.one
    if name == "train":
      from bird_jax.host_memory import reuse_if_cpu

      reuse_if_cpu()  # as `python -m bird_jax.train` does, before the backend starts
    Path(dest).write_text(json.dumps(BENCHMARKS[name](args.toy).to_json(), default=str))
    return []
  names = [n for item in (args.only or BENCHMARKS) for n in item.split(",") if n]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    print(f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
    raise SystemExit(2)
  out = []
  for name in names:
    t0 = time.perf_counter()
    result = _in_child(name, args.toy)
    print(report(result), flush=True)
    if not (args.toy or args.no_record):
      record(Path(args.results), result, f"python -m bird_jax.bench --only {name}", time.perf_counter() - t0)
    out.append(result)
  if args.json:
    Path(args.json).write_text(json.dumps([r.to_json() for r in out], indent=1, default=str))
  return out


if __name__ == "__main__":
  main()
