"""Qwen-VL decoder tensors → `transformers.Qwen2ForCausalLM` (the offline numerical reference).

Qwen v1 and Qwen2 compute the same decoder for prefill ≤ 2048 tokens in fp32 (../shared/reference/qwen_vl.md
§5.1); only the names and two layouts differ: `c_attn` holds contiguous [q | k | v] row blocks, and Qwen's
SwiGLU gate is `w2` (it goes through SiLU) while `w1` is the up projection. Used by the parity tests and the
decode benchmark, so both compare against exactly one mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bird_jax.model.config import QwenVLConfig


def qwen2_config_kwargs(cfg: QwenVLConfig) -> dict[str, Any]:
  """Keyword arguments for `transformers.Qwen2Config` describing the same decoder (no GQA, eager attention)."""
  return dict(
    vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
    rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
    tie_word_embeddings=False, use_sliding_window=False, attn_implementation="eager",
  )


def qwen2_state_dict(hf: Mapping[str, Any], cfg: QwenVLConfig) -> dict[str, Any]:
  """Qwen-VL checkpoint tensors (numpy or torch) → Qwen2ForCausalLM state dict (same array type)."""
  e = cfg.hidden_size
  sd = {
    "model.embed_tokens.weight": hf["transformer.wte.weight"],
    "model.norm.weight": hf["transformer.ln_f.weight"],
    "lm_head.weight": hf["lm_head.weight"],
  }
  for i in range(cfg.num_layers):
    t, q = f"transformer.h.{i}.", f"model.layers.{i}."
    for j, n in enumerate(("q", "k", "v")):
      sd[q + f"self_attn.{n}_proj.weight"] = hf[t + "attn.c_attn.weight"][j * e:(j + 1) * e]
      sd[q + f"self_attn.{n}_proj.bias"] = hf[t + "attn.c_attn.bias"][j * e:(j + 1) * e]
    sd[q + "self_attn.o_proj.weight"] = hf[t + "attn.c_proj.weight"]
    sd[q + "mlp.gate_proj.weight"] = hf[t + "mlp.w2.weight"]
    sd[q + "mlp.up_proj.weight"] = hf[t + "mlp.w1.weight"]
    sd[q + "mlp.down_proj.weight"] = hf[t + "mlp.c_proj.weight"]
    sd[q + "input_layernorm.weight"] = hf[t + "ln_1.weight"]
    sd[q + "post_attention_layernorm.weight"] = hf[t + "ln_2.weight"]
  return sd
