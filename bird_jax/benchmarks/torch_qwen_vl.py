"""Qwen-VL assembled from PyTorch / transformers parts: the baseline `train_vs_torch` races our step against.

The original Qwen-VL remote code cannot ship with the project, so this builds the same architecture, same
FLOPs, from maintained parts, loaded from Qwen-VL checkpoint tensors (`bird_jax.model.convert.to_hf_state_dict`):

  ViT trunk   conv1 (no bias) + bicubic-interpolated positional table + ln_pre + transformers `CLIPEncoder`
              (pre-LN, exact GELU; the per-head interleaved `in_proj` split into q/k/v)
  resampler   kv_proj + ln_kv, ln_q(query) + sin-cos pos_embed, `torch.nn.MultiheadAttention`, ln_post, proj
  decoder     transformers `Qwen2ForCausalLM` (qwen2_reference.py's mapping), fed `inputs_embeds` with each
              image's n_queries features written after its `<img>` token, as the original does

and a train step like ours: masked next-token cross-entropy summed over supervised tokens ÷ their count,
global-norm clipping, AdamW with decoupled decay on matrices only. The packed rows' segments become a 4-D
block-causal mask. Imported only in the benchmark's child process: no jax there (two thread pools in one
process slow torch down several times on a small machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _interp_table(table: torch.Tensor, src: int, dst: int) -> torch.Tensor:
  """[src², C] grid table -> [dst², C], bicubic (Qwen-VL's `get_abs_pos`)."""
  if src == dst:
    return table
  c = table.shape[-1]
  grid = table.reshape(1, src, src, c).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
  return grid.permute(0, 2, 3, 1).reshape(dst * dst, c)


class TorchQwenVL(nn.Module):
  """cfg: the fields of a `QwenVLConfig` (a dict or namespace; float32 only)."""

  def __init__(self, cfg: Mapping[str, Any] | SimpleNamespace):
    super().__init__()
    from transformers import CLIPVisionConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.clip.modeling_clip import CLIPEncoder

    c = SimpleNamespace(**cfg) if isinstance(cfg, Mapping) else cfg
    self.c = c
    w, e = c.vision_width, c.hidden_size
    self.grid = c.image_size // c.patch_size
    self.conv1 = nn.Conv2d(3, w, c.patch_size, stride=c.patch_size, bias=False)
    self.positional_embedding = nn.Parameter(torch.zeros(c.vision_pos_grid**2, w))
    self.ln_pre = nn.LayerNorm(w, eps=1e-6)
    self.encoder = CLIPEncoder(CLIPVisionConfig(
      hidden_size=w, intermediate_size=c.vision_mlp_dim, num_hidden_layers=c.vision_layers,
      num_attention_heads=c.vision_heads, patch_size=c.patch_size, image_size=c.image_size, num_channels=3,
      hidden_act="gelu", layer_norm_eps=1e-6, attn_implementation="eager"))
    self.kv_proj = nn.Linear(w, e, bias=False)
    self.ln_kv = nn.LayerNorm(e, eps=1e-6)
    self.ln_q = nn.LayerNorm(e, eps=1e-6)
    self.query = nn.Parameter(torch.zeros(c.n_queries, e))
    self.register_buffer("pos_embed", torch.zeros(c.n_queries, e))  # fixed sin-cos table, never trained
    self.attn = nn.MultiheadAttention(e, c.num_resampler_heads)
    self.ln_post = nn.LayerNorm(e, eps=1e-6)
    self.proj = nn.Parameter(torch.zeros(e, e))
    from bird_jax.model.qwen2_reference import qwen2_config_kwargs

    self.decoder = Qwen2ForCausalLM(Qwen2Config(**qwen2_config_kwargs(c), max_position_embeddings=c.seq_length))

  def load_qwen_vl(self, sd: Mapping[str, np.ndarray]) -> None:
    """Qwen-VL checkpoint tensors (`transformer.*`, `lm_head.weight`) -> this module, strictly."""
    c, v = self.c, "transformer.visual."
    t = lambda k: torch.from_numpy(np.ascontiguousarray(sd[k], np.float32))
    w, hd = c.vision_width, c.vision_width // c.vision_heads
    state = {"conv1.weight": t(v + "conv1.weight"), "positional_embedding": t(v + "positional_embedding"),
             "ln_pre.weight": t(v + "ln_pre.weight"), "ln_pre.bias": t(v + "ln_pre.bias"),
             "ln_post.weight": t(v + "ln_post.weight"), "ln_post.bias": t(v + "ln_post.bias"),
             "proj": t(v + "proj")}
    for i in range(c.vision_layers):
      src, dst = f"{v}transformer.resblocks.{i}.", f"encoder.layers.{i}."
      qkv_w = t(src + "attn.in_proj.weight").reshape(c.vision_heads, 3, hd, w)  # per-head [q, k, v] interleave
      qkv_b = t(src + "attn.in_proj.bias").reshape(c.vision_heads, 3, hd)
      for j, n in enumerate(("q", "k", "v")):
        state[dst + f"self_attn.{n}_proj.weight"] = qkv_w[:, j].reshape(w, w)
        state[dst + f"self_attn.{n}_proj.bias"] = qkv_b[:, j].reshape(w)
      for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                           ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for p in ("weight", "bias"):
          state[f"{dst}{theirs}.{p}"] = t(f"{src}{ours}.{p}")
    ap = v + "attn_pool."
    state.update({
      "kv_proj.weight": t(ap + "kv_proj.weight"), "query": t(ap + "query"), "pos_embed": t(ap + "pos_embed"),
      "ln_kv.weight": t(ap + "ln_kv.weight"), "ln_kv.bias": t(ap + "ln_kv.bias"),
      "ln_q.weight": t(ap + "ln_q.weight"), "ln_q.bias": t(ap + "ln_q.bias"),
      "attn.in_proj_weight": t(ap + "attn.in_proj_weight"), "attn.in_proj_bias": t(ap + "attn.in_proj_bias"),
      "attn.out_proj.weight": t(ap + "attn.out_proj.weight"), "attn.out_proj.bias": t(ap + "attn.out_proj.bias"),
    })
    from bird_jax.model.qwen2_reference import qwen2_state_dict

    decoder_hf = {k: t(k) for k in sd if not k.startswith(v)}
    state.update({f"decoder.{k}": x for k, x in qwen2_state_dict(decoder_hf, self.c).items()})
    self.load_state_dict(state, strict=True)

  def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
    """[N, S, S, 3] channels-last pixels -> [N, n_queries, hidden]."""
    n, c = pixels.shape[0], self.c
    x = self.conv1(pixels.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
    x = x + _interp_table(self.positional_embedding, c.vision_pos_grid, self.grid)
    x = self.encoder(inputs_embeds=self.ln_pre(x)).last_hidden_state
    kv = self.ln_kv(self.kv_proj(x))
    qg = int(round(c.n_queries**0.5))
    k_pos = _interp_table(self.pos_embed, qg, self.grid)
    q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(1).expand(-1, n, -1)  # sequence-first
    out = self.attn(q, (kv + k_pos).transpose(0, 1), kv.transpose(0, 1), need_weights=False)[0]
    return self.ln_post(out.transpose(0, 1)) @ self.proj

  def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor, positions: torch.Tensor,
              segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids, [B, n_img, S, S, 3] pixels, [B, L] positions and segment ids -> [B, L, V] float32 logits."""
    b, n_img = pixels.shape[:2]
    feats = self.image_features(pixels.flatten(0, 1)).reshape(b, n_img, self.c.n_queries, -1)
    emb = self.decoder.model.embed_tokens(input_ids)
    # The k-th <img> of row b takes image k of row b, its features on the n_queries slots after the marker.
    starts = (input_ids == self.c.image_start_id).nonzero().tolist()
    seen: dict[int, int] = {}
    slots, images = [], []
    for row, col in starts:
      k = seen.get(row, 0)
      seen[row] = k + 1
      if k < n_img:
        slots.append(torch.arange(col + 1, col + 1 + self.c.n_queries) + row * input_ids.shape[1])
        images.append(feats[row, k])
    if slots:
      flat = emb.reshape(-1, emb.shape[-1]).index_put((torch.cat(slots),), torch.cat(images))
      emb = flat.reshape(emb.shape)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(input_ids.shape[1], dtype=torch.bool)  # padding rows attend to themselves: no NaN
    mask = torch.zeros(allowed.shape, dtype=emb.dtype).masked_fill(~allowed, torch.finfo(emb.dtype).min)
    return self.decoder(inputs_embeds=emb, attention_mask=mask[:, None], position_ids=positions).logits


def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
  """(mean next-token NLL over supervised tokens, their count), as `bird_jax.train_step.token_nll` ÷ count."""
  logits = model(batch["input_ids"], batch["pixel_values"], batch["positions"], batch["segment_ids"])
  nll = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
  w = batch["loss_mask"].flatten()
  count = w.sum()
  return (nll * w).sum() / count.clamp(min=1.0), count


def make_optimizer(model: nn.Module, *, lr: float, b1: float, b2: float, eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
  """AdamW with decoupled decay on matrices and embeddings only (optax's mask in `build_optimizer`)."""
  params = [p for p in model.parameters() if p.requires_grad]
  return torch.optim.AdamW(
    [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
     {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
    lr=lr, betas=(b1, b2), eps=eps, foreach=True)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
               grad_clip: float) -> float:
  opt.zero_grad(set_to_none=True)
  loss, _ = loss_fn(model, batch)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  opt.step()
  return float(loss.detach())
