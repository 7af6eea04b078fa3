"""Qwen-VL in Flax Linen: vision tower + resampler + Qwen decoder.

How to call::

  from bird_jax.model import QwenVL, QwenVLConfig, init_params
  cfg = QwenVLConfig.tiny()                         # or QwenVLConfig.qwen_vl_chat_7b() / load_pretrained(...)
  model = QwenVL(cfg)
  params = init_params(cfg, jax.random.key(0))      # {"visual": ..., "llm": ...}; LogicallyPartitioned leaves
  logits = model.apply({"params": params}, input_ids, pixel_values,           # [B, L] int32, [B, N, S, S, 3]
                       positions=None, segment_ids=segment_ids)               # -> [B, L, V] float32

`pixel_values[b, k]` is the k-th image of row b (CLIP-normalised, channels last, S = cfg.image_size, from
`bird_jax.data.image.preprocess_image`); its cfg.n_queries features overwrite the rows right after the k-th
`<img>` (cfg.image_start_id) of row b. Rows without images can carry zero images (computed, then unused).
Params come back boxed in `nn.LogicallyPartitioned` from init (use `nn.get_partition_spec` /
`nn.logical_to_mesh_sharding`, then `nn.unbox`); apply accepts boxed or plain arrays.

Param tree (full listing in vit.py, resampler.py, qwen.py):
  visual/{conv1,positional_embedding,ln_pre,resblocks[_i]}                      ViT trunk     -> frozen in SFT
  visual/attn_pool/*                                                            resampler     -> trained
  visual/attn_pool/pos_embed                                                    fixed sin-cos -> ALWAYS frozen
  visual/ln_post, visual/proj                                                   after pool    -> frozen
  llm/wte, llm/h[_i], llm/ln_f, llm/lm_head                                     decoder       -> trained
(The official Qwen-VL finetune.py and BiRD stage 2 freeze `transformer.visual` except `attn_pool`;
`trainable_mask` below encodes exactly that.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.lora import is_lora_path
from bird_jax.model.qwen import QwenLM
from bird_jax.model.vit import VisionTower

Array = jax.Array


class QwenVL(nn.Module):
  config: QwenVLConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    pixel_values: Array | None = None,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    image_features: Array | None = None,
    **lm_kwargs: Any,
  ) -> Array | tuple[Array, Any]:
    """input_ids [B, L]; pixel_values [B, N, S, S, 3] or None; or image_features [B, N, n_queries, E]
    precomputed by `encode_images` (then pixel_values must be None). lm_kwargs go to `QwenLM.__call__`
    (KV-cache modes, inference=True for logn/NTK, return_hidden=True for a chunked loss)."""
    cfg = self.config
    feats, n_images = None, 0
    if pixel_values is not None:
      if image_features is not None:
        raise ValueError("pass pixel_values or image_features, not both")
      if pixel_values.ndim != 5:
        raise ValueError(f"pixel_values must be [B, N, S, S, 3], got shape {pixel_values.shape}")
      b, n_images = pixel_values.shape[:2]
      flat = pixel_values.reshape((b * n_images,) + pixel_values.shape[2:])
      feats = VisionTower(cfg, name="visual")(flat).reshape(b, n_images * cfg.n_queries, cfg.hidden_size)
    elif image_features is not None:
      b, n_images = image_features.shape[:2]
      feats = image_features.reshape(b, n_images * cfg.n_queries, cfg.hidden_size)
    return QwenLM(cfg, name="llm")(
      input_ids,
      positions=positions,
      segment_ids=segment_ids,
      image_features=feats,
      n_images=n_images,
      **lm_kwargs,
    )


def dummy_inputs(
  cfg: QwenVLConfig, batch: int = 1, length: int = 8, n_images: int = 1
) -> tuple[jnp.ndarray, jnp.ndarray]:
  ids = jnp.zeros((batch, length), jnp.int32)
  px = jnp.zeros((batch, n_images, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return ids, px


def init_params(cfg: QwenVLConfig, rng: Array) -> dict[str, Any]:
  """Random params for both towers (boxed with logical axis names). Cheap to jit/eval_shape."""
  ids, px = dummy_inputs(cfg)
  return QwenVL(cfg).init(rng, ids, px)["params"]


def abstract_params(cfg: QwenVLConfig) -> dict[str, Any]:
  """ShapeDtypeStructs (boxed) of the params without allocating them, e.g. for shardings or param counts."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def encode_images(cfg: QwenVLConfig, visual_params: Any, pixel_values: Array) -> Array:
  """params["visual"], [N, S, S, 3] -> [N, n_queries, hidden] (what gets written into the token stream)."""
  return VisionTower(cfg).apply({"params": visual_params}, pixel_values)


def trainable_mask(
  params: Any, *, train_vit: bool = False, train_resampler: bool = True, train_llm: bool = True
) -> Any:
  """Pytree of bools matching `params` (boxed or not) for optax.masked / multi_transform.

  Default = official Qwen-VL SFT / BiRD stage 2: ViT trunk, ln_post and proj frozen; attn_pool and the LLM
  trained; attn_pool/pos_embed is never trained (a fixed sin-cos table in the original). LoRA adapters
  (`*_lora` leaves, bird_jax.model.lora) are always trained; with them, pass train_llm=False to freeze the base.
  """

  def decide(path: tuple[Any, ...], _: Any) -> bool:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if is_lora_path(keys):
      return True
    if keys[:1] == ["llm"]:
      return train_llm
    if keys[:2] == ["visual", "attn_pool"]:
      return train_resampler and keys[2:3] != ["pos_embed"]
    if keys[:1] == ["visual"]:
      return train_vit
    raise ValueError(f"unexpected param path {'/'.join(map(str, keys))}")

  return jax.tree_util.tree_map_with_path(decide, params)


def param_count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))
