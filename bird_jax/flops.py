"""FLOPs of one train step counted from the model's shapes, and the peak FLOP/s of the chip it runs on (MFU).

Conventions (MaxText's `calculate_tflops_training_per_device`, ../shared/reference/scale_techniques.md §5): a
matmul costs 2 FLOPs per multiply-add in the forward pass; backward costs twice that for a layer whose weights
train and whose input needs a gradient (6 per parameter per token in all), 2 more for only one of the two (4 in
all), nothing for a frozen layer nothing upstream of it trains (the frozen ViT trunk: forward only). Attention
scores and values cost 4·L²·width per row forward, halved for causal attention (`causal_half`; what a kernel
that skips masked blocks does; XLA's dense path computes the full square); recomputation (remat) is not
counted, so MFU stays comparable with the literature.
"""

from __future__ import annotations

import dataclasses

# Peak dense bf16 FLOP/s per device as `jax.devices()[0].device_kind` names it (a v4 / v5p megacore device is
# one chip). Order matters: the first substring that matches wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, None where unknown (CPU: use a measured matmul peak)."""
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


@dataclasses.dataclass(frozen=True)
class StepFlops:
  llm: float
  vit: float
  resampler: float

  @property
  def total(self) -> float:
    return self.llm + self.vit + self.resampler


def _mult(trained: bool, needs_input_grad: bool) -> int:
  return 2 + 2 * int(trained) + 2 * int(needs_input_grad)


def train_step_flops(cfg, *, batch: int, seq_len: int, images_per_row: int, train_vit: bool = False,
                     train_resampler: bool = True, train_llm: bool = True, causal_half: bool = True) -> StepFlops:
  """FLOPs of one optimizer step over `batch` rows of `seq_len` tokens with `images_per_row` image slots each
  (every slot runs through the vision tower, used or not). cfg: a QwenVLConfig. With LoRA (cfg.lora_rank) the
  decoder's base weights are frozen (its activations still need gradients) and the adapters train."""
  tokens = batch * seq_len
  e, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  # Decoder: q, k, v, o projections and the SwiGLU per layer; the LM head. The embedding is a gather.
  layer = 4 * e * hd + 3 * e * cfg.mlp_dim
  train_llm = train_llm and not cfg.lora_rank
  llm_mult = _mult(train_llm, True)
  llm = 2 * tokens * (cfg.num_layers * layer + e * cfg.vocab_size) * llm_mult // 2
  if cfg.lora_rank:  # A [in, r] and B [r, out] of each adapter, trained
    sizes = {"c_attn": e + 3 * hd, "attn.c_proj": hd + e, "w1": e + cfg.mlp_dim, "w2": e + cfg.mlp_dim,
             "mlp.c_proj": cfg.mlp_dim + e}
    adapter = cfg.lora_rank * sum(sizes[t] for t in cfg.lora_targets)
    llm += 2 * tokens * cfg.num_layers * adapter * _mult(True, True) // 2
  attn_fwd = 4 * batch * seq_len**2 * hd * cfg.num_layers * (0.5 if causal_half else 1.0)
  llm += attn_fwd * (3 if (train_llm or train_resampler or train_vit) else 1)

  images = batch * images_per_row
  n = cfg.num_patches
  w, m = cfg.vision_width, cfg.vision_mlp_dim
  vit_params = cfg.vision_layers * (4 * w * w + 2 * w * m) + cfg.patch_size**2 * 3 * w
  vit_mult = _mult(train_vit, train_vit)  # the patch input never needs a gradient; layers above it do if trained
  vit = images * (2 * n * vit_params * vit_mult // 2 + 4 * n * n * w * cfg.vision_layers * (3 if train_vit else 1))

  # Resampler: kv_proj on the patch tokens, k/v on the patches, q/out on the queries, then ln_post and proj.
  q = cfg.n_queries
  res = images * (
    2 * n * w * e * _mult(train_resampler, train_vit) // 2
    + 2 * (2 * n * e * e + 2 * q * e * e) * _mult(train_resampler, train_vit or train_resampler) // 2
    + 4 * q * n * e * (3 if (train_resampler or train_vit) else 1)
    + 2 * q * e * e * _mult(train_vit, train_vit or train_resampler) // 2
  )
  return StepFlops(llm=float(llm), vit=float(vit), resampler=float(res))
