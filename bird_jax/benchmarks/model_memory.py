"""Parameter counts per tower and the memory of params / grads / Adam state, from shapes only (no allocation).

  python -m bird_jax.benchmarks.model_memory                 # Qwen-VL-Chat 7B shapes
  python -m bird_jax.benchmarks.model_memory --preset tiny --json out.json
  python -m bird_jax.benchmarks.model_memory --import-ram   # peak host RAM of load_pretrained (~1 GB ckpt)

Counts come from `jax.eval_shape` of the real model init, so they track the code. Trainable = the default
SFT mask (`trainable_mask`: ViT trunk, ln_post and proj frozen; resampler except pos_embed and the LLM
trained). Memory assumes params and Adam moments in `--param-bytes` each (4 = float32) and gradients only
for trainable params; activations are not included (they depend on batch, length and remat policy).

--import-ram: writes a synthetic Qwen-VL HF checkpoint (random params of a ~0.46B-param config, bf16,
sharded safetensors + index json, real tensor names/layouts via `export_hf`) to a temp dir, then for each
`--dtypes` entry imports it with `load_pretrained(dir, dtype=...)` in a fresh subprocess and reports that
process's peak RSS minus its RSS just before the call (after imports and backend start), as a ratio to the
model's size in the target dtype. Peak = VmHWM of /proc/self/status, reset right before loading (clear_refs);
ru_maxrss where that is unavailable. Target: ~1x (<= 1.3x). The temp dir is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bird_jax.host_memory import proc_status_kib
from bird_jax.model import QwenVLConfig, abstract_params, trainable_mask


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def breakdown(cfg: QwenVLConfig) -> dict[str, int]:
  params = nn.unbox(abstract_params(cfg))
  vis, llm = params["visual"], params["llm"]
  trunk = {k: v for k, v in vis.items() if k not in ("attn_pool", "ln_post", "proj")}
  blocks = {k: v for k, v in llm.items() if k not in ("wte", "ln_f", "lm_head")}
  mask = trainable_mask(params)
  trainable = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                                         strict=True) if m)
  return {
      "vit_trunk": _count(trunk),
      "resampler": _count(vis["attn_pool"]),
      "ln_post_proj": _count(vis["ln_post"]) + _count(vis["proj"]),
      "visual_total": _count(vis),
      "llm_embed": _count(llm["wte"]),
      "llm_blocks": _count(blocks),
      "llm_head_and_ln_f": _count(llm["lm_head"]) + _count(llm["ln_f"]),
      "llm_total": _count(llm),
      "total": _count(params),
      "trainable_default_sft": trainable,
  }


RAM_TARGET = 1.3  # peak extra host RAM / model size in the target dtype counted as "~1x"


def import_ram_config(**overrides: Any) -> QwenVLConfig:
  """~0.46B params (0.92 GB in bf16): Qwen-VL's structure at small width, quick to write and read."""
  base = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    head_dim=64,
    intermediate_size=5632,
    vision_width=768,
    vision_layers=12,
    vision_heads=12,
    vision_mlp_ratio=4.0,
    image_size=224,
    n_queries=64,
    resampler_heads=8,
    image_start_id=31900,
  )
  base.update(overrides)
  return QwenVLConfig.tiny(**base)


def _random_params(cfg: QwenVLConfig, seed: int = 0) -> Any:
  """Random numpy params (bf16) with the model's tree structure, one leaf at a time (no jax init)."""
  import ml_dtypes

  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16),
    nn.unbox(abstract_params(cfg)),
  )


def _rss_kib() -> int:
  rss = proc_status_kib("VmRSS")
  if rss is None:
    import psutil

    rss = psutil.Process().memory_info().rss // 1024
  return rss


def _import_ram_child(ckpt: str, dtype: str) -> None:
  """Runs in the subprocess: baseline RSS, load_pretrained, peak RSS; prints one JSON line."""
  import gc

  from bird_jax.model.convert import load_pretrained

  jax.devices()  # start the backend before the baseline
  jax.block_until_ready(jax.numpy.zeros(8))
  gc.collect()
  try:  # reset the peak (VmHWM) to the current RSS, so imports don't count
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
    peak_src = "VmHWM"
  except OSError:
    peak_src = "ru_maxrss"
  base = _rss_kib()
  t0 = time.perf_counter()
  cfg, params = load_pretrained(ckpt, dtype=dtype)
  jax.block_until_ready(params)
  secs = time.perf_counter() - t0
  hwm = proc_status_kib("VmHWM") if peak_src == "VmHWM" else None
  peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  print(json.dumps({
    "dtype": dtype, "model_bytes": model_bytes, "baseline_kib": base, "peak_kib": peak,
    "after_kib": _rss_kib(), "seconds": secs, "peak_source": peak_src,
  }))


def import_ram(dtypes: list[str], shard_mib: int = 256, keep: str | None = None) -> list[dict[str, Any]]:
  """Writes the synthetic checkpoint, measures each dtype in a fresh subprocess, prints a table."""
  from bird_jax.model.convert import export_hf

  cfg = import_ram_config()
  tmp = keep or tempfile.mkdtemp(prefix="bird_jax_import_ram_")
  rows = []
  try:
    t0 = time.perf_counter()
    params = _random_params(cfg)
    files = export_hf(params, cfg, tmp, shard_size=shard_mib * 2**20, dtype="bfloat16")
    del params  # the child must not inherit a large parent (fork copies the parent's RSS high-water mark)
    ckpt_bytes = sum(f.stat().st_size for f in files)
    n = breakdown(cfg)["total"]
    print(f"synthetic checkpoint: {n:,d} params, {len(files)} bf16 safetensors shards, "
          f"{ckpt_bytes / 2**30:.2f} GiB, written in {time.perf_counter() - t0:.0f}s")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for dt in dtypes:
      out = subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.model_memory", "--_import-ram-child",
                            tmp, dt], check=True, capture_output=True, text=True, env=env)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  finally:
    if keep is None:
      shutil.rmtree(tmp, ignore_errors=True)
  gib = 2.0**30
  print(f"{'dtype':9s} {'model GiB':>9s} {'baseline':>9s} {'peak':>9s} {'peak-base':>9s} {'ratio':>6s} "
        f"{'kept':>6s} {'load s':>7s}  meets <= {RAM_TARGET}x")
  for r in rows:
    model = r["model_bytes"] / gib
    extra = (r["peak_kib"] - r["baseline_kib"]) * 1024 / gib
    r["ratio"] = extra * gib / r["model_bytes"]
    r["kept_ratio"] = (r["after_kib"] - r["baseline_kib"]) * 1024 / r["model_bytes"]
    r["meets_target"] = r["ratio"] <= RAM_TARGET
    print(f"{r['dtype']:9s} {model:9.3f} {r['baseline_kib'] / 2**20:9.3f} {r['peak_kib'] / 2**20:9.3f} "
          f"{extra:9.3f} {r['ratio']:5.2f}x {r['kept_ratio']:5.2f}x {r['seconds']:7.1f}  "
          f"{'yes' if r['meets_target'] else 'NO'}")
  print("(GiB; peak-base = peak RSS during load_pretrained minus RSS just before it; ratio = that / model size "
        "in the dtype; kept = RSS still held after loading / model size)")
  return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="qwen_vl_chat_7b", choices=["qwen_vl_chat_7b", "tiny"])
  ap.add_argument("--param-bytes", type=int, default=4, help="bytes per param / Adam moment (4 = fp32)")
  ap.add_argument("--json", default=None, help="also write the numbers here")
  ap.add_argument("--import-ram", action="store_true",
                  help="measure peak host RAM of load_pretrained on a synthetic ~1 GB checkpoint instead")
  ap.add_argument("--dtypes", default="float32,bfloat16", help="--import-ram: target dtypes, comma-separated")
  ap.add_argument("--shard-mib", type=int, default=256, help="--import-ram: safetensors shard size")
  ap.add_argument("--_import-ram-child", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._import_ram_child:
    _import_ram_child(*args._import_ram_child)
    return {}
  if args.import_ram:
    rows = import_ram(args.dtypes.split(","), shard_mib=args.shard_mib)
    out = {"import_ram": rows, "target_ratio": RAM_TARGET}
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)
    return out
  cfg = getattr(QwenVLConfig, args.preset)()
  counts = breakdown(cfg)
  gib = 2.0 ** 30
  b = args.param_bytes
  memory = {
      "params_gib": counts["total"] * b / gib,
      "grads_gib": counts["trainable_default_sft"] * b / gib,
      "adam_moments_gib": 2 * counts["trainable_default_sft"] * b / gib,
  }
  memory["total_gib"] = sum(memory.values())
  for k, v in counts.items():
    print(f"{k:24s} {v:>15,d}  ({v / 1e9:.3f} B)")
  for k, v in memory.items():
    print(f"{k:24s} {v:15.2f}")
  out = {"preset": args.preset, "param_bytes": b, "counts": counts, "memory": memory}
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=2)
  return out


if __name__ == "__main__":
  main()
