"""A LoRA run's adapters in the layout `peft` saves for Qwen-VL: `adapter_model.safetensors` (lora_A/lora_B of each
adapted decoder module, and the trained resampler as `modules_to_save`) + `adapter_config.json`, which
`PeftModel.from_pretrained` loads onto the original Qwen-VL(-Chat). The adapters themselves: bird_jax.model.lora."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bird_jax.model.config import QwenVLConfig
from bird_jax.model.convert import _hf_tensor, _write_safetensors, checkpoint_entries
from bird_jax.model.lora import FLAX_MODULE

# The targets' module paths inside a decoder layer of the original model (peft's module names).
TORCH_MODULE = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "w1": "mlp.w1", "w2": "mlp.w2",
                "mlp.c_proj": "mlp.c_proj"}
# Trained in full beside the adapters (BiRD trains the resampler), saved as peft's `modules_to_save`.
PEFT_MODULES_TO_SAVE = ("attn_pool",)


def _layers(llm: dict, cfg: QwenVLConfig) -> list[tuple[dict, int | None]]:
  """(layer params, index into a leading layer axis or None) for each decoder layer."""
  if cfg.scan_layers:
    return [(llm["h"], i) for i in range(cfg.num_layers)]
  return [(llm[f"h_{i}"], None) for i in range(cfg.num_layers)]


def peft_target_regex(targets: Sequence[str]) -> str:
  """peft full-matches a str target_modules against module names: only the decoder's projections match (a bare
  "mlp.c_proj" would also match the ViT's mlp.c_proj)."""
  alternatives = "|".join(re.escape(TORCH_MODULE[t]) for t in targets)
  return rf"transformer\.h\.\d+\.({alternatives})"


def peft_config(cfg: QwenVLConfig, base_model: str | os.PathLike | None, *, modules_to_save: bool) -> dict[str, Any]:
  return {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
    "lora_dropout": cfg.lora_dropout, "target_modules": peft_target_regex(cfg.lora_targets), "bias": "none",
    "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
    "modules_to_save": list(PEFT_MODULES_TO_SAVE) if modules_to_save else None,
    "base_model_name_or_path": str(base_model) if base_model else None, "revision": None,
  }


def peft_tensors(params: dict, cfg: QwenVLConfig, *, modules_to_save: bool) -> dict[str, np.ndarray]:
  """The adapters (and the resampler when it was trained) under the names `peft` saves for a Qwen-VL model:
  base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight [r, in], ….lora_B.weight [out, r], and
  base_model.model.transformer.visual.attn_pool.* in the checkpoint's own layout."""
  out: dict[str, np.ndarray] = {}
  for i, (layer_params, layer) in enumerate(_layers(params["llm"], cfg)):
    for target in cfg.lora_targets:
      module, name = FLAX_MODULE[target]
      ad = layer_params[module][name]
      a, b = (np.asarray(jax.device_get(nn.unbox(ad[k])), np.float32) for k in ("a", "b"))
      if layer is not None:
        a, b = a[layer], b[layer]
      prefix = f"base_model.model.transformer.h.{i}.{TORCH_MODULE[target]}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, cfg.lora_rank).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(cfg.lora_rank, -1).T)
  if modules_to_save:
    for en in checkpoint_entries(cfg):
      if en.hf_name.startswith("transformer.visual.attn_pool."):
        out[f"base_model.model.{en.hf_name}"] = _hf_tensor(params, cfg, en, np.dtype(np.float32))
  return out


def write_peft(params: dict, cfg: QwenVLConfig, out_dir: str | os.PathLike, *,
               base_model: str | os.PathLike | None, modules_to_save: bool = True) -> list[Path]:
  """Writes `adapter_model.safetensors` + `adapter_config.json` (what `PeftModel.from_pretrained` reads)."""
  if not cfg.lora_rank:
    raise ValueError("this run has no LoRA adapters (lora.rank=0): export the full weights instead")
  out = Path(out_dir)
  written = []
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  tensors = sorted(peft_tensors(params, cfg, modules_to_save=modules_to_save).items())
  if jax.process_index() == 0:
    _write_safetensors(out / "adapter_model.safetensors", tensors)
    (out / "adapter_config.json").write_text(
      json.dumps(peft_config(cfg, base_model, modules_to_save=modules_to_save), indent=2) + "\n")
    written = [out / "adapter_model.safetensors", out / "adapter_config.json"]
  return written
