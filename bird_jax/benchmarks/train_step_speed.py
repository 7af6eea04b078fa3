"""Times the real train step of a config on the devices of this machine, with MFU from the analytic FLOPs.

  python -m bird_jax.benchmarks.train_step_speed --config=gpu_h200 --steps=20 [--config.x=y ...]

Random weights placed straight into their shardings (shapes first), synthetic packed rows (text, `<img>` spans
with their image slots, two segments per row), `bird_jax.train_step.build_train_step`'s jitted step — the one
`python -m bird_jax.train` runs. Prints the compile time, step time (median over the timed steps, after
`--warmup` untimed ones), tokens/s per device, TFLOP/s per device and MFU against the device kind's peak (CPU:
no peak, MFU n/a), and the peak device memory where the backend reports it. `--json=FILE` writes the numbers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np


def synthetic_batch(config, model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows as the data pipeline makes them: two segments per row, each `<img>` + n_queries slots +
  `</img>` then text; labels shifted, loss on the text after each image."""
  from bird_jax.train_step import images_per_row, pixel_dtype

  b, length, q = config.train.batch_size, config.data.seq_len, model_cfg.n_queries
  n_img, s = images_per_row(config, q), model_cfg.image_size
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, min(model_cfg.vocab_size, model_cfg.image_start_id), size=(b, length)).astype(np.int32)
  segment_ids = np.ones((b, length), np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
  loss_mask = np.ones((b, length), np.float32)
  half = length // 2
  segment_ids[:, half:] = 2
  positions[:, half:] -= half
  for start in (0, half)[: max(1, min(2, n_img))]:
    if start + q + 2 <= length:
      ids[:, start] = model_cfg.image_start_id
      ids[:, start + 1:start + 1 + q] = model_cfg.image_pad_id
      ids[:, start + 1 + q] = model_cfg.image_end_id
      loss_mask[:, start:start + q + 2] = 0.0
  labels = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
  pixels = rng.normal(size=(b, n_img, s, s, 3)).astype(pixel_dtype(model_cfg))
  return dict(input_ids=ids, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
              pixel_values=pixels)


def measure(config, steps: int, warmup: int) -> dict:
  from bird_jax import sharding as shd
  from bird_jax.flops import peak_flops, train_step_flops
  from bird_jax.model import QwenVLConfig, param_count
  from bird_jax.train_step import build_train_step, images_per_row, to_global

  model_cfg = QwenVLConfig(**config.model.to_dict())
  mesh = shd.make_mesh(config.mesh.shape)
  parts = build_train_step(config, model_cfg, mesh)
  tc = config.train
  with jax.set_mesh(mesh):
    state = jax.jit(parts.init_state, out_shardings=parts.state_shardings)()
    batch = to_global(synthetic_batch(config, model_cfg), mesh)
    t0 = time.perf_counter()
    compiled = parts.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))  # waits for the step
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  n_dev = jax.device_count()
  kind = jax.devices()[0].device_kind
  flops = train_step_flops(model_cfg, batch=tc.batch_size, seq_len=config.data.seq_len,
                           images_per_row=images_per_row(config, model_cfg.n_queries), train_vit=tc.train_vit,
                           train_resampler=tc.train_resampler, train_llm=tc.train_llm).total
  step_s = statistics.median(times)
  peak = peak_flops(kind)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "device_kind": kind, "devices": n_dev, "params": param_count(parts.abstract_state["params"]),
    "batch": tc.batch_size, "seq_len": config.data.seq_len, "grad_accum": tc.grad_accum,
    "dtype": model_cfg.dtype, "attention_impl": model_cfg.attention_impl, "remat_policy": model_cfg.remat_policy,
    "compile_s": compile_s, "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
    "tokens_per_s_per_device": tc.batch_size * config.data.seq_len / step_s / n_dev,
    "tflops_per_device": flops / step_s / n_dev / 1e12, "mfu": (flops / step_s / n_dev / peak) if peak else None,
    "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None, "first_loss": losses[0],
    "last_loss": losses[-1],
  }


def main(argv: list[str] | None = None) -> None:
  from bird_jax.config_util import exit_on_config_error, parse_config_flags

  argv = sys.argv[1:] if argv is None else argv
  counts, out, rest = {"steps": "20", "warmup": "2"}, "", []
  for a in argv:
    if a.startswith(("--steps=", "--warmup=")):
      key, value = a[2:].split("=", 1)
      counts[key] = value
    elif a.startswith("--json="):
      out = a.split("=", 1)[1]
    else:
      rest.append(a)

  bad = [f"--{k}={v}" for k, v in counts.items() if not (v.isdigit() and (k == "warmup" or int(v) > 0))]
  if bad:
    print(f"error: {' '.join(bad)}: --steps takes a positive integer, --warmup a non-negative one", file=sys.stderr)
    raise SystemExit(2)
  steps, warmup = int(counts["steps"]), int(counts["warmup"])

  from bird_jax.host_memory import reuse_if_cpu

  reuse_if_cpu()  # as `python -m bird_jax.train` does, before the backend starts

  @exit_on_config_error
  def run():
    config, name, unknown = parse_config_flags(rest)
    if unknown:
      print(f"error: unknown arguments {unknown}; use --config=NAME, --steps=N, --warmup=N, --json=FILE",
            file=sys.stderr)
      raise SystemExit(2)
    r = measure(config, steps, warmup)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak for this device)"
    mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else "n/a"
    print(f"{name}: {r['params']:,} params on {r['devices']} x {r['device_kind']}, batch {r['batch']} x "
          f"{r['seq_len']} ({r['dtype']}, attention {r['attention_impl']}, remat {r['remat_policy']})\n"
          f"  compile {r['compile_s']:.1f} s; step {r['step_s'] * 1000:.0f} ms (median of {steps}; "
          f"{r['step_s_min'] * 1000:.0f}-{r['step_s_max'] * 1000:.0f})\n"
          f"  {r['tokens_per_s_per_device']:.0f} tokens/s/device, {r['tflops_per_device']:.1f} TFLOP/s/device, "
          f"MFU {mfu}, peak memory {mem}; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    if out:
      Path(out).write_text(json.dumps({"config": name, **r}, indent=2))

  run()


if __name__ == "__main__":
  main()
