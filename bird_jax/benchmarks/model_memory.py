"""Parameter counts per tower and the memory of params / grads / Adam state, from shapes only (no allocation).

  python -m bird_jax.benchmarks.model_memory                 # Qwen-VL-Chat 7B shapes
  python -m bird_jax.benchmarks.model_memory --preset tiny --json out.json

Counts come from `jax.eval_shape` of the real model init, so they track the code. Trainable = the default
SFT mask (`trainable_mask`: ViT trunk, ln_post and proj frozen; resampler except pos_embed and the LLM
trained). Memory assumes params and Adam moments in `--param-bytes` each (4 = float32) and gradients only
for trainable params; activations are not included (they depend on batch, length and remat policy).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="qwen_vl_chat_7b", choices=["qwen_vl_chat_7b", "tiny"])
  ap.add_argument("--param-bytes", type=int, default=4, help="bytes per param / Adam moment (4 = fp32)")
  ap.add_argument("--json", default=None, help="also write the numbers here")
  args = ap.parse_args(argv)
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
