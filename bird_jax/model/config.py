"""Qwen-VL model configuration: one frozen dataclass shared by the Flax model, the converter and generation.

Usage::

  cfg = QwenVLConfig.qwen_vl_chat_7b()                      # the released Qwen-VL(-Chat) shapes
  cfg = QwenVLConfig.tiny()                                 # a few-100k-param model for tests
  cfg = QwenVLConfig.from_hf_config(json.load(open(".../config.json")), dtype="bfloat16")
  cfg = QwenVLConfig(**ml_collections_config.model)         # plain keyword fields only
  cfg = dataclasses.replace(cfg, scan_layers=True, remat_policy="minimal")

Dtypes: parameters are created/loaded in `param_dtype`; activations and matmuls run in `dtype`;
RMSNorm/LayerNorm statistics, RoPE and softmax run in float32; logits are always float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "minimal", "dots", "dots_with_no_batch_dims")
# Self-attention kernels (bird_jax.model.attention_ops): "auto" = splash on TPU, cuDNN on GPU (bf16), XLA else.
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
RESAMPLER_INITS = ("qwen", "local")
# LoRA targets, named as their modules are in the Hugging Face Qwen-VL checkpoint (bird_jax.model.lora).
LORA_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  # --- language model (Qwen-7B decoder) ---
  vocab_size: int = 151936
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  head_dim: int = 128
  # Qwen convention: the SwiGLU has two branches of intermediate_size // 2 each.
  intermediate_size: int = 22016
  rms_norm_eps: float = 1e-6
  rope_base: float = 10000.0
  # Above this many tokens, inference uses logn query scaling / dynamic NTK (Qwen v1 behaviour).
  seq_length: int = 2048
  use_logn_attn: bool = True
  use_dynamic_ntk: bool = True
  # --- vision tower (ViT-bigG-like, no class token) ---
  vision_width: int = 1664
  vision_layers: int = 48
  vision_heads: int = 16
  vision_mlp_ratio: float = 4.9231
  patch_size: int = 14
  image_size: int = 448
  # Side of the ViT positional table (Qwen hard-codes 256 rows = 16x16), interpolated to the patch grid.
  vision_pos_grid: int = 16
  layer_norm_eps: float = 1e-6
  # --- resampler ---
  n_queries: int = 256
  # 0 -> hidden_size // 128 (Qwen's rule: output_dim // 128 heads, at least 1).
  resampler_heads: int = 0
  # Initialisation of a randomly initialised resampler (loaded checkpoints overwrite it either way):
  # "qwen": Qwen-VL's own (random queries, normal projections): its cross-attention starts as a near-uniform,
  #   permutation-invariant pooling, which a from-scratch model needs a long time to break (where is lost).
  # "local": each query starts as a pooling of the patches around its grid cell (heads from sharp to broad),
  #   through the frozen sin-cos positions already in the architecture; see resampler.local_attention_kernel.
  resampler_init: str = "qwen"
  # --- special ids ---
  image_start_id: int = 151857
  # --- numerics / memory ---
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  # "" -> same as remat_policy.
  vision_remat_policy: str = ""
  # Training / prefill self-attention of the decoder and the ViT; decode steps always use the cache path.
  attention_impl: str = "auto"
  initializer_range: float = 0.02
  # --- LoRA on the decoder's projections (bird_jax.model.lora); rank 0 = none ---
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self) -> None:
    for name in ("remat_policy", "vision_remat_policy"):
      value = getattr(self, name)
      if value and value not in REMAT_POLICIES:
        raise ValueError(f"QwenVLConfig.{name}={value!r}; use one of {REMAT_POLICIES}")
    if self.image_size % self.patch_size:
      raise ValueError(
        f"QwenVLConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
      )
    if self.vision_width % self.vision_heads:
      raise ValueError(
        f"QwenVLConfig: vision_width {self.vision_width} not divisible by vision_heads {self.vision_heads}"
      )
    if self.hidden_size % self.num_resampler_heads:
      raise ValueError(
        f"QwenVLConfig: hidden_size {self.hidden_size} not divisible by resampler heads "
        f"{self.num_resampler_heads}"
      )
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"QwenVLConfig.attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}")
    if self.resampler_init not in RESAMPLER_INITS:
      raise ValueError(f"QwenVLConfig.resampler_init={self.resampler_init!r}; use one of {RESAMPLER_INITS}")
    if int(round(self.n_queries**0.5)) ** 2 != self.n_queries:
      raise ValueError(f"QwenVLConfig: n_queries {self.n_queries} must be a square (resampler grid)")
    if self.intermediate_size % 2:
      raise ValueError(f"QwenVLConfig: intermediate_size {self.intermediate_size} must be even")
    if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"QwenVLConfig: lora_rank {self.lora_rank} must be >= 0 and lora_dropout "
                       f"{self.lora_dropout} in [0, 1)")
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if unknown or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"QwenVLConfig.lora_targets={tuple(self.lora_targets)}: use a non-empty subset of "
                       f"{LORA_TARGETS}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # fail early on typos

  # ---- derived sizes ----
  @property
  def mlp_dim(self) -> int:
    """Width of each SwiGLU branch (w1 / w2)."""
    return self.intermediate_size // 2

  @property
  def vision_mlp_dim(self) -> int:
    return int(self.vision_width * self.vision_mlp_ratio)

  @property
  def vision_head_dim(self) -> int:
    return self.vision_width // self.vision_heads

  @property
  def grid_size(self) -> int:
    """Patches per side of the image."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def num_resampler_heads(self) -> int:
    return self.resampler_heads or max(self.hidden_size // 128, 1)

  @property
  def image_end_id(self) -> int:
    return self.image_start_id + 1

  @property
  def image_pad_id(self) -> int:
    return self.image_start_id + 2

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ---- presets ----
  @classmethod
  def qwen_vl_chat_7b(cls, **overrides: Any) -> QwenVLConfig:
    """Qwen/Qwen-VL and Qwen/Qwen-VL-Chat (same shapes): 9.66B params."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides: Any) -> QwenVLConfig:
    """Seconds-to-compile model for tests: 56px image -> 4x4 patches, 9 queries (3x3), vocab 512.

    The sizes exercise both positional interpolations (ViT table 16x16 -> 4x4, resampler keys 3x3 -> 4x4).

    image_start_id sits inside the vocab (img_start=500, img_end=501, img_pad=502).
    """
    base = dict(
      vocab_size=512,
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      head_dim=16,
      intermediate_size=128,
      seq_length=2048,
      vision_width=32,
      vision_layers=2,
      vision_heads=2,
      vision_mlp_ratio=2.0,
      patch_size=14,
      image_size=56,
      vision_pos_grid=16,
      n_queries=9,
      resampler_heads=2,
      image_start_id=500,
    )
    base.update(overrides)
    return cls(**base)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> QwenVLConfig:
    """From a Qwen-VL `config.json` dict (model_type "qwen" with a "visual" block)."""
    try:
      vis = hf["visual"]
      hidden = hf["hidden_size"]
      heads = hf["num_attention_heads"]
      kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        head_dim=hf.get("kv_channels", hidden // heads),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        rope_base=float(hf.get("rotary_emb_base", 10000)),
        seq_length=hf.get("seq_length", 2048),
        use_logn_attn=bool(hf.get("use_logn_attn", True)),
        use_dynamic_ntk=bool(hf.get("use_dynamic_ntk", True)),
        vision_width=vis["width"],
        vision_layers=vis["layers"],
        vision_heads=vis["heads"],
        vision_mlp_ratio=vis["mlp_ratio"],
        patch_size=vis["patch_size"],
        image_size=vis["image_size"],
        n_queries=vis.get("n_queries", 256),
        vision_pos_grid=vis.get("pos_grid", 16),
        resampler_heads=vis.get("attn_pool_heads", 0),
        image_start_id=vis.get("image_start_id", 151857),
        initializer_range=hf.get("initializer_range", 0.02),
      )
    except KeyError as e:
      raise ValueError(
        f"Qwen-VL config.json lacks key {e}; expected a Qwen-VL (model_type 'qwen') config"
      ) from e
    if vis["output_dim"] != hidden:
      raise ValueError(f"Qwen-VL config.json: visual.output_dim {vis['output_dim']} != hidden_size {hidden}")
    if hf.get("rotary_pct", 1.0) != 1.0:
      raise ValueError(f"Qwen-VL config.json: rotary_pct {hf['rotary_pct']} unsupported (only 1.0)")
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """config.json dict in Qwen-VL's format (inverse of from_hf_config)."""
    visual = {
      "heads": self.vision_heads,
      "image_size": self.image_size,
      "image_start_id": self.image_start_id,
      "layers": self.vision_layers,
      "mlp_ratio": self.vision_mlp_ratio,
      "output_dim": self.hidden_size,
      "patch_size": self.patch_size,
      "width": self.vision_width,
    }
    # Qwen's code only knows the defaults; keep non-default sizes round-trippable
    if self.n_queries != 256:
      visual["n_queries"] = self.n_queries
    if self.vision_pos_grid != 16:
      visual["pos_grid"] = self.vision_pos_grid
    if self.num_resampler_heads != max(self.hidden_size // 128, 1):
      visual["attn_pool_heads"] = self.num_resampler_heads
    return {
      "architectures": ["QWenLMHeadModel"],
      "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
      },
      "attn_dropout_prob": 0.0,
      "emb_dropout_prob": 0.0,
      "bf16": False,
      "fp16": False,
      "fp32": False,
      "hidden_size": self.hidden_size,
      "initializer_range": self.initializer_range,
      "intermediate_size": self.intermediate_size,
      "kv_channels": self.head_dim,
      "layer_norm_epsilon": self.rms_norm_eps,
      "max_position_embeddings": 8192,
      "model_type": "qwen",
      "no_bias": True,
      "num_attention_heads": self.num_heads,
      "num_hidden_layers": self.num_layers,
      "onnx_safe": None,
      "rotary_emb_base": self.rope_base,
      "rotary_pct": 1.0,
      "scale_attn_weights": True,
      "seq_length": self.seq_length,
      "tie_word_embeddings": False,
      "tokenizer_type": "QWenTokenizer",
      "torch_dtype": {"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype, "float32"),
      "use_cache": True,
      "use_dynamic_ntk": self.use_dynamic_ntk,
      "use_flash_attn": False,
      "use_logn_attn": self.use_logn_attn,
      "visual": visual,
      "vocab_size": self.vocab_size,
    }
