"""PyTorch Qwen-VL(-Chat) with the original `QWenLMHeadModel` module tree: an oracle whose names are the checkpoint's.

`OriginalQwenVL` re-implements the Hugging Face remote code (`modeling_qwen.py` + `visual.py`,
../shared/reference/qwen_vl.md) so that every parameter name equals a Qwen-VL checkpoint tensor name:
`load_state_dict(hf_state_dict, strict=True)` works on the tensors as stored, and `peft` can attach LoRA by the
original module names (`transformer.h.0.attn.c_attn`, `mlp.w1` / `w2` / `c_proj`, `transformer.visual.attn_pool`).

  transformer.wte                                 Embedding
  transformer.h[i].{ln_1, ln_2}                   RMSNorm (float32 compute, weight applied after the cast back)
  transformer.h[i].attn.{c_attn, c_proj}          c_attn rows [q | k | v] with bias; c_proj without
  transformer.h[i].mlp.{w1, w2, c_proj}           c_proj(w1(x) * silu(w2(x))), no biases
  transformer.ln_f, lm_head                       untied head
  transformer.visual.{conv1, positional_embedding, ln_pre, transformer.resblocks[i], attn_pool, ln_post, proj}

Unlike `bird_jax.benchmarks.torch_qwen_vl.TorchQwenVL` (transformers parts, renamed weights) it has its own decoder
and ViT attention, so no weight is reshaped or renamed on the way in. Float32, eval-mode numerics of the original:
logn query scaling and dynamic NTK only act (at inference) on prompts longer than `seq_length`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bird_jax.benchmarks.torch_qwen_vl import _interp_table
from bird_jax.model import QwenVLConfig


def _as_config(cfg: QwenVLConfig | Mapping[str, Any]) -> QwenVLConfig:
  return cfg if isinstance(cfg, QwenVLConfig) else QwenVLConfig(**cfg)


# ---------------------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # The original normalises in float32, casts back to the activation dtype, and only then scales.
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return out.type_as(x) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """t [B, L, H, D]; cos/sin [1, L, 1, rot_dim]. Rotated in float32 (as the original), cast back."""
  rot = cos.shape[-1]
  tf = t.float()
  t_rot, t_pass = tf[..., :rot], tf[..., rot:]
  t_rot = t_rot * cos + _rotate_half(t_rot) * sin
  return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


def rotary_tables(dim: int, base: float, length: int, ntk_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
  """cos, sin [1, length, 1, dim] for absolute positions 0..length-1 (the original `RotaryEmbedding`)."""
  base = base * ntk_alpha ** (dim / (dim - 2))
  inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
  freqs = torch.outer(torch.arange(length).type_as(inv_freq), inv_freq)
  emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
  return emb.cos(), emb.sin()


class QWenAttention(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    proj = cfg.num_heads * cfg.head_dim
    self.c_attn = nn.Linear(cfg.hidden_size, 3 * proj)  # always with bias, whatever no_bias says
    self.c_proj = nn.Linear(proj, cfg.hidden_size, bias=False)
    self.seq_length = cfg.seq_length
    self.use_logn_attn = cfg.use_logn_attn

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    # Contiguous [q | k | v] blocks, each [H * D] (unlike the ViT's per-head interleave).
    q, k, v = (t.view(b, n, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    if self.use_logn_attn and not self.training and n > self.seq_length:
      # Query at 0-based position p scaled by log_{seq_length}(p + 1) beyond seq_length (the `logn_tensor`).
      logn = torch.tensor([math.log(i, self.seq_length) if i > self.seq_length else 1 for i in range(1, n + 1)])
      q = q * logn.to(q.dtype)[None, :, None, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).type(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)
    return self.c_proj(out)


class QWenMLP(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim, bias=False)  # up (linear branch)
    self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_dim, bias=False)  # gate (through SiLU)
    self.c_proj = nn.Linear(cfg.mlp_dim, cfg.hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    self.ln_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = QWenAttention(cfg)
    self.ln_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = QWenMLP(cfg)

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x), cos, sin)
    return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------- vision tower


class VisualAttention(nn.Module):
  """Self-attention with one fused `in_proj` whose rows are head-major, [q | k | v] inside each head."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads, self.head_dim = heads, width // heads
    self.in_proj = nn.Linear(width, 3 * width)
    self.out_proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, w = x.shape
    qkv = self.in_proj(x).view(b, n, self.heads, 3 * self.head_dim)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [B, H, L, hd]
    probs = torch.matmul(q / math.sqrt(self.head_dim), k.transpose(-1, -2)).softmax(dim=-1)
    return self.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(b, n, w))


class VisualAttentionBlock(nn.Module):
  def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=eps)
    self.ln_2 = nn.LayerNorm(width, eps=eps)
    self.attn = VisualAttention(width, heads)
    # nn.Sequential keeps the original names mlp.c_fc / mlp.c_proj; exact (erf) GELU as nn.GELU's default.
    self.mlp = nn.Sequential(OrderedDict([
      ("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    self.resblocks = nn.ModuleList(
      VisualAttentionBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.layer_norm_eps)
      for _ in range(cfg.vision_layers))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for blk in self.resblocks:
      x = blk(x)
    return x


class Resampler(nn.Module):
  """One cross-attention of n_queries learned queries over the ViT tokens (the original `attn_pool`)."""

  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    e, kv = cfg.hidden_size, cfg.vision_width
    self.grid = int(round(cfg.n_queries**0.5))
    # The original keeps its fixed sin-cos table as a frozen Parameter, so the checkpoint stores it.
    self.pos_embed = nn.Parameter(torch.zeros(cfg.n_queries, e), requires_grad=False)
    self.query = nn.Parameter(torch.zeros(cfg.n_queries, e))
    # The original skips the projection (nn.Identity, no tensor in the checkpoint) when the widths agree.
    self.kv_proj = nn.Linear(kv, e, bias=False) if kv != e else nn.Identity()
    self.attn = nn.MultiheadAttention(e, cfg.num_resampler_heads)
    self.ln_q = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
    self.ln_kv = nn.LayerNorm(e, eps=cfg.layer_norm_eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x [N, L, kv_dim] -> [N, n_queries, E]."""
    k_pos = _interp_table(self.pos_embed, self.grid, int(math.sqrt(x.shape[1])))  # keys: interpolated table
    kv = self.ln_kv(self.kv_proj(x)).transpose(0, 1)  # sequence-first for nn.MultiheadAttention
    q = self.ln_q(self.query)[:, None].expand(-1, x.shape[0], -1)
    out = self.attn(q + self.pos_embed[:, None], kv + k_pos[:, None], kv, need_weights=False)[0]
    return out.transpose(0, 1)


class VisionTransformer(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    w, e = cfg.vision_width, cfg.hidden_size
    self.pos_grid = cfg.vision_pos_grid
    self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
    self.positional_embedding = nn.Parameter(torch.zeros(cfg.vision_pos_grid**2, w))
    self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
    self.transformer = TransformerBlock(cfg)
    self.attn_pool = Resampler(cfg)
    self.ln_post = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
    self.proj = nn.Parameter(torch.zeros(e, e))  # (in, out): used as x @ proj

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x [N, 3, S, S] (NCHW, as the original) -> image features [N, n_queries, E]."""
    x = self.conv1(x).flatten(2).transpose(1, 2)  # row-major patches
    x = x + _interp_table(self.positional_embedding, self.pos_grid, int(math.sqrt(x.shape[1])))
    x = self.transformer(self.ln_pre(x))  # no LayerNorm at ViT width after the trunk
    return self.ln_post(self.attn_pool(x)) @ self.proj


# ---------------------------------------------------------------------------------------- whole model


class QWenModel(nn.Module):
  def __init__(self, cfg: QwenVLConfig):
    super().__init__()
    self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.h = nn.ModuleList(QWenBlock(cfg) for _ in range(cfg.num_layers))
    self.ln_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.visual = VisionTransformer(cfg)


class OriginalQwenVL(nn.Module):
  """Qwen-VL(-Chat) `QWenLMHeadModel` in float32; `state_dict()` keys == the checkpoint's tensor names."""

  def __init__(self, cfg: QwenVLConfig | Mapping[str, Any]):
    super().__init__()
    self.cfg = _as_config(cfg)
    self.transformer = QWenModel(self.cfg)
    self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)

  def load_checkpoint(self, path: str | os.PathLike) -> None:
    """All tensors of a Qwen-VL HF checkpoint directory, by their own names, strictly."""
    from bird_jax.model.convert import iter_checkpoint

    state = {}
    for name, arr, _ in iter_checkpoint(path):
      if arr.dtype.name == "bfloat16":
        # Keep bf16 tensors as torch bf16 (bit view, exact): the host holds the checkpoint at its stored size,
        # and load_state_dict's copy_ widens each one into the float32 parameter.
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(torch.bfloat16)
      else:
        t = torch.from_numpy(np.array(arr))
      state[name] = t
    self.load_state_dict(state, strict=True)

  def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """[M, S, S, 3] channels-last CLIP-normalised pixels -> [M, n_queries, hidden]."""
    return self.transformer.visual(pixel_values.permute(0, 3, 1, 2).to(self.transformer.visual.proj.dtype))

  def _ntk_alpha(self, n: int) -> float:
    c = self.cfg
    if self.training or not c.use_dynamic_ntk or n <= c.seq_length:
      return 1.0
    return max(2 ** math.ceil(math.log(n / c.seq_length, 2) + 1) - 1, 1)

  def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    """What the original's generate() calls; peft's causal-LM wrapper looks it up on the model it wraps."""
    return {"input_ids": input_ids, **kwargs}

  def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, L]; pixel_values [B, N, S, S, 3] or None -> float32 logits [B, L, V].

    The k-th `<img>` of row b takes image pixel_values[b, k]; its features overwrite the n_queries positions
    after the marker (`<img>` / `</img>` keep their word embeddings). Positions are 0..L-1, causal attention.
    """
    c = self.cfg
    b, n = input_ids.shape
    h = self.transformer.wte(input_ids)
    starts = (input_ids == c.image_start_id).nonzero().tolist()
    if starts:
      if pixel_values is None:
        raise ValueError("input_ids hold <img> tokens but pixel_values is None")
      feats = self.image_features(pixel_values.flatten(0, 1)).view(b, pixel_values.shape[1], c.n_queries, -1)
      h = h.clone()
      seen = [0] * b
      for row, a in starts:
        k, seen[row] = seen[row], seen[row] + 1
        end = a + 1 + c.n_queries
        if k >= pixel_values.shape[1]:
          raise ValueError(f"row {row}: <img> number {k + 1} but only {pixel_values.shape[1]} images")
        if end >= n or int(input_ids[row, end]) != c.image_end_id:
          raise ValueError(f"row {row}: <img> at {a} is not followed by {c.n_queries} slots and </img>")
        h[row, a + 1 : end] = feats[row, k].to(h.dtype)
    cos, sin = rotary_tables(c.head_dim, c.rope_base, n, self._ntk_alpha(n))
    cos, sin = cos.to(h.device), sin.to(h.device)
    for blk in self.transformer.h:
      h = blk(h, cos, sin)
    return self.lm_head(self.transformer.ln_f(h)).float()
