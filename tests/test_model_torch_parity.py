"""Float32 parity of each tower with independent PyTorch references (../shared/reference/qwen_vl.md §5).

* decoder == transformers.Qwen2ForCausalLM with mapped weights (split c_attn, w2 -> gate, w1 -> up), fed the
  same image-merged input embeddings, with left and right padding and explicit position ids;
* ViT trunk == our torch embedding (conv1, F.interpolate'd table) + transformers CLIPEncoder;
* resampler + ln_post + proj == torch.nn.MultiheadAttention fed the checkpoint's packed in_proj tensors;
* the positional-table interpolation == F.interpolate(bicubic, align_corners=False) for up/down sampling.
Weights come from `to_hf_state_dict`, so the torch-layout conversion is exercised as well.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bird_jax.model import QwenVL, QwenVLConfig, encode_images, init_params  # noqa: E402
from bird_jax.model.convert import to_hf_state_dict  # noqa: E402
from bird_jax.model.layers import interpolate_pos_table, sincos_2d_table  # noqa: E402
from bird_jax.model.qwen2_reference import qwen2_config_kwargs, qwen2_state_dict  # noqa: E402
from bird_jax.model.vit import VisionTower  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(scope="module")
def tiny():
  cfg = QwenVLConfig.tiny(initializer_range=0.1)
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(11))
  # make norm weights/biases non-trivial so a mix-up of scale/bias or eps would show
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      x.replace_boxed(x.value + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.value.shape))
      if any(getattr(k, "key", None) in ("scale", "bias") for k in p)
      else x
    ),
    params,
    is_leaf=lambda x: hasattr(x, "names"),
  )
  sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_hf_state_dict(params, cfg).items()}
  return cfg, params, sd


def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, np.float32))


@pytest.mark.parametrize(("src", "dst"), [(16, 4), (16, 32), (3, 4), (16, 14), (5, 7), (4, 4)])
def test_interpolation_matches_torch_bicubic(src, dst):
  table = np.random.default_rng(src * 100 + dst).standard_normal((src * src, 6)).astype(np.float32)
  got = np.asarray(interpolate_pos_table(jnp.asarray(table), dst))
  grid = _t(table).reshape(1, src, src, 6).permute(0, 3, 1, 2)
  want = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(dst * dst, 6).numpy()
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_sincos_table_layout():
  dim, grid = 16, 3
  table = sincos_2d_table(dim, grid)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  for row in range(grid):
    for col in range(grid):
      want = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
      )
      np.testing.assert_allclose(table[row * grid + col], want, atol=1e-6)


def test_vision_tower_matches_clip_encoder_and_torch_mha(tiny):
  from transformers import CLIPVisionConfig
  from transformers.models.clip.modeling_clip import CLIPEncoder

  cfg, params, sd = tiny
  w, v = cfg.vision_width, "transformer.visual."
  clip_cfg = CLIPVisionConfig(
    hidden_size=w,
    intermediate_size=cfg.vision_mlp_dim,
    num_hidden_layers=cfg.vision_layers,
    num_attention_heads=cfg.vision_heads,
    patch_size=cfg.patch_size,
    image_size=cfg.image_size,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    attn_implementation="eager",
  )
  enc = CLIPEncoder(clip_cfg).eval()
  state = {}
  hd = cfg.vision_head_dim
  for i in range(cfg.vision_layers):
    t, c = f"{v}transformer.resblocks.{i}.", f"layers.{i}."
    qkv_w = sd[t + "attn.in_proj.weight"].reshape(cfg.vision_heads, 3, hd, w)  # per-head interleave
    qkv_b = sd[t + "attn.in_proj.bias"].reshape(cfg.vision_heads, 3, hd)
    for j, n in enumerate(("q", "k", "v")):
      state[c + f"self_attn.{n}_proj.weight"] = qkv_w[:, j].reshape(w, w)
      state[c + f"self_attn.{n}_proj.bias"] = qkv_b[:, j].reshape(w)
    state.update(
      {
        c + "self_attn.out_proj.weight": sd[t + "attn.out_proj.weight"],
        c + "self_attn.out_proj.bias": sd[t + "attn.out_proj.bias"],
        c + "layer_norm1.weight": sd[t + "ln_1.weight"],
        c + "layer_norm1.bias": sd[t + "ln_1.bias"],
        c + "layer_norm2.weight": sd[t + "ln_2.weight"],
        c + "layer_norm2.bias": sd[t + "ln_2.bias"],
        c + "mlp.fc1.weight": sd[t + "mlp.c_fc.weight"],
        c + "mlp.fc1.bias": sd[t + "mlp.c_fc.bias"],
        c + "mlp.fc2.weight": sd[t + "mlp.c_proj.weight"],
        c + "mlp.fc2.bias": sd[t + "mlp.c_proj.bias"],
      }
    )
  enc.load_state_dict(state, strict=True)

  pixels = np.random.default_rng(0).standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  grid = cfg.grid_size
  with torch.no_grad():
    x = F.conv2d(_t(pixels).permute(0, 3, 1, 2), sd[v + "conv1.weight"], stride=cfg.patch_size)
    x = x.reshape(2, w, -1).permute(0, 2, 1)
    g = cfg.vision_pos_grid
    pos = sd[v + "positional_embedding"].reshape(1, g, g, w).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x + pos.permute(0, 2, 3, 1).reshape(1, grid * grid, w)
    x = F.layer_norm(x, (w,), sd[v + "ln_pre.weight"], sd[v + "ln_pre.bias"], eps=1e-6)
    trunk_ref = enc(inputs_embeds=x).last_hidden_state

    ap, e, nq = v + "attn_pool.", cfg.hidden_size, cfg.n_queries
    kv = F.linear(trunk_ref, sd[ap + "kv_proj.weight"])
    kv = F.layer_norm(kv, (e,), sd[ap + "ln_kv.weight"], sd[ap + "ln_kv.bias"], eps=1e-6)
    qg = int(nq**0.5)
    kpos = (
      F.interpolate(
        sd[ap + "pos_embed"].reshape(1, qg, qg, e).permute(0, 3, 1, 2),
        size=(grid, grid),
        mode="bicubic",
        align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .reshape(grid * grid, e)
    )
    mha = torch.nn.MultiheadAttention(e, cfg.num_resampler_heads).eval()
    mha.load_state_dict(
      {
        "in_proj_weight": sd[ap + "attn.in_proj_weight"],
        "in_proj_bias": sd[ap + "attn.in_proj_bias"],
        "out_proj.weight": sd[ap + "attn.out_proj.weight"],
        "out_proj.bias": sd[ap + "attn.out_proj.bias"],
      }
    )
    q = F.layer_norm(sd[ap + "query"], (e,), sd[ap + "ln_q.weight"], sd[ap + "ln_q.bias"], eps=1e-6)
    q_in = (q + sd[ap + "pos_embed"]).unsqueeze(1).repeat(1, 2, 1)  # sequence-first
    out = mha(q_in, (kv + kpos).permute(1, 0, 2), kv.permute(1, 0, 2), need_weights=False)[0].permute(1, 0, 2)
    out = F.layer_norm(out, (e,), sd[v + "ln_post.weight"], sd[v + "ln_post.bias"], eps=1e-6)
    feats_ref = out @ sd[v + "proj"]

  trunk = jax.jit(lambda p, px: VisionTower(cfg).apply({"params": p}, px, method=VisionTower.trunk))(
    params["visual"], pixels
  )
  np.testing.assert_allclose(np.asarray(trunk), trunk_ref.numpy(), atol=2e-5, rtol=1e-4)
  feats = jax.jit(lambda p, px: encode_images(cfg, p, px))(params["visual"], pixels)
  np.testing.assert_allclose(np.asarray(feats), feats_ref.numpy(), atol=2e-5, rtol=1e-4)


def test_decoder_matches_qwen2_with_padding_and_positions(tiny):
  from transformers import Qwen2Config, Qwen2ForCausalLM

  cfg, params, sd = tiny
  qcfg = Qwen2Config(**qwen2_config_kwargs(cfg))
  ref = Qwen2ForCausalLM(qcfg).eval()
  state = qwen2_state_dict(sd, cfg)
  ref.load_state_dict(state, strict=True)

  rng = np.random.default_rng(1)
  s, nq, length = cfg.image_start_id, cfg.n_queries, 24
  span = [s] + [s + 2] * nq + [s + 1]
  row0 = [5] + span + list(rng.integers(0, 400, 4))  # right padded
  row1 = list(rng.integers(0, 400, 6)) + span + [7, 8]  # left padded
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  ids[0, : len(row0)], mask[0, : len(row0)] = row0, 1
  ids[1, length - len(row1) :], mask[1, length - len(row1) :] = row1, 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0) + np.array([[0], [3]])  # explicit, row 1 offset by 3
  pixels = rng.standard_normal((2, 1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)

  logits = jax.jit(
    lambda p, i, x, pos, seg: QwenVL(cfg).apply({"params": p}, i, x, positions=pos, segment_ids=seg)
  )(
    params,
    jnp.asarray(ids, jnp.int32),
    pixels,
    jnp.asarray(positions, jnp.int32),
    jnp.asarray(mask, jnp.int32),
  )
  feats = np.asarray(jax.jit(lambda p, x: encode_images(cfg, p, x))(params["visual"], pixels[:, 0]))
  emb = sd["transformer.wte.weight"][torch.from_numpy(ids)].clone()
  for b in range(2):
    a = int(np.flatnonzero(ids[b] == s)[0])
    emb[b, a + 1 : a + 1 + nq] = _t(feats[b])
  with torch.no_grad():
    want = ref(
      inputs_embeds=emb, attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions)
    ).logits.numpy()
  valid = mask.astype(bool)
  got = np.asarray(logits)
  assert np.abs(want[valid]).max() > 1.0
  np.testing.assert_allclose(got[valid], want[valid], atol=5e-5, rtol=1e-4)
