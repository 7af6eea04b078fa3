"""Scaling of the real train step: step time and memory vs sequence length, and vs (fake CPU) device count and
mesh layout.

  python -m bird_jax.benchmarks.scaling [--toy] [--only=seq|devices] [--json=FILE] [--steps=N] [--warmup=N]

Every point runs in a fresh subprocess (`--xla_force_host_platform_device_count=N`, `JAX_PLATFORMS=cpu`, set
before the child imports jax; this process never imports jax), which builds the step the trainer runs with
`train_step_speed.measure` on `train_step_speed.synthetic_batch` rows (two packed segments per row, one image per
row, random weights). The child reports the compile time, the median step time, tokens/s and memory:

* state_mib: bytes of the train state (params + Adam moments + step) on one device (all of it on 1 device);
* step_mib: what the step adds beyond the state: the child's peak RSS during the timed steps (VmHWM of
  /proc/self/status, reset after compiling so the compiler's own peak is not counted) minus its RSS once the
  state and the batch exist. On N fake devices RSS is the one process holding all N devices, so per device it is
  step_mib / N (`step_mib_dev`);
* xla_temp_mib: XLA's own per-device temporary-buffer size of the compiled step (`memory_analysis()`), the
  allocator-independent cross-check of step_mib_dev.

Sweep "seq": seq_len 256, 512, 1,024, 2,048 at batch 2 on one device; the summary checks the issue's goal "at
2,048 tokens no more than linear growth of memory beyond the weights" as per_token_ratio = (step_mib@2048 / 2048)
/ (step_mib@256 / 256) <= 1 and also prints the marginal ratio (MiB per added token between 1,024 and 2,048 over
that between 256 and 512: 1 for linear growth, 4 for purely quadratic) and, from a quadratic fit of step_mib over
the lengths, the share of the L^2 term at 2,048 tokens. Sweep "devices": 1, 2, 4, 8 fake CPU
devices with the layouts fsdp (1, -1, 1), data (-1, 1, 1) and tensor (1, 1, -1) (mesh.shape is (data, fsdp,
tensor), `bird_jax.sharding.MESH_AXES`) at seq_len 512, batch 8. Fake devices share this machine's cores, so that
sweep measures the cost of the sharding (collectives, resharding, per-device memory), not a speed-up.

Model (toy=False): the issue's benchmark shapes, decoder 512 wide x 4 layers, 8 heads of 64, SwiGLU
intermediate_size 2,048, ViT 256 wide x 4 layers (8 heads) at 448 px / patch 14 (1,024 patches), vocab 32,000
(not Qwen's 151,936, to keep the sweep in minutes), but 64 resampler queries instead of 256, so that one image
span (66 tokens) fits every row from 256 tokens up and every point carries the same image work, and 8 resampler
heads instead of Qwen's hidden / 128 = 4, which a tensor axis of 8 cannot split (jax IndivisibleError when the
state is placed). float32,
attention "auto" (on CPU: the einsum path while L <= 512, the blocked flash-style path beyond: no [B, H, L, L]
scores), remat "none", ViT frozen / resampler + LLM trained (BiRD stage 2,
the `_base` default), LM loss in 512-token chunks. `--toy`: Qwen-VL's tiny test shapes, two lengths, 1 and 2
devices, well under a minute.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bird_jax.benchmarks.common import BenchResult, report, versions
from bird_jax.host_memory import proc_status_kib

ROOT = Path(__file__).resolve().parents[2]

FULL_MODEL = dict(vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, head_dim=64, intermediate_size=2048,
                  vision_width=256, vision_layers=4, vision_heads=8, vision_mlp_ratio=4.0, patch_size=14,
                  image_size=448, vision_pos_grid=16, n_queries=64, resampler_heads=8, image_start_id=32000 - 3)
# QwenVLConfig.tiny()'s shapes.
TOY_MODEL = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
                 vision_width=32, vision_layers=2, vision_heads=2, vision_mlp_ratio=2.0, patch_size=14, image_size=56,
                 vision_pos_grid=16, n_queries=9, resampler_heads=2, image_start_id=500)

LAYOUTS = {"fsdp": (1, -1, 1), "data": (-1, 1, 1), "tensor": (1, 1, -1)}


@dataclasses.dataclass(frozen=True)
class Plan:
  model: dict[str, Any]
  seq_lens: tuple[int, ...]
  seq_batch: int
  device_counts: tuple[int, ...]
  device_seq_len: int
  device_batch: int
  steps: int
  warmup: int
  timeout_s: int
  jobs: int  # points measured at once: 1 for figures to report; the toy run (timings unused) takes 2


def plan(toy: bool, steps: int | None = None, warmup: int | None = None) -> Plan:
  if toy:
    return Plan(TOY_MODEL, (64, 128), 2, (1, 2), 64, 2, steps or 2, 1 if warmup is None else warmup, 300, 2)
  return Plan(FULL_MODEL, (256, 512, 1024, 2048), 2, (1, 2, 4, 8), 512, 8, steps or 2,
              1 if warmup is None else warmup, 1800, 1)


# ------------------------------------------------------------------------------------------------ child


def _settle() -> None:
  """Frees what Python and malloc hold but no longer use, so RSS is what is live."""
  import ctypes
  import gc

  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _reset_peak() -> bool:
  """VmHWM := current RSS (Linux >= 4.0); False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
    return True
  except OSError:
    return False


class _Probe:
  """Hooks into `measure`'s `step.lower(state, batch).compile()`: RSS and state bytes once the state and the
  batch exist (at lower), XLA's memory analysis and a peak reset once compiled (the timed steps follow)."""

  def __init__(self):
    self.rss_state_kib: int | None = None
    self.rss_compiled_kib: int | None = None
    self.peak_reset = False
    self.state_bytes = self.state_bytes_dev0 = 0
    self.xla: dict[str, int] = {}

  def wrap(self, step):
    probe = self

    class Lowered:
      def __init__(self, lowered):
        self._lowered = lowered

      def compile(self):
        compiled = self._lowered.compile()
        probe.on_compiled(compiled)
        return compiled

    class Step:
      def lower(self, state, batch):
        probe.on_state(state)
        return Lowered(step.lower(state, batch))

      def __call__(self, *args):
        return step(*args)

    return Step()

  def on_state(self, state) -> None:
    import jax

    leaves = jax.tree.leaves(state)
    jax.block_until_ready(leaves)
    dev0 = jax.devices()[0]
    self.state_bytes = sum(x.nbytes for x in leaves)
    self.state_bytes_dev0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == dev0)
    _settle()
    self.rss_state_kib = proc_status_kib("VmRSS")

  def on_compiled(self, compiled) -> None:
    try:
      ma = compiled.memory_analysis()
      self.xla = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias",
                                                                    "generated_code")}
    except Exception:  # not every backend / version reports it
      self.xla = {}
    _settle()
    self.rss_compiled_kib = proc_status_kib("VmRSS")
    self.peak_reset = _reset_peak()


def child_config(spec: dict[str, Any]):
  """The run config of one point: `_base` defaults, the sweep's model, batch, length and mesh."""
  from bird_jax.model import QwenVLConfig
  from configs import _base

  c = _base.get_config()
  c.model = _base.model_config(QwenVLConfig(**spec["model"]))
  c.data.seq_len = spec["seq_len"]
  c.data.images_per_row = 1
  c.train.batch_size = spec["batch"]
  c.train.grad_accum = 1
  c.train.warmup_ratio = 0.0
  c.mesh.shape = tuple(spec["mesh"])
  return c


def child(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs in the subprocess: one point of a sweep, measured with train_step_speed.measure (instrumented)."""
  import jax

  import bird_jax.train_step as ts
  from bird_jax import sharding as shd
  from bird_jax.benchmarks.train_step_speed import measure

  config = child_config(spec)
  mesh_shape = shd.resolve_mesh_shape(config.mesh.shape, jax.device_count())
  probe, build = _Probe(), ts.build_train_step

  def instrumented(*args):
    parts = build(*args)
    return dataclasses.replace(parts, step=probe.wrap(parts.step))

  ts.build_train_step = instrumented
  try:
    r = measure(config, spec["steps"], spec["warmup"])
  finally:
    ts.build_train_step = build
  hwm = proc_status_kib("VmHWM")
  if probe.rss_state_kib is None or hwm is None:
    raise RuntimeError("no RSS figures: measure() no longer calls step.lower(state, batch).compile(), or no /proc")
  return {
    "devices": jax.device_count(), "mesh": list(mesh_shape), "seq_len": r["seq_len"], "batch": r["batch"],
    "params": r["params"], "compile_s": r["compile_s"], "step_s": r["step_s"], "step_s_min": r["step_s_min"],
    "step_s_max": r["step_s_max"], "tokens_per_s": r["tokens_per_s_per_device"] * r["devices"],
    "state_bytes": probe.state_bytes, "state_bytes_dev0": probe.state_bytes_dev0,
    "rss_state_kib": probe.rss_state_kib, "rss_compiled_kib": probe.rss_compiled_kib, "peak_rss_kib": hwm,
    "peak_reset_after_compile": probe.peak_reset, "xla_bytes_per_device": probe.xla,
    "first_loss": r["first_loss"], "last_loss": r["last_loss"],
  }


# ------------------------------------------------------------------------------------------------ parent


def child_env(devices: int) -> dict[str, str]:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def run_point(spec: dict[str, Any], devices: int, timeout_s: int) -> dict[str, Any]:
  """One point in a fresh process with `devices` fake CPU devices: the child's figures, or {"error": ...}."""
  t0 = time.perf_counter()
  try:
    p = subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.scaling", "--_child=" + json.dumps(spec)],
                       cwd=ROOT, env=child_env(devices), capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s} s"}
  if p.returncode:
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]  # the exception's own line
    error = (raised or lines or [f"exit {p.returncode}"])[-1]
    return {"error": error[:300], "stderr_tail": p.stderr[-3000:]}
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out["wall_s"] = time.perf_counter() - t0
  return out


MIB = 2**20


def row(sweep: str, layout: str, r: dict[str, Any]) -> dict[str, Any]:
  """One table line; figures None where the point failed (status says why)."""
  ok = "error" not in r
  n = r.get("devices")
  step = (r["peak_rss_kib"] - r["rss_state_kib"]) * 1024 / MIB if ok else None
  temp = r["xla_bytes_per_device"].get("temp") if ok else None
  return {
    "sweep": sweep, "seq_len": r.get("seq_len"), "batch": r.get("batch"), "devices": n, "layout": layout,
    "mesh": "x".join(map(str, r["mesh"])) if ok else None,
    "compile_s": r["compile_s"] if ok else None, "step_s": r["step_s"] if ok else None,
    "tokens_per_s": r["tokens_per_s"] if ok else None,
    "state_mib": r["state_bytes_dev0"] / MIB if ok else None,
    "step_mib": step, "step_mib_dev": step / n if ok else None,
    "xla_temp_mib": temp / MIB if temp is not None else None,
    "kib_per_token": step * 1024 / (r["batch"] * r["seq_len"]) if ok else None,
    "status": "ok" if ok else r["error"],
  }


def seq_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Memory growth with length, from the 1-device rows: least-squares line through step_mib (MiB per row
  token = slope / batch), the per-token ratio of the longest vs the shortest length and the marginal ratio."""
  pts = [(r["seq_len"], r["step_mib"], r["xla_temp_mib"], r["batch"]) for r in rows if r["status"] == "ok"]
  if len(pts) < 2:
    return {}
  (l0, m0, x0, b), (l1, m1, x1, _) = pts[0], pts[-1]
  xs, ys = [p[0] for p in pts], [p[1] for p in pts]
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
  out: dict[str, Any] = {
    "mib_per_token_fit": slope / b, "intercept_mib_fit": my - slope * mx,
    f"per_token_ratio_{l1}_vs_{l0}": (m1 / l1) / (m0 / l0),
    f"growth_{l1}_vs_{l0}": m1 / m0,
  }
  if x0 and x1:
    out[f"xla_per_token_ratio_{l1}_vs_{l0}"] = (x1 / l1) / (x0 / l0)
  if len(pts) >= 3:
    (la, ma, _, _), (lb, mb, _, _) = pts[0], pts[1]
    (lc, mc, _, _), (ld, md, _, _) = pts[-2], pts[-1]
    out[f"marginal_ratio_{lc}-{ld}_vs_{la}-{lb}"] = ((md - mc) / (ld - lc)) / ((mb - ma) / (lb - la))
  if len(pts) >= 3:  # step_mib = a + b L + c L^2: the share of the L^2 term at the longest length
    c, _, _ = np.polyfit(xs, ys, 2)
    out[f"quadratic_share_at_{l1}"] = c * l1**2 / m1
  out["linear_goal_met"] = out[f"per_token_ratio_{l1}_vs_{l0}"] <= 1.0
  return out


def device_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per layout at the largest device count: step time and per-device step memory vs the 1-device point."""
  base = next((r for r in rows if r["devices"] == 1 and r["status"] == "ok"), None)
  ok = [r for r in rows if r["status"] == "ok" and r["devices"] > 1]
  if base is None or not ok:
    return {}
  n = max(r["devices"] for r in ok)
  out: dict[str, Any] = {}
  for r in ok:
    if r["devices"] == n:
      out[f"{r['layout']}{n}_step_time_x"] = r["step_s"] / base["step_s"]
      out[f"{r['layout']}{n}_step_mib_dev_x"] = r["step_mib_dev"] / base["step_mib_dev"]
      out[f"{r['layout']}{n}_state_mib_dev_x"] = r["state_mib"] / base["state_mib"]
  return out


def run(toy: bool = False, only: str = "", steps: int | None = None, warmup: int | None = None,
        log=None) -> BenchResult:
  """Both sweeps (or `only` one: "seq" or "devices"); each point in a fresh subprocess."""
  if only not in ("", "seq", "devices"):
    raise ValueError(f"only={only!r}; use 'seq' or 'devices'")
  p = plan(toy, steps, warmup)
  base = {"model": p.model, "steps": p.steps, "warmup": p.warmup}
  say = log or (lambda s: None)
  points: list[tuple[str, str, int, dict[str, Any]]] = []
  if only in ("", "seq"):
    points += [("seq", "-", 1, {"seq_len": length, "batch": p.seq_batch, "mesh": [1, -1, 1]}) for length in p.seq_lens]
  if only in ("", "devices"):
    for n in p.device_counts:
      for name, shape in (LAYOUTS.items() if n > 1 else [("all", (1, -1, 1))]):
        points.append(("devices", name, n, {"seq_len": p.device_seq_len, "batch": p.device_batch,
                                            "mesh": list(shape)}))

  def measure_point(key: str) -> dict[str, Any]:
    devices, spec = json.loads(key)
    r = run_point({**base, **spec}, devices, p.timeout_s)
    r.setdefault("devices", devices)
    r.setdefault("seq_len", spec["seq_len"])
    r.setdefault("batch", spec["batch"])
    say(f"  devices={devices} mesh={spec['mesh']} seq={spec['seq_len']} batch={spec['batch']}: "
        + (f"step {r['step_s']:.3g} s, {r['wall_s']:.0f} s wall" if "error" not in r else r["error"]))
    return r

  # A point both sweeps share (toy: 1 device at the device sweep's length) is measured once.
  keys = [json.dumps([n, spec], sort_keys=True) for _, _, n, spec in points]
  with concurrent.futures.ThreadPoolExecutor(max_workers=p.jobs) as pool:
    measured = dict(zip(dict.fromkeys(keys), pool.map(measure_point, dict.fromkeys(keys)), strict=True))
  rows = [row(sweep, layout, measured[k]) for (sweep, layout, _, _), k in zip(points, keys, strict=True)]

  summary = {**seq_summary([r for r in rows if r["sweep"] == "seq"]),
             **device_summary([r for r in rows if r["sweep"] == "devices"])}
  m = p.model
  shapes = {
    "decoder": f"{m['hidden_size']}x{m['num_layers']} ({m['num_heads']} heads, mlp {m['intermediate_size']})",
    "vit": f"{m['vision_width']}x{m['vision_layers']} @ {m['image_size']}px/{m['patch_size']}",
    "queries": m["n_queries"], "vocab": m["vocab_size"], "images_per_row": 1, "seq_lens": list(p.seq_lens),
    "seq_batch": p.seq_batch, "devices": list(p.device_counts), "device_seq_len": p.device_seq_len,
    "device_batch": p.device_batch, "steps": p.steps, "warmup": p.warmup, "dtype": "float32",
  }
  notes = [
    "step_mib = peak RSS over the timed steps minus RSS with state + batch built (the compile peak is excluded by "
    "resetting VmHWM after compiling); state_mib and xla_temp_mib are per device; step_mib_dev = step_mib / "
    "devices (one process holds every fake device).",
    f"{m['n_queries']} resampler queries and 1 image per row at every length, so the image work is the same at "
    "every point.",
    "fake CPU devices share this machine's cores: the devices sweep measures sharding overhead and per-device "
    "memory, not a speed-up.",
    "CPU figures on a shared machine: times are pessimistic and for comparing points of the same run only.",
  ]
  if any(r["status"] != "ok" for r in rows):
    notes.append("failed points: " + "; ".join(f"{r['sweep']} {r['devices']} {r['layout']}: {r['status']}"
                                                for r in rows if r["status"] != "ok"))
  if not toy and "per_token_ratio_2048_vs_256" in summary:
    notes.append("goal (issue): at 2,048 tokens no more than linear growth of memory beyond the weights, checked as "
                 "per_token_ratio_2048_vs_256 = (step_mib@2048/2048)/(step_mib@256/256) <= 1")
  result = BenchResult("scaling", shapes, rows, summary, notes)
  result.shapes["versions"] = versions()
  return result


def main(argv: list[str] | None = None) -> BenchResult | None:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0].startswith("--_child="):
    print(json.dumps(child(json.loads(argv[0].split("=", 1)[1]))), flush=True)
    return None
  toy, out, only, counts = False, "", "", {}
  for a in argv:
    key, _, value = a.partition("=")
    if a == "--toy":
      toy = True
    elif key == "--json" and value:
      out = value
    elif key == "--only" and value in ("seq", "devices"):
      only = value
    elif key in ("--steps", "--warmup") and value.isdigit() and (key == "--warmup" or int(value) > 0):
      counts[key[2:]] = int(value)
    else:
      print(f"error: {a}: use --toy, --only=seq|devices, --json=FILE, --steps=N (> 0), --warmup=N", file=sys.stderr)
      raise SystemExit(2)
  t0 = time.perf_counter()
  result = run(toy=toy, only=only, log=lambda s: print(s, file=sys.stderr, flush=True), **counts)
  versions_ = result.shapes.pop("versions")
  print(report(result))
  print("versions: " + ", ".join(f"{k}={v}" for k, v in versions_.items()))
  print(f"total {time.perf_counter() - t0:.0f} s")
  result.shapes["versions"] = versions_
  if out:
    Path(out).write_text(json.dumps(result.to_json(), indent=2))
  return result


if __name__ == "__main__":
  main()
