"""LoRA (bird_jax.model.lora, config.lora): zero-initialised adapters are the base model, merged adapters are the
unmerged forward, a few steps lower the loss while only the adapters and the resampler move (and only they have
optimizer state), the PEFT export loads with `peft` onto the original PyTorch Qwen-VL with the same logits, and a
LoRA training run checkpoints the trained params only, resumes, and exports merged weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bird_jax import sharding as shd
from bird_jax.model import QwenVL, QwenVLConfig, init_params
from bird_jax.model.lora import lora_mask, merge_adapters, without_adapters
from bird_jax.train_step import build_train_step, graft, prune, tree_bytes

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official"


def lora_config(rank: int = 4, base_dtype: str = "float32", dropout: float = 0.0, scan: bool = False):
  """The base config with the tiny model, the training settings of test_train and LoRA on."""
  from test_train import train_config

  from configs import _base

  config = _base.get_config()
  config.model = _base.model_config(QwenVLConfig.tiny(scan_layers=scan))
  config.train = train_config(train_vit=False, batch_size=8, loss_chunk=0)
  config.data.seq_len = 32
  config.lora.rank, config.lora.alpha, config.lora.dropout = rank, 8.0, dropout
  config.lora.base_dtype = base_dtype
  return config


def model_cfg_of(config) -> QwenVLConfig:
  from bird_jax.train_step import lora_fields

  return QwenVLConfig(**config.model.to_dict(), **lora_fields(config))


def parts_for(config, model_cfg):
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return mesh, build_train_step(config, model_cfg, mesh)


def fixed_global_batch(mesh, cfg):
  from test_train import fixed_batch

  from bird_jax.train_step import host_batch, to_global

  return to_global(host_batch(fixed_batch(batch=8, length=32), cfg), mesh)


def inputs(cfg: QwenVLConfig, batch: int = 2, length: int = 24, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.image_start_id, (batch, length)).astype(np.int32)
  ids[:, 1] = cfg.image_start_id
  ids[:, 2:2 + cfg.n_queries] = cfg.image_pad_id
  ids[:, 2 + cfg.n_queries] = cfg.image_end_id
  px = rng.standard_normal((batch, 1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(px)


def with_random_adapters(params, scale: float = 0.05, seed: int = 1):
  """B ~ N(0, scale) instead of 0, so the adapters change the output."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  key = jax.random.key(seed)
  out = []
  for i, (path, x) in enumerate(leaves):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys[-1] == "b" and any(k.endswith("_lora") for k in keys):
      x = (scale * jax.random.normal(jax.random.fold_in(key, i), x.shape)).astype(x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_initialised_adapters_give_the_base_models_logits(scan):
  config = lora_config(scan=scan)
  cfg = model_cfg_of(config)
  _, parts = parts_for(config, cfg)
  params = jax.jit(parts.init_state)()["params"]
  ids, px = inputs(cfg)
  with_lora = QwenVL(cfg).apply({"params": params}, ids, px)
  base = QwenVL(dataclasses.replace(cfg, lora_rank=0)).apply({"params": without_adapters(params)}, ids, px)
  np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base))
  # and the adapters are really there: a non-zero B changes the logits
  moved = QwenVL(cfg).apply({"params": with_random_adapters(params)}, ids, px)
  assert float(jnp.abs(moved - base).max()) > 1e-2


@pytest.mark.parametrize("scan", [False, True])
def test_merged_adapters_equal_the_unmerged_forward(scan):
  cfg = QwenVLConfig.tiny(scan_layers=scan, lora_rank=4, lora_alpha=8.0)
  params = with_random_adapters(nn.unbox(init_params(cfg, jax.random.key(0))))
  ids, px = inputs(cfg)
  unmerged = QwenVL(cfg).apply({"params": params}, ids, px)
  merged_params = merge_adapters(params, cfg)
  assert not any(jax.tree.leaves(lora_mask(merged_params)))
  merged = QwenVL(dataclasses.replace(cfg, lora_rank=0)).apply({"params": merged_params}, ids, px)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-5, atol=1e-5)


def test_decoding_with_adapters_equals_decoding_with_them_merged():
  """The in-training evaluation decodes with the adapters unmerged (KV cache path); export merges them."""
  from bird_jax.generate import generate

  cfg = QwenVLConfig.tiny(lora_rank=4)
  params = with_random_adapters(nn.unbox(init_params(cfg, jax.random.key(0))), scale=0.3)
  ids, px = (np.asarray(x) for x in inputs(cfg, batch=2, length=16))
  unmerged = generate(QwenVL(cfg), params, ids, px, max_new_tokens=6)
  merged = generate(QwenVL(dataclasses.replace(cfg, lora_rank=0)), merge_adapters(params, cfg), ids, px,
                    max_new_tokens=6)
  base = generate(QwenVL(dataclasses.replace(cfg, lora_rank=0)), without_adapters(params), ids, px, max_new_tokens=6)
  assert unmerged == merged and unmerged != base


def test_adapter_subset_and_bad_targets():
  cfg = QwenVLConfig.tiny(lora_rank=2, lora_targets=("c_attn", "w2"))
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  assert set(params["llm"]["h_0"]["attn"]) == {"query", "key", "value", "c_proj", "c_attn_lora"}
  assert set(params["llm"]["h_0"]["mlp"]) == {"w1", "w2", "c_proj", "w2_lora"}
  assert params["llm"]["h_0"]["attn"]["c_attn_lora"]["b"].shape == (2, 3, cfg.num_heads, cfg.head_dim)
  with pytest.raises(ValueError, match="lora_targets"):
    QwenVLConfig.tiny(lora_rank=2, lora_targets=("q_proj",))


def test_lora_steps_lower_the_loss_and_train_only_adapters_and_the_resampler():
  config = lora_config(base_dtype="bfloat16", dropout=0.1)
  config.train.lr = 3e-3
  config.train.warmup_ratio = 0.0
  cfg = model_cfg_of(config)
  mesh, parts = parts_for(config, cfg)
  state = jax.jit(parts.init_state, out_shardings=parts.state_shardings)()
  params0 = jax.device_get(state["params"])
  # frozen base in bf16; adapters and resampler in float32
  dtypes = {(k, str(x.dtype)) for k, x in [("lora", prune(params0, lora_mask(params0))),
                                           ("pool", {k: v for k, v in params0["visual"]["attn_pool"].items()
                                                     if k != "pos_embed"}),  # a fixed table: frozen
                                           ("llm", without_adapters(params0["llm"])),
                                           ("vit", params0["visual"]["resblocks_0"])] for x in jax.tree.leaves(x)}
  assert dtypes == {("lora", "float32"), ("pool", "float32"), ("llm", "bfloat16"), ("vit", "bfloat16")}
  # only the trained leaves have optimizer state (Adam's mu and nu)
  trained = prune(params0, parts.trainable)
  n_trained = len(jax.tree.leaves(trained))
  assert set(trained) == {"llm", "visual"} and set(trained["visual"]) == {"attn_pool"}
  assert all(k.endswith("_lora") for k in trained["llm"]["h_0"]["attn"]) and "wte" not in trained["llm"]
  assert len([x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]) == 2 * n_trained  # + step counts
  assert tree_bytes(state["opt_state"]) < 2.2 * tree_bytes(trained)

  batch = fixed_global_batch(mesh, cfg)
  losses = []
  with jax.set_mesh(mesh):
    # dropout (0.1 here) draws from (seed, step) only: the same step twice drops the same units; the model
    # without dropout gives another loss (adapters with B != 0: at B = 0 dropout before A changes nothing)
    moved = {**state, "params": with_random_adapters(state["params"])}
    twice = [float(parts.step(jax.tree.map(jnp.copy, moved), batch)[1]["loss"]) for _ in range(2)]
    assert twice[0] == twice[1]
    from bird_jax.train_step import token_nll

    nll, count = jax.jit(lambda p: token_nll(parts.model, p, batch))(moved["params"])
    assert abs(float(nll / count) - twice[0]) > 1e-4
    for _ in range(6):
      state, metrics = parts.step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  params = jax.device_get(state["params"])
  frozen = jax.tree.map(lambda t, a, b: None if t else bool(np.array_equal(a, b)), parts.trainable, params, params0)
  assert all(jax.tree.leaves(frozen))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), prune(params, lora_mask(params)),
                       prune(params0, lora_mask(params0)))
  assert all(jax.tree.leaves(moved))


# ------------------------------------------------------------------------------------------------ PEFT


def test_peft_export_loads_with_peft_onto_the_original_model_with_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from torch_qwen_original import OriginalQwenVL

  from bird_jax.model.convert import load_pretrained
  from bird_jax.model.lora_export import write_peft

  ckpt = FIXTURE / "checkpoint"
  base_cfg, base = load_pretrained(ckpt)
  cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=16.0, lora_dropout=0.05)
  is_adapter = lora_mask(nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))))
  adapters = jax.jit(lambda: prune(nn.unbox(init_params(cfg, jax.random.key(3))), is_adapter))()
  params = with_random_adapters(graft(base, adapters), scale=0.2)
  # the resampler was trained too: it travels as peft's modules_to_save
  pool = params["visual"]["attn_pool"]
  params["visual"]["attn_pool"] = {**pool, "query": pool["query"] * 1.5}
  files = write_peft(params, cfg, tmp_path / "adapter", base_model=ckpt)
  assert {f.name for f in files} == {"adapter_model.safetensors", "adapter_config.json"}

  ids, px = inputs(cfg, batch=1, length=cfg.n_queries + 12, seed=2)
  want = np.asarray(QwenVL(cfg).apply({"params": params}, ids, px))
  base_logits = np.asarray(QwenVL(base_cfg).apply({"params": base}, ids, px))

  torch_model = OriginalQwenVL(base_cfg).eval()
  torch_model.load_checkpoint(ckpt)
  model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = model.get_base_model()(torch.from_numpy(np.array(ids)).long(), torch.from_numpy(np.array(px)))
  got = got.float().numpy()
  scale = np.abs(want).max()
  assert np.abs(want - base_logits).max() > 100 * 1e-5 * scale  # the adapters matter
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["modules_to_save"] == ["attn_pool"]


# ------------------------------------------------------------------------------------------------ a run


@pytest.mark.slow
def test_a_lora_run_checkpoints_trained_params_only_resumes_and_exports(tmp_path):
  from test_train_faults import ROOT, TOY, env, losses

  lora = ["--config.lora.rank=4", "--config.lora.dropout=0.1", "--config.train.train_vit=false",
          "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.schedule=constant",
          "--config.train.lr=1e-3"]
  work = tmp_path / "run"

  def train(*extra, rc=0):
    done = subprocess.run([sys.executable, "-m", "bird_jax.train", *TOY, *lora, f"--config.workdir={work}", *extra],
                          cwd=ROOT, env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert done.returncode == rc, done.stdout[-2000:] + done.stderr[-3000:]
    return done

  first = train()
  assert "LoRA:" in first.stdout
  reference = losses(work)
  import orbax.checkpoint as ocp

  tree = ocp.PyTreeCheckpointer().metadata(work / "checkpoints" / "4" / "state").item_metadata.tree
  saved = tree["params"]
  assert set(saved) == {"llm", "visual"} and set(saved["visual"]) == {"attn_pool"}
  assert "wte" not in saved["llm"] and "lm_head" not in saved["llm"]
  assert set(saved["llm"]["h_0"]["mlp"]) == {"w1_lora", "w2_lora", "c_proj_lora"}
  meta = json.loads((work / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["lora"]["lora_rank"] == 4 and meta["base"].startswith("random init")

  # resume: the step-4 checkpoint is gone, the rerun goes on from step 2 and ends where the first run did
  shutil.rmtree(work / "checkpoints" / "4")
  (work / "metrics.jsonl").unlink()
  train()
  resumed = losses(work)
  assert sorted(resumed) == [3, 4] and all(resumed[s] == reference[s] for s in resumed)
  # another rank on the same checkpoints: one line naming both settings; nothing is set aside as damaged
  refused = train("--config.lora.rank=8", rc=2)
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint ") and "was written with lora=" in last and "'lora_rank': 8" in last
  assert (work / "checkpoints" / "4").is_dir() and not (work / "checkpoints.damaged").exists()

  # export: merged Hugging Face weights give the LoRA model's logits; --peft writes the adapters alone
  from bird_jax.config_util import parse_config_flags
  from bird_jax.export import export_run
  from bird_jax.model.convert import load_pretrained
  from bird_jax.run_state import load_checkpoint

  config, _, _ = parse_config_flags([*TOY, *lora, f"--config.workdir={work}"])
  model, params, *_ = load_checkpoint(config, work / "checkpoints", merge_lora=False)
  export_run(config, tmp_path / "merged")
  cfg, merged = load_pretrained(tmp_path / "merged")
  ids, px = inputs(model.config, batch=1, length=model.config.n_queries + 8)
  want = np.asarray(model.apply({"params": params}, ids, px))
  got = np.asarray(QwenVL(cfg).apply({"params": merged}, ids, px))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())  # the merge is rounded to bf16
  export_run(config, tmp_path / "peft", peft=True)
  from safetensors.numpy import load_file

  names = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
  assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in names
  assert "base_model.model.transformer.visual.attn_pool.query" in names
