"""Train step: ours (jitted, `bird_jax.train_step`) vs the same model in PyTorch, A/B interleaved in one run.

  python -m bird_jax.benchmarks.train_vs_torch [--toy] [--rounds=8] [--no_compile] [--json=FILE]

Shapes (issue 17): decoder hidden 512 × 4 layers, 8 heads of 64, SwiGLU 1,024; ViT width 256 × 4 layers at
448 px (patch 14), resampler 4 heads, 256 queries; the real 151,936-token vocabulary (171M parameters); batch
2 × 512 packed tokens with one image (256 slots) per row; float32; forward + backward + clipped AdamW with the
ViT trained. Both sides start from the same weights (ours exported with the checkpoint converter, loaded into
`torch_qwen_vl.TorchQwenVL`) and take the same batch, so their losses must agree step after step: the
`loss Δ` column is the check that the two do the same work.

PyTorch runs in a child process that never starts XLA (see `torch_qwen_vl`), driven step by step over a pipe, so
rounds interleave: ours, torch eager, torch.compile, ours, ... and a slow spell of the machine lands on each
alike. Reported: median (min–max) step time, per-round speed-ups over each baseline and their median, achieved
FLOP/s from the analytic count (`bird_jax.flops.train_step_flops`, the same model FLOPs for every side) and the
CPU efficiency: that ÷ a float32 matmul peak measured in this run (jitted 2048² matmul, best of several).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bird_jax.benchmarks.common import BenchResult, interleaved, median, pair_ratios, report, versions

# Issue 17's shapes (cpu_demo overrides); the toy size is for the smoke test.
ISSUE_SHAPES = dict(vocab_size=151936, hidden_size=512, num_layers=4, num_heads=8, head_dim=64,
                    intermediate_size=2048, vision_width=256, vision_layers=4, vision_heads=4, patch_size=14,
                    image_size=448, vision_pos_grid=16, n_queries=256, resampler_heads=4, image_start_id=151857)
TOY_SHAPES = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
                  vision_width=32, vision_layers=2, vision_heads=2, patch_size=14, image_size=56,
                  vision_pos_grid=4, n_queries=4, resampler_heads=2, image_start_id=500)
# Fields of QwenVLConfig (derived ones included) the torch model is built from.
TORCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "rms_norm_eps", "rope_base",
                "seq_length", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim", "patch_size",
                "image_size", "vision_pos_grid", "n_queries", "num_resampler_heads", "image_start_id")


def bench_config(toy: bool, loss_chunk: int | None = None):
  from bird_jax.config_util import get_config

  config = get_config("cpu_demo")
  config.model.update(TOY_SHAPES if toy else ISSUE_SHAPES)
  config.model.update(resampler_init="qwen", dtype="float32", param_dtype="float32")
  config.train.update(batch_size=2, train_vit=True, schedule="constant", warmup_ratio=0.0, grad_accum=1)
  # 256-token loss chunks: a row's 254 supervised tokens fill one, the image half of the row is skipped
  config.train.loss_chunk = 256 if loss_chunk is None else loss_chunk
  config.data.update(seq_len=64 if toy else 512, images_per_row=1)
  config.mesh.shape = (1, 1, 1)
  return config


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """Best float32 FLOP/s of a jitted n×n matmul on the default device."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


class TorchSide:
  """The child process: `step(mode)` runs one timed torch step there and returns (seconds, loss)."""

  def __init__(self, work: Path, modes: list[str]):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "bird_jax.benchmarks.train_vs_torch", "--torch_worker", str(work), *modes],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()
    self.faults: dict[str, list[tuple[int, float]]] = {}

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker exited (code {self.proc.wait()}); its stderr is above")
    return json.loads(line)

  def step(self, mode: str) -> tuple[float, float]:
    self.proc.stdin.write(mode + "\n")
    self.proc.stdin.flush()
    out = self._read()
    if "error" in out:
      raise RuntimeError(f"torch {mode}: {out['error']}")
    self.faults.setdefault(mode, []).append((out["faults"], out["sys_s"]))
    return out["s"], out["loss"]

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def torch_worker(work: Path, modes: list[str]) -> None:
  """Builds the torch model (one copy per mode, same weights), then serves `MODE\\n` -> one step's JSON line."""
  import torch

  from bird_jax.benchmarks import torch_qwen_vl as tq

  job = json.loads((work / "job.json").read_text())
  if job["heap_reuse"]:
    from bird_jax.host_memory import keep_freed_memory

    keep_freed_memory()
  with np.load(work / "weights.npz") as w:
    weights = {k: w[k] for k in w.files}
  with np.load(work / "batch.npz") as b:
    batch = {k: torch.from_numpy(b[k].astype(np.int64 if b[k].dtype.kind in "iu" else np.float32))
             for k in b.files}
  steps, info = {}, {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "compile": {}}
  for mode in modes:
    model = tq.TorchQwenVL(job["model"])
    model.load_qwen_vl(weights)
    model.train()
    opt = tq.make_optimizer(model, **job["adamw"])
    fwd = model
    if mode == "compile":
      t0 = time.perf_counter()
      try:
        fwd = torch.compile(model)
        tq.train_step(fwd, opt, batch, job["grad_clip"])  # compiles here; the step is undone below
        model.load_qwen_vl(weights)
        opt = tq.make_optimizer(model, **job["adamw"])
        info["compile"] = {"ok": True, "compile_s": time.perf_counter() - t0}
      except Exception as e:  # noqa: BLE001 — a failed torch.compile is a result to report, not a crash
        info["compile"] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        continue
    steps[mode] = (fwd, opt)
  del weights
  print(json.dumps({**info, "params": sum(p.numel() for p in model.parameters()), "modes": list(steps)}),
        flush=True)
  for line in sys.stdin:
    mode = line.strip()
    if mode not in steps:
      print(json.dumps({"error": f"mode {mode!r} not available"}), flush=True)
      continue
    fwd, opt = steps[mode]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loss = tq.train_step(fwd, opt, batch, job["grad_clip"])
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"s": t1 - t0, "loss": loss, "faults": r1.ru_minflt - r0.ru_minflt,
                      "sys_s": r1.ru_stime - r0.ru_stime}), flush=True)


def run(toy: bool = False, rounds: int | None = None, torch_compile: bool = True,
        loss_chunk: int | None = None, torch_heap_reuse: bool = False) -> BenchResult:
  import jax

  from bird_jax import sharding as shd
  from bird_jax.benchmarks.train_step_speed import synthetic_batch
  from bird_jax.flops import train_step_flops
  from bird_jax.host_memory import reuse_if_cpu
  from bird_jax.model import QwenVLConfig, param_count
  from bird_jax.model.convert import to_hf_state_dict
  from bird_jax.train_step import build_train_step, images_per_row, to_global

  rounds = rounds or (2 if toy else 8)
  heap = reuse_if_cpu()  # as `python -m bird_jax.train` does; works only before the backend has started
  config = bench_config(toy, loss_chunk)
  model_cfg = QwenVLConfig(**config.model.to_dict())
  mesh = shd.make_mesh((1, 1, 1))
  parts = build_train_step(config, model_cfg, mesh)
  tc = config.train
  host = synthetic_batch(config, model_cfg)
  modes = ["eager"] + (["compile"] if torch_compile else [])
  notes: list[str] = []
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory(prefix="train_vs_torch_") as tmp:
    work = Path(tmp)
    state = jax.jit(parts.init_state, out_shardings=parts.state_shardings)()
    np.savez(work / "weights.npz", **to_hf_state_dict(state["params"], model_cfg))
    np.savez(work / "batch.npz", **host)
    (work / "job.json").write_text(json.dumps({
      "model": {k: getattr(model_cfg, k) for k in TORCH_FIELDS},
      "adamw": dict(lr=tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay),
      "grad_clip": tc.grad_clip, "heap_reuse": torch_heap_reuse}))
    batch = to_global(host, mesh)
    t0 = time.perf_counter()
    compiled = parts.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    torch_side = TorchSide(work, modes)
    try:
      losses: dict[str, list[float]] = {"bird_jax": []}

      faults: dict[str, list[tuple[int, float]]] = {"bird_jax": []}

      def ours():
        nonlocal state
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        state, metrics = compiled(state, batch)
        losses["bird_jax"].append(float(metrics["loss"]))  # waits for the step
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults["bird_jax"].append((r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))

      def theirs(mode):
        def go():
          losses.setdefault(mode, []).append(torch_side.step(mode)[1])
        return go

      contenders = {"bird_jax": ours, **{f"torch {m}": theirs(m) for m in torch_side.info["modes"]}}
      times = interleaved(contenders, rounds=rounds, warmup=1)
    finally:
      torch_side.close()
    faults.update(torch_side.faults)
  peak = matmul_peak(256 if toy else 2048)
  if torch_compile and not torch_side.info["compile"].get("ok"):
    notes.append(f"torch.compile did not work here: {torch_side.info['compile'].get('error')}")
  flops = train_step_flops(model_cfg, batch=tc.batch_size, seq_len=config.data.seq_len,
                           images_per_row=images_per_row(config, model_cfg.n_queries), train_vit=tc.train_vit,
                           train_resampler=tc.train_resampler, train_llm=tc.train_llm).total
  # Efficiency counts what each side executes: torch computes the LM head on every token (the model FLOPs);
  # ours skips the chunks without supervised tokens, so its executed FLOPs are XLA's count of the compiled step.
  executed = {"bird_jax": xla_flops or flops}
  rows, summary = [], {}
  for name, ts in times.items():
    ref, other = losses["bird_jax"], losses[name.removeprefix("torch ")]
    step = median(ts)
    rows.append({"implementation": name, "step s": step, "min s": min(ts), "max s": max(ts),
                 "model GFLOP/s": flops / step / 1e9, "executed GFLOP/s": executed.get(name, flops) / step / 1e9,
                 "cpu eff": executed.get(name, flops) / step / peak,
                 "loss Δ max": max(abs(a - b) for a, b in zip(ref, other, strict=True)),
                 # the last `rounds` entries: the warm-up step is not timed
                 "page faults": median([f for f, _ in faults[name.removeprefix("torch ")][-rounds:]]),
                 "sys s": median([st for _, st in faults[name.removeprefix("torch ")][-rounds:]])})
  for name, ts in times.items():
    if name != "bird_jax":
      r = pair_ratios(ts, times["bird_jax"])
      summary[f"speedup_vs_{name.replace(' ', '_')}"] = median(r)
      rows.append({"implementation": f"speed-up over {name}", "step s": median(r), "min s": min(r),
                   "max s": max(r), "model GFLOP/s": None, "executed GFLOP/s": None, "cpu eff": None,
                   "loss Δ max": None, "page faults": None, "sys s": None})
  summary.update(cpu_efficiency=executed["bird_jax"] / median(times["bird_jax"]) / peak,
                 matmul_peak_gflops=peak / 1e9, goal_speedup=1.5, goal_cpu_efficiency=0.6)
  notes.append(f"model FLOPs per step {flops / 1e9:.1f} G (analytic: LM head on every token, as torch computes "
               f"it); ours executes {executed['bird_jax'] / 1e9:.1f} G (XLA's count: the head only on chunks "
               f"with supervised tokens); cpu eff = executed FLOP/s ÷ the matmul peak; speed-up rows: median "
               f"(step s column) and range of the per-round ratios; our compile {compile_s:.1f} s")
  shapes = {"params": param_count(state["params"]), "batch": tc.batch_size, "seq_len": config.data.seq_len,
            "image_tokens_per_row": model_cfg.n_queries, "vocab": model_cfg.vocab_size,
            "loss_chunk": tc.loss_chunk, "dtype": "float32", "rounds": rounds,
            "torch_threads": torch_side.info["torch_threads"], "host_memory": heap,
            "torch_host_memory": "same as ours" if torch_heap_reuse else "stock malloc", "versions": versions()}
  return BenchResult(name="train_step_vs_torch", shapes=shapes, rows=rows, summary=summary, notes=notes)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--toy", action="store_true", help="tiny shapes (the smoke test's size)")
  ap.add_argument("--rounds", type=int, default=0, help="timed rounds (default 8; toy 2)")
  ap.add_argument("--loss_chunk", type=int, default=None, help="override config.train.loss_chunk")
  ap.add_argument("--no_compile", action="store_true", help="skip the torch.compile baseline")
  ap.add_argument("--torch_heap_reuse", action="store_true",
                  help="give torch the host-memory setting ours runs with (bird_jax.host_memory)")
  ap.add_argument("--json", default=None, help="also write the result here")
  ap.add_argument("--torch_worker", nargs="+", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.torch_worker:
    torch_worker(Path(args.torch_worker[0]), args.torch_worker[1:])
    return
  result = run(args.toy, args.rounds or None, not args.no_compile, args.loss_chunk, args.torch_heap_reuse)
  print(report(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result.to_json(), indent=2))


if __name__ == "__main__":
  main()
