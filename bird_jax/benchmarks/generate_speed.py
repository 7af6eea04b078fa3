"""Decode speed on this machine: our jitted KV-cache `generate` vs transformers' `Qwen2ForCausalLM.generate`.

  python -m bird_jax.benchmarks.generate_speed                        # batch 1 and 16, prompt 64, 64 new
  python -m bird_jax.benchmarks.generate_speed --batch_sizes=1 --json out.json

Both run the same decoder with the same weights: a random Qwen-VL decoder (default hidden 512, 8 layers,
8 heads of 64, SwiGLU branches 1408, vocab 32000) is exported to the Qwen-VL checkpoint layout with our
converter's own tensor mapping and loaded into `Qwen2ForCausalLM` (eager attention, float32) with the
../shared/reference/qwen_vl.md §5.1 table: c_attn split into q/k/v, w2 -> gate_proj, w1 -> up_proj,
intermediate = Qwen's / 2. Prompts are text only, equal lengths (no padding), greedy, no stop token, so both
produce exactly --new_tokens tokens per row, and their tokens are compared (the `match` column).

Timing: every configuration is run once untimed first (ours: that call includes the XLA compile, reported
as `compile s`), then --repeats timed runs (the fastest is kept). TTFT = a run with 1 new token (prefill +
first token; ours also runs one wasted decode step there); decode tok/s = batch * (new - 1) / (total - TTFT).
transformers runs in a child process that never imports jax (see `torch_worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bird_jax.benchmarks.common import BenchResult, versions


def _decoder_config(args: argparse.Namespace) -> Any:
  from bird_jax.model import QwenVLConfig

  # The vision tower is the tests' tiny one: text-only prompts never run it, but the param tree needs it.
  return QwenVLConfig.tiny(
    vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
    head_dim=args.hidden // args.heads, intermediate_size=2 * args.mlp, image_start_id=args.vocab - 10,
    initializer_range=args.init_scale, dtype="float32", param_dtype="float32")


def _qwen2_state_dict(cfg: Any, params: Any) -> dict[str, np.ndarray]:
  """Our params -> Qwen-VL checkpoint tensors (convert.checkpoint_entries, the importer's own mapping run
  backwards) -> Qwen2 names (qwen_vl.md §5.1)."""
  import flax.linen as nn

  from bird_jax.model.convert import checkpoint_entries

  flat = nn.unbox(params)
  hf: dict[str, np.ndarray] = {}
  for en in checkpoint_entries(cfg):
    if en.hf_name.startswith("transformer.visual."):
      continue
    leaves = []
    for path, _ in en.targets:
      node = flat
      for k in path:
        node = node[k]
      leaves.append(np.asarray(node, np.float32))
    hf[en.hf_name] = en.join(leaves)
  from bird_jax.model.qwen2_reference import qwen2_state_dict

  sd = qwen2_state_dict(hf, cfg)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _timed(fn, repeats: int) -> tuple[float, float, Any]:
  """(first-call seconds, fastest of `repeats` further calls, last result). The minimum, not the mean: other
  processes on the machine only ever add time."""
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return first, min(times), out


def _measure(fn, prompts: list[list[int]], new: int, repeats: int) -> dict[str, Any]:
  first_1, ttft, _ = _timed(lambda: fn(prompts, 1), repeats)
  first_n, total, toks = _timed(lambda: fn(prompts, new), repeats)
  if any(len(t) != new for t in toks):
    raise RuntimeError(f"got {[len(t) for t in toks]} tokens per row, expected {new}")
  b = len(prompts)
  return {
    "ttft_ms": 1000 * ttft,
    "total_s": total,
    "decode_tok_s": b * (new - 1) / (total - ttft) if total > ttft else float("nan"),
    "end_to_end_tok_s": b * new / total,
    # first call minus a warm call: the XLA compile for ours, one-off eager warm-up for transformers
    "compile_s": max(0.0, first_1 - ttft) + max(0.0, first_n - total),
    "tokens": toks,
  }


def torch_worker(work: Path) -> None:
  """transformers side, in its own process: torch's OpenMP pool and XLA's thread pool in one process slow
  torch down by an order of magnitude on a small machine, which would not be a fair comparison."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  job = json.loads((work / "job.json").read_text())
  qcfg = Qwen2Config(**job["qwen2_config"])
  model = Qwen2ForCausalLM(qcfg).eval().to(torch.float32)
  with np.load(work / "weights.npz") as w:
    model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files}, strict=True)

  def theirs(prompts: list[list[int]], new: int) -> list[list[int]]:
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()

  results = {str(len(pr)): _measure(theirs, pr, job["new_tokens"], job["repeats"]) for pr in job["prompts"]}
  info = {"decoder_params": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
          "torch": torch.__version__, "transformers": __import__("transformers").__version__}
  (work / "torch_result.json").write_text(json.dumps({"results": results, "info": info}))


def run(args: argparse.Namespace) -> dict[str, Any]:
  import jax

  from bird_jax.generate import generate
  from bird_jax.model import QwenVL, init_params

  cfg = _decoder_config(args)
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(args.seed))
  model = QwenVL(cfg)
  rng = np.random.default_rng(args.seed)
  n = args.new_tokens
  all_prompts = [rng.integers(0, cfg.vocab_size - 16, (b, args.prompt_len)).tolist() for b in args.batch_sizes]

  def ours(prompts: list[list[int]], new: int) -> list[list[int]]:
    return generate(model, params, prompts, None, max_new_tokens=new, stop_ids=(), pad_id=0)

  mine = {len(pr): _measure(ours, pr, n, args.repeats) for pr in all_prompts}
  with tempfile.TemporaryDirectory(prefix="generate_speed_") as tmp:
    work = Path(tmp)
    np.savez(work / "weights.npz", **_qwen2_state_dict(cfg, params))
    from bird_jax.model.qwen2_reference import qwen2_config_kwargs

    qwen2 = {**qwen2_config_kwargs(cfg), "max_position_embeddings": cfg.seq_length, "bos_token_id": None,
             "eos_token_id": None, "pad_token_id": 0}
    (work / "job.json").write_text(json.dumps({"qwen2_config": qwen2, "prompts": all_prompts, "new_tokens": n,
                                               "repeats": args.repeats}))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "bird_jax.benchmarks.generate_speed", "--torch_worker", str(work),
                    f"--threads={args.threads}"], check=True, env=env)
    theirs = json.loads((work / "torch_result.json").read_text())
  rows = []
  for b in args.batch_sizes:
    res: dict[str, Any] = {"batch": b, "bird_jax": mine[b], "transformers": theirs["results"][str(b)]}
    a, t = res["bird_jax"]["tokens"], res["transformers"]["tokens"]
    res["rows_matching"] = sum(x == y for x, y in zip(a, t, strict=True))
    res["match"] = res["rows_matching"] == b
    res["first_mismatch"] = next((min(i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v)
                                  for x, y in zip(a, t, strict=True) if x != y), None)
    res["decode_speedup"] = res["bird_jax"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
    res["ttft_speedup"] = res["transformers"]["ttft_ms"] / res["bird_jax"]["ttft_ms"]
    rows.append(res)
  return {
    "setup": {
      "hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
      "swiglu_branch": cfg.mlp_dim, "vocab": cfg.vocab_size, "prompt_len": args.prompt_len, "new_tokens": n,
      "repeats": args.repeats, "dtype": "float32", "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "threads": args.threads or os.cpu_count(), "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      **theirs["info"],
    },
    "rows": rows,
  }


def format_table(result: dict[str, Any]) -> str:
  s = result["setup"]
  lines = [
    f"decoder: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads x {s['head_dim']}, SwiGLU "
    f"{s['swiglu_branch']}, vocab {s['vocab']} ({s['decoder_params'] / 1e6:.1f}M params), {s['dtype']}; "
    f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new, greedy; {s['jax_backend']} "
    f"({s['cpu_count']} cores, {s['threads']} thread(s) each, torch threads {s['torch_threads']}); "
    f"jax {s['jax']}, torch {s['torch']}, "
    f"transformers {s['transformers']}",
    "",
    "| batch | implementation | TTFT (ms) | decode tok/s | total (s) | compile (s) |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    for name, label in (("bird_jax", "bird_jax generate (jit, KV cache)"),
                        ("transformers", "transformers Qwen2 generate (torch eager)")):
      m = r[name]
      lines.append(f"| {r['batch']} | {label} | {m['ttft_ms']:.1f} | {m['decode_tok_s']:.1f} | "
                   f"{m['total_s']:.3f} | {m['compile_s']:.1f} |")
  lines.append("")
  lines.append("| batch | decode speed-up | TTFT speed-up | same greedy tokens |")
  lines.append("|---:|---:|---:|---|")
  for r in result["rows"]:
    match = "yes" if r["match"] else (f"{r['rows_matching']}/{r['batch']} rows (first difference at token "
                                      f"{r['first_mismatch']})")
    lines.append(f"| {r['batch']} | {r['decode_speedup']:.2f}x | {r['ttft_speedup']:.2f}x | {match} |")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch_sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--mlp", type=int, default=1408, help="width of each SwiGLU branch (Qwen intermediate / 2)")
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--init_scale", type=float, default=0.02, help="std of the random weights")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=0,
                  help="CPU threads for both (0 = all cores). 1 gives comparable numbers on a busy machine, where "
                       "torch's OpenMP pool degrades far more than XLA's when other processes take the cores")
  ap.add_argument("--json", default=None, help="also write the numbers (and tokens) here")
  ap.add_argument("--torch_worker", default=None, help=argparse.SUPPRESS)
  return ap


def bench(toy: bool = False) -> BenchResult:
  """`python -m bird_jax.bench --only decode`: the default shapes at batch 1 and 8 (toy: a 2-layer decoder)."""
  argv = (["--batch_sizes=1,2", "--prompt_len=8", "--new_tokens=4", "--repeats=1", "--hidden=64", "--layers=2",
           "--heads=4", "--mlp=64", "--vocab=512"] if toy else ["--batch_sizes=1,8"])
  result = run(_parser().parse_args(argv))
  rows, summary = [], {}
  for r in result["rows"]:
    for name in ("bird_jax", "transformers"):
      m = r[name]
      rows.append({"batch": r["batch"], "implementation": name, "TTFT ms": m["ttft_ms"],
                   "decode tok/s": m["decode_tok_s"], "total s": m["total_s"], "compile s": m["compile_s"],
                   "same tokens": r["match"]})
    summary[f"decode_speedup_b{r['batch']}"] = r["decode_speedup"]
    summary[f"ttft_speedup_b{r['batch']}"] = r["ttft_speedup"]
  shapes = {k: v for k, v in result["setup"].items() if k not in ("cpu", "jax", "torch", "transformers")}
  return BenchResult(name="decode_vs_transformers", shapes={**shapes, "versions": versions()}, rows=rows,
                     summary=summary, notes=["greedy, no stop token: both sides emit exactly new_tokens per row"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  if args.threads > 0:  # before jax / torch start their thread pools
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.threads == 1:
      flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
  if args.torch_worker:
    torch_worker(Path(args.torch_worker))
    return {}
  result = run(args)
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
