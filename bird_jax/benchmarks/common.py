"""What every benchmark of `python -m bird_jax.bench` shares: the result record, A/B interleaved timing,
machine/version facts and the table printer.

A benchmark module exposes `run(toy: bool = False) -> BenchResult`. `toy=True` is the smoke-test size (seconds,
tiny shapes, asserted nowhere but that it runs and its fields are well formed); `toy=False` is the size whose
figures go to the README and docs/benchmarks.md. Each benchmark measures its own baseline in the same run and
reports ratios.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class BenchResult:
  """One benchmark's outcome: `rows` is its table (one dict per line, same keys), `summary` the few headline
  figures (ratios against the in-run baseline, with the goal they are checked against where the issue sets one)."""

  name: str
  shapes: dict[str, Any]
  rows: list[dict[str, Any]]
  summary: dict[str, Any]
  notes: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def versions() -> dict[str, str]:
  """Library versions and the machine, printed with every run so figures can be compared across runs."""
  import importlib.metadata as md

  out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "grain"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  try:
    with open("/proc/cpuinfo") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    if model:
      out["cpu"] = model
  except OSError:
    pass
  return out


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
  """Times each callable once per round, in turn (A, B, A, B, ...), after `warmup` untimed calls each, so a
  slow spell of the machine lands on every contender alike. Each callable must block until its work is done."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return times


def pair_ratios(baseline: Sequence[float], candidate: Sequence[float]) -> list[float]:
  """Per-round speed-ups baseline_time / candidate_time (> 1: the candidate is faster)."""
  return [b / c for b, c in zip(baseline, candidate, strict=True)]


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def format_table(rows: list[dict[str, Any]]) -> str:
  """Plain aligned text table; floats to 3 significant figures (4 for values >= 1000)."""
  if not rows:
    return "(no rows)"
  keys = list(rows[0])

  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
      return f"{v:,}"
    return "" if v is None else str(v)

  cells = [[fmt(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
  lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
  return "\n".join(lines)


def report(result: BenchResult) -> str:
  """The text `python -m bird_jax.bench` prints for one benchmark."""
  shapes = ", ".join(f"{k}={v}" for k, v in result.shapes.items())
  summary = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.summary.items())
  parts = [f"== {result.name} ==", f"shapes: {shapes}", format_table(result.rows), f"summary: {summary}"]
  parts += [f"note: {n}" for n in result.notes]
  return "\n".join(parts)
