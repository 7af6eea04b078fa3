"""Checkpoint import/export: HF -> Flax -> HF is bit-exact; .bin shards; clear errors on bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from bird_jax.model import QwenVLConfig, abstract_params
from bird_jax.model.convert import (
  checkpoint_entries,
  export_hf,
  iter_checkpoint,
  load_params,
  load_pretrained,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_tiny_official" / "checkpoint"


def _tensors(path: Path) -> dict[str, np.ndarray]:
  return {name: np.array(arr) for name, arr, _ in iter_checkpoint(path)}


def test_entries_cover_the_7b_checkpoint_layout():
  entries = checkpoint_entries(QwenVLConfig.qwen_vl_chat_7b())
  assert len(entries) == 853  # qwen_vl.md §3: 3 + 32*8 + 7 + 48*12 + 11
  shapes = {e.hf_name: e.hf_shape for e in entries}
  assert shapes["transformer.h.0.attn.c_attn.weight"] == (12288, 4096)
  assert shapes["transformer.h.31.mlp.w2.weight"] == (11008, 4096)
  assert shapes["transformer.visual.transformer.resblocks.47.attn.in_proj.weight"] == (4992, 1664)
  assert shapes["transformer.visual.transformer.resblocks.0.mlp.c_fc.weight"] == (8192, 1664)
  assert shapes["transformer.visual.attn_pool.attn.in_proj_weight"] == (12288, 4096)
  assert shapes["transformer.visual.conv1.weight"] == (1664, 3, 14, 14)
  # every Flax leaf of the model is produced by exactly one checkpoint tensor
  leaves = {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(
      abstract_params(QwenVLConfig.tiny()), is_leaf=lambda x: hasattr(x, "names")
    )[0]
  }
  targets = [
    "".join(f"['{k}']" for k in path)
    for e in checkpoint_entries(QwenVLConfig.tiny())
    for path, _ in e.targets
  ]
  assert len(targets) == len(set(targets)) and set(targets) == leaves


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hf_flax_hf_round_trip_is_bit_exact(tmp_path, scan_layers):
  cfg, params = load_pretrained(FIXTURE, dtype="float32", scan_layers=scan_layers)
  if scan_layers:
    assert params["llm"]["h"]["attn"]["query"]["kernel"].shape == (2, 128, 2, 64)
  files = export_hf(params, cfg, tmp_path, shard_size=20_000_000, dtype="bfloat16", extra_files_from=FIXTURE)
  assert len(files) > 1  # sharding and the index are exercised
  src, out = _tensors(FIXTURE), _tensors(tmp_path)
  assert list(src) and set(src) == set(out)
  for name, a in src.items():
    b = out[name]
    assert a.dtype == b.dtype == np.dtype(ml_dtypes.bfloat16) and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), f"{name} differs after the round trip"
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(src)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in src.values())
  assert QwenVLConfig.from_hf_config(
    json.loads((tmp_path / "config.json").read_text())
  ) == QwenVLConfig.from_hf_config(json.loads((FIXTURE / "config.json").read_text()))
  assert (tmp_path / "qwen.tiktoken").exists() and (tmp_path / "generation_config.json").exists()


def test_export_is_readable_by_the_safetensors_library(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file

  cfg, params = load_pretrained(FIXTURE, dtype="bfloat16")
  export_hf(params, cfg, tmp_path, dtype="bfloat16")
  loaded = load_file(str(tmp_path / "model-00001-of-00001.safetensors"))
  ref = _tensors(FIXTURE)
  for name in ("transformer.visual.proj", "transformer.h.1.attn.c_attn.weight"):
    t = loaded[name]
    assert t.dtype == torch.bfloat16
    assert t.view(torch.int16).numpy().tobytes() == ref[name].tobytes()


def test_torch_bin_shards_load_like_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  tensors = _tensors(FIXTURE)
  names = sorted(tensors)
  shards = [names[: len(names) // 2], names[len(names) // 2 :]]
  weight_map = {}
  for k, group in enumerate(shards):
    fname = f"pytorch_model-{k + 1:05d}-of-00002.bin"
    state = {n: torch.from_numpy(tensors[n].view(np.int16).copy()).view(torch.bfloat16) for n in group}
    torch.save(state, tmp_path / fname)
    weight_map.update({n: fname for n in group})
  (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  shutil.copyfile(FIXTURE / "config.json", tmp_path / "config.json")
  _, from_bin = load_pretrained(tmp_path, dtype="float32")
  _, from_st = load_pretrained(FIXTURE, dtype="float32")
  for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_st), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copy_fixture(tmp_path: Path, edit) -> Path:
  """Writes the fixture as one safetensors file after `edit(dict)` changed its tensors."""
  from bird_jax.model.convert import _write_safetensors

  tensors = _tensors(FIXTURE)
  edit(tensors)
  tmp_path.mkdir(parents=True)
  _write_safetensors(tmp_path / "model.safetensors", sorted(tensors.items()))
  shutil.copyfile(FIXTURE / "config.json", tmp_path / "config.json")
  return tmp_path


def test_errors_name_the_bad_tensor(tmp_path):
  cfg = QwenVLConfig.from_hf_config(json.loads((FIXTURE / "config.json").read_text()))
  bad = _copy_fixture(tmp_path / "missing", lambda t: t.pop("transformer.h.1.mlp.w2.weight"))
  with pytest.raises(ValueError, match=r"1 tensor\(s\) missing.*transformer\.h\.1\.mlp\.w2\.weight"):
    load_params(bad, cfg)
  extra = lambda t: t.__setitem__("transformer.h.0.mlp.w2.qzeros", np.zeros(3, np.float32))
  bad = _copy_fixture(tmp_path / "unexpected", extra)
  with pytest.raises(ValueError, match=r"unexpected.*transformer\.h\.0\.mlp\.w2\.qzeros"):
    load_params(bad, cfg)
  reshape = lambda t: t.__setitem__("transformer.visual.proj", t["transformer.visual.proj"][:, :64])
  bad = _copy_fixture(tmp_path / "shape", reshape)
  with pytest.raises(
    ValueError, match=r"model\.safetensors: tensor transformer\.visual\.proj has shape \(128, 64\)"
  ):
    load_params(bad, cfg)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path / "nowhere")
