"""LoRA for the Qwen decoder: the adapter layer, its targets and merging adapters into the base weights (their
PEFT layout, `adapter_model.safetensors` + `adapter_config.json`, is written by bird_jax.model.lora_export).

A target is named as its module is in the Hugging Face Qwen-VL checkpoint, which is what `peft` users write:

  c_attn       attn/{query,key,value}   A (E, r) shared by q, k and v;  B (r, 3, H, D)
  attn.c_proj  attn/c_proj              A (H, D, r);                    B (r, E)
  w1, w2       mlp/w1, mlp/w2           A (E, r);                       B (r, F)
  mlp.c_proj   mlp/c_proj               A (F, r);                       B (r, E)

The original's c_attn is ONE Linear producing [q | k | v]; our model splits it into three projections, so its
adapter is one A with one B over the three outputs: then a PEFT file of Qwen-VL expresses it exactly.
Params: a sibling of the projection named `<projection>_lora` with leaves `a` and `b`
(llm/h_3/attn/c_attn_lora/a; scan_layers: llm/h/attn/c_attn_lora/a with a leading layer axis).

  y = W x + (alpha / r) · B A dropout(x),   A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming-uniform, a=√5),  B = 0

so at step 0 the model is the base model. Adapters are float32 whatever the base weights are stored in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bird_jax.model.config import LORA_TARGETS, QwenVLConfig

Array = jax.Array
SUFFIX = "_lora"
# Where each target's adapter lives in our decoder layer: (sub-module, adapter name).
FLAX_MODULE = {"c_attn": ("attn", "c_attn_lora"), "attn.c_proj": ("attn", "c_proj_lora"),
               "w1": ("mlp", "w1_lora"), "w2": ("mlp", "w2_lora"), "mlp.c_proj": ("mlp", "c_proj_lora")}


class LoRA(nn.Module):
  """The low-rank update beside a frozen projection over the trailing `len(in_names)` dims of x:
  x [..., *in] -> (alpha / rank) · dropout(x) A B  [..., *out_features]. Dropout only when the caller passes a
  "dropout" rng (training); evaluation and generation are deterministic."""

  rank: int
  alpha: float
  dropout: float
  in_names: tuple[str | None, ...]
  out_features: tuple[int, ...]
  out_names: tuple[str | None, ...]
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_names)
    in_shape = tuple(x.shape[x.ndim - n_in:])
    fan_in = int(np.prod(in_shape))
    bound = 1.0 / np.sqrt(fan_in)
    a = self.param("a", nn.with_logical_partitioning(
      lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound), self.in_names + (None,)),
      in_shape + (self.rank,), jnp.float32)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.out_names),
                   (self.rank,) + tuple(self.out_features), jnp.float32)
    if self.dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(self.dropout, deterministic=False)(x)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    xa = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), ((contract, tuple(range(n_in))), ((), ())))
    xa = xa * jnp.asarray(self.alpha / self.rank, self.dtype)  # scaled on [.., r], the cheapest place
    return jax.lax.dot_general(xa, b.astype(self.dtype), (((xa.ndim - 1,), (0,)), ((), ())))


def adapter(cfg: QwenVLConfig, target: str, in_names: Sequence[str | None], out_features: Sequence[int],
            out_names: Sequence[str | None]) -> LoRA | None:
  """The adapter of `target` in this layer, or None when LoRA is off or `target` is not adapted."""
  if not cfg.lora_rank or target not in cfg.lora_targets:
    return None
  return LoRA(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(in_names), tuple(out_features),
              tuple(out_names), cfg.compute_dtype, name=FLAX_MODULE[target][1])


def is_lora_path(keys: Sequence[Any]) -> bool:
  return any(str(k).endswith(SUFFIX) for k in keys)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def lora_mask(params: Any) -> Any:
  """Bool pytree over params: which leaves are adapters."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(_keys(p)), params)


def without_adapters(tree: dict) -> dict:
  """The tree with every `*_lora` sub-tree dropped (what the base model's code and checkpoints know)."""
  return {k: (without_adapters(v) if isinstance(v, dict) else v) for k, v in tree.items() if not k.endswith(SUFFIX)}


def _delta(ad: dict, scanned: bool) -> Array:
  """Scale-free A·B of one adapter in float32, in our kernel layout [(layers,) *in, *out]."""
  product = lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  a, b = nn.unbox(ad["a"]), nn.unbox(ad["b"])
  return jax.vmap(product)(a, b) if scanned else product(a, b)


def merge_adapters(params: dict, cfg: QwenVLConfig) -> dict:
  """Params with each adapter folded into its projection (W + alpha/r · A B, summed in float32, cast back to W's
  dtype) and the adapters dropped: the plain Qwen-VL tree that the base model, generation and `export_hf` read.
  Runs as array ops where the params live (sharded stays sharded)."""
  if not cfg.lora_rank:
    return params
  scale = cfg.lora_alpha / cfg.lora_rank
  merged = without_adapters(params)
  layers = [("h",)] if cfg.scan_layers else [(f"h_{i}",) for i in range(cfg.num_layers)]
  for (root,) in layers:
    src, dst = params["llm"][root], merged["llm"][root]
    for target in cfg.lora_targets:
      module, name = FLAX_MODULE[target]
      d = scale * _delta(src[module][name], cfg.scan_layers)
      projections = ("query", "key", "value") if target == "c_attn" else (name[: -len(SUFFIX)],)
      for j, proj in enumerate(projections):
        w = nn.unbox(dst[module][proj]["kernel"])
        part = jnp.take(d, j, axis=-3) if target == "c_attn" else d  # c_attn: [.., E, 3, H, D]
        dst[module][proj]["kernel"] = (w.astype(jnp.float32) + part).astype(w.dtype)
  return merged


__all__ = ["LORA_TARGETS", "LoRA", "adapter", "is_lora_path", "lora_mask", "merge_adapters", "without_adapters"]
