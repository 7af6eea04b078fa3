"""Hugging Face Qwen-VL checkpoint <-> Flax params (bit-exact both ways).

  cfg, params = load_pretrained("/path/to/Qwen-VL-Chat", dtype="bfloat16")              # plain arrays
  cfg, params = load_pretrained(path, dtype="float32", param_dtype="bfloat16", mesh=mesh, rules=rules,
                                scan_layers=True)                                     # sharded, scanned
  export_hf(params, cfg, "/out/dir", shard_size=5 * 2**30, dtype="bfloat16", extra_files_from=path)

The checkpoint directory holds config.json plus `model.safetensors[.index.json]` shards (or
`pytorch_model*.bin[.index.json]`, read with torch.load(weights_only=True)). Tensors are read one at a time
(safetensors: read into a fresh buffer, not memory-mapped), converted to the target dtype and, with a mesh
or explicit shardings, placed on devices right away, so the host never holds more than one tensor (one stacked
layer group with scan_layers) beyond the params: peak host RAM ~1.0-1.1x the model in the target dtype
(`python -m bird_jax.benchmarks.model_memory --import-ram`).

Layout conversions (../shared/reference/qwen_vl.md §3): nn.Linear (out, in) -> kernel (in, out); the LLM
c_attn packs contiguous [q | k | v] rows; the ViT in_proj interleaves per head (head-major, [q|k|v] inside
each head); the resampler in_proj_weight packs [q; k; v] blocks; visual.proj is already (in, out);
conv1 is OIHW -> (kh*kw*c, out). Only reshapes/transposes: values are never rounded except by the dtype cast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from bird_jax.model.config import QwenVLConfig

Path_ = tuple[str, ...]

_ST_DTYPES: dict[str, np.dtype] = {
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F16": np.dtype(np.float16),
  "F32": np.dtype(np.float32),
  "F64": np.dtype(np.float64),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(bool),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor <-> one or more Flax leaves."""

  hf_name: str
  hf_shape: tuple[int, ...]
  # Flax leaf paths (unrolled names, e.g. ("llm", "h_3", "attn", "query", "kernel")) and their shapes.
  targets: tuple[tuple[Path_, tuple[int, ...]], ...]
  split: Callable[[np.ndarray], list[np.ndarray]]
  join: Callable[[list[np.ndarray]], np.ndarray]


def _one(
  hf: str,
  shape: tuple[int, ...],
  path: Path_,
  to_flax: Callable[[np.ndarray], np.ndarray],
  to_hf: Callable[[np.ndarray], np.ndarray],
  flax_shape: tuple[int, ...],
) -> Entry:
  return Entry(hf, shape, ((path, flax_shape),), lambda a: [to_flax(a)], lambda xs: to_hf(xs[0]))


def _same(hf: str, shape: tuple[int, ...], path: Path_) -> Entry:
  return _one(hf, shape, path, lambda a: a, lambda a: a, shape)


def _linear(hf: str, out_dim: int, in_dim: int, path: Path_) -> Entry:
  """(out, in) -> kernel (in, out)."""
  return _one(hf, (out_dim, in_dim), path, lambda a: a.T, lambda a: a.T, (in_dim, out_dim))


def _linear_to_heads(hf: str, heads: int, hd: int, in_dim: int, path: Path_) -> Entry:
  """(h*d, in) -> kernel (in, h, d)."""
  return _one(
    hf,
    (heads * hd, in_dim),
    path,
    lambda a: a.T.reshape(in_dim, heads, hd),
    lambda a: a.reshape(in_dim, heads * hd).T,
    (in_dim, heads, hd),
  )


def _linear_from_heads(hf: str, out_dim: int, heads: int, hd: int, path: Path_) -> Entry:
  """(out, h*d) -> kernel (h, d, out)."""
  return _one(
    hf,
    (out_dim, heads * hd),
    path,
    lambda a: a.T.reshape(heads, hd, out_dim),
    lambda a: a.reshape(heads * hd, out_dim).T,
    (heads, hd, out_dim),
  )


def _packed_qkv(
  hf_w: str, hf_b: str, heads: int, hd: int, in_dim: int, prefix: Path_, interleaved: bool
) -> list[Entry]:
  """Fused qkv Linear -> separate query/key/value DenseGeneral kernels (in, h, d) and biases (h, d).

  interleaved=False: rows [q (h*d) ; k ; v] (LLM c_attn, torch MultiheadAttention).
  interleaved=True: rows (h, 3, d) (Qwen ViT in_proj).
  """
  names = ("query", "key", "value")
  e = heads * hd

  def split_w(a: np.ndarray) -> list[np.ndarray]:
    parts = a.reshape(heads, 3, hd, in_dim) if interleaved else a.reshape(3, heads, hd, in_dim)
    out = []
    for j in range(3):
      p = parts[:, j] if interleaved else parts[j]  # (h, d, in)
      out.append(p.transpose(2, 0, 1))
    return out

  def join_w(xs: list[np.ndarray]) -> np.ndarray:
    parts = [x.transpose(1, 2, 0) for x in xs]  # (h, d, in)
    stacked = np.stack(parts, axis=1 if interleaved else 0)
    return stacked.reshape(3 * e, in_dim)

  def split_b(a: np.ndarray) -> list[np.ndarray]:
    parts = a.reshape(heads, 3, hd) if interleaved else a.reshape(3, heads, hd)
    return [parts[:, j] if interleaved else parts[j] for j in range(3)]

  def join_b(xs: list[np.ndarray]) -> np.ndarray:
    return np.stack(xs, axis=1 if interleaved else 0).reshape(3 * e)

  return [
    Entry(
      hf_w,
      (3 * e, in_dim),
      tuple((prefix + (n, "kernel"), (in_dim, heads, hd)) for n in names),
      split_w,
      join_w,
    ),
    Entry(hf_b, (3 * e,), tuple((prefix + (n, "bias"), (heads, hd)) for n in names), split_b, join_b),
  ]


def checkpoint_entries(cfg: QwenVLConfig) -> list[Entry]:
  """Every tensor of a Qwen-VL checkpoint (853 for the 7B) with its Flax leaves (unrolled layer names)."""
  e, v, h, d, f = cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  w, vh, vd, m = cfg.vision_width, cfg.vision_heads, cfg.vision_head_dim, cfg.vision_mlp_dim
  rh = cfg.num_resampler_heads
  rd = e // rh
  p, q = cfg.patch_size, cfg.n_queries
  out: list[Entry] = [_same("transformer.wte.weight", (v, e), ("llm", "wte", "embedding"))]
  for i in range(cfg.num_layers):
    t, fl = f"transformer.h.{i}.", ("llm", f"h_{i}")
    out += [
      _same(t + "ln_1.weight", (e,), fl + ("ln_1", "scale")),
      *_packed_qkv(
        t + "attn.c_attn.weight", t + "attn.c_attn.bias", h, d, e, fl + ("attn",), interleaved=False
      ),
      _linear_from_heads(t + "attn.c_proj.weight", e, h, d, fl + ("attn", "c_proj", "kernel")),
      _same(t + "ln_2.weight", (e,), fl + ("ln_2", "scale")),
      _linear(t + "mlp.w1.weight", f, e, fl + ("mlp", "w1", "kernel")),
      _linear(t + "mlp.w2.weight", f, e, fl + ("mlp", "w2", "kernel")),
      _linear(t + "mlp.c_proj.weight", e, f, fl + ("mlp", "c_proj", "kernel")),
    ]
  out += [
    _same("transformer.ln_f.weight", (e,), ("llm", "ln_f", "scale")),
    _linear("lm_head.weight", v, e, ("llm", "lm_head")),
  ]
  vis = "transformer.visual."
  out += [
    _one(
      vis + "conv1.weight",
      (w, 3, p, p),
      ("visual", "conv1", "kernel"),
      lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * 3, w),
      lambda a: a.reshape(p, p, 3, w).transpose(3, 2, 0, 1),
      (p * p * 3, w),
    ),
    _same(vis + "positional_embedding", (cfg.vision_pos_grid**2, w), ("visual", "positional_embedding")),
    _same(vis + "ln_pre.weight", (w,), ("visual", "ln_pre", "scale")),
    _same(vis + "ln_pre.bias", (w,), ("visual", "ln_pre", "bias")),
  ]
  for i in range(cfg.vision_layers):
    t, fl = f"{vis}transformer.resblocks.{i}.", ("visual", f"resblocks_{i}")
    out += [
      _same(t + "ln_1.weight", (w,), fl + ("ln_1", "scale")),
      _same(t + "ln_1.bias", (w,), fl + ("ln_1", "bias")),
      *_packed_qkv(
        t + "attn.in_proj.weight", t + "attn.in_proj.bias", vh, vd, w, fl + ("attn",), interleaved=True
      ),
      _linear_from_heads(t + "attn.out_proj.weight", w, vh, vd, fl + ("attn", "out", "kernel")),
      _same(t + "attn.out_proj.bias", (w,), fl + ("attn", "out", "bias")),
      _same(t + "ln_2.weight", (w,), fl + ("ln_2", "scale")),
      _same(t + "ln_2.bias", (w,), fl + ("ln_2", "bias")),
      _linear(t + "mlp.c_fc.weight", m, w, fl + ("mlp", "c_fc", "kernel")),
      _same(t + "mlp.c_fc.bias", (m,), fl + ("mlp", "c_fc", "bias")),
      _linear(t + "mlp.c_proj.weight", w, m, fl + ("mlp", "c_proj", "kernel")),
      _same(t + "mlp.c_proj.bias", (w,), fl + ("mlp", "c_proj", "bias")),
    ]
  ap, fl = vis + "attn_pool.", ("visual", "attn_pool")
  out += [
    _same(ap + "query", (q, e), fl + ("query",)),
    _same(ap + "pos_embed", (q, e), fl + ("pos_embed",)),
    _linear(ap + "kv_proj.weight", e, w, fl + ("kv_proj", "kernel")),
    *_packed_qkv(
      ap + "attn.in_proj_weight", ap + "attn.in_proj_bias", rh, rd, e, fl + ("attn",), interleaved=False
    ),
    _linear_from_heads(ap + "attn.out_proj.weight", e, rh, rd, fl + ("attn", "out", "kernel")),
    _same(ap + "attn.out_proj.bias", (e,), fl + ("attn", "out", "bias")),
    _same(ap + "ln_q.weight", (e,), fl + ("ln_q", "scale")),
    _same(ap + "ln_q.bias", (e,), fl + ("ln_q", "bias")),
    _same(ap + "ln_kv.weight", (e,), fl + ("ln_kv", "scale")),
    _same(ap + "ln_kv.bias", (e,), fl + ("ln_kv", "bias")),
    _same(vis + "ln_post.weight", (e,), ("visual", "ln_post", "scale")),
    _same(vis + "ln_post.bias", (e,), ("visual", "ln_post", "bias")),
    _same(vis + "proj", (e, e), ("visual", "proj")),  # used as x @ proj: already (in, out)
  ]
  return out


def _scan_location(cfg: QwenVLConfig, path: Path_) -> tuple[Path_, int | None, int]:
  """Unrolled path -> (path in the actual tree, layer index or None, number of layers)."""
  if cfg.scan_layers and len(path) > 1:
    for key, n in (("h", cfg.num_layers), ("resblocks", cfg.vision_layers)):
      if path[1].startswith(key + "_") and path[1][len(key) + 1 :].isdigit():
        return (path[0], key) + path[2:], int(path[1][len(key) + 1 :]), n
  return path, None, 0


# ---------------------------------------------------------------------------------------- file reading


def _read_safetensors_header(fname: Path) -> tuple[dict[str, Any], int]:
  with open(fname, "rb") as fh:
    raw = fh.read(8)
    if len(raw) != 8:
      raise ValueError(f"{fname}: not a safetensors file (shorter than 8 bytes)")
    n = struct.unpack("<Q", raw)[0]
    header = json.loads(fh.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


def _iter_safetensors(fname: Path) -> Iterator[tuple[str, np.ndarray]]:
  """Reads each tensor into its own array (not a memory map: pages of a mapped file count in the process's
  RSS as long as any view into it lives, so an aliased view would keep a whole shard resident)."""
  header, base = _read_safetensors_header(fname)
  with open(fname, "rb", buffering=0) as fh:
    for name, info in header.items():
      if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{fname}: tensor {name} has unsupported dtype {info['dtype']}")
      start, end = info["data_offsets"]
      arr = np.empty(info["shape"], _ST_DTYPES[info["dtype"]])
      if arr.nbytes != end - start:
        raise ValueError(f"{fname}: tensor {name} has {end - start} bytes, its shape/dtype need {arr.nbytes}")
      buf = memoryview(arr.reshape(-1).view(np.uint8))
      fh.seek(base + start)
      got = 0
      while got < len(buf):  # read() returns at most ~2 GiB per call on Linux
        n = fh.readinto(buf[got:])
        if not n:
          raise ValueError(f"{fname}: file ends inside tensor {name} (truncated download?)")
        got += n
      yield name, arr


def _iter_torch_bin(fname: Path) -> Iterator[tuple[str, np.ndarray]]:
  import torch  # only needed for .bin checkpoints

  state = torch.load(fname, map_location="cpu", weights_only=True, mmap=True)
  for name, t in state.items():
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
      arr = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      arr = t.contiguous().numpy()
    yield name, arr


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
  """Weight files of a HF checkpoint dir, in index order (safetensors preferred over .bin)."""
  root = Path(path)
  for index_name, single in (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
  ):
    index = root / index_name
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = list(dict.fromkeys(weight_map.values()))
      missing = [f for f in files if not (root / f).exists()]
      if missing:
        raise FileNotFoundError(f"{index}: lists shard(s) {missing} that are not in {root}; download them")
      return [root / f for f in files]
    if (root / single).exists():
      return [root / single]
  raise FileNotFoundError(
    f"{root}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json] found"
  )


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, Path]]:
  """(name, array, file) for every tensor of the checkpoint, one at a time (.bin: memory-mapped views)."""
  for fname in checkpoint_files(path):
    reader = _iter_safetensors if fname.suffix == ".safetensors" else _iter_torch_bin
    for name, arr in reader(fname):
      yield name, arr, fname


# ---------------------------------------------------------------------------------------- import


def _set(tree: dict, path: Path_, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Any, path: Path_) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _shardings_from_rules(
  cfg: QwenVLConfig, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]] | None
) -> Any:
  from bird_jax.model.qwen_vl import abstract_params

  spec = nn.get_partition_spec(abstract_params(cfg))
  return nn.logical_to_mesh_sharding(spec, mesh, rules)


def load_params(
  path: str | os.PathLike,
  cfg: QwenVLConfig,
  *,
  shardings: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] | None = None,
  dtypes: Any = None,
) -> dict:
  """Reads the checkpoint at `path` into a Flax param tree for `cfg` (plain jax arrays in cfg.param_dtype, or
  per leaf in `dtypes`, a pytree of dtypes matching the param tree, e.g. a LoRA run's bf16 frozen base).

  shardings: pytree of jax.sharding.Sharding matching the param tree; or mesh (+ logical `rules`, e.g. the
  lead's sharding rules) to derive them from the model's logical axis names. Neither: default device.
  The tree holds the checkpoint's tensors only: LoRA adapters (not in a Qwen-VL checkpoint) are left out.
  """
  if shardings is None and mesh is not None:
    shardings = _shardings_from_rules(cfg, mesh, rules)
  dtype = cfg.params_dtype
  entries = {en.hf_name: en for en in checkpoint_entries(cfg)}
  seen: set[str] = set()
  unexpected: list[str] = []
  params: dict = {}
  pending: dict[Path_, tuple[np.ndarray, set[int]]] = {}  # scanned leaves being stacked

  def place(path: Path_, value: np.ndarray) -> None:
    try:
      sharding = _get(shardings, path) if shardings is not None else None
    except (KeyError, TypeError, IndexError):
      raise ValueError(
        f"shardings have no entry for param {'/'.join(path)}; build them for the same config "
        f"(scan_layers={cfg.scan_layers}: pass scan_layers= to load_pretrained to match)"
      ) from None
    try:
      _set(params, path, jax.device_put(value, sharding) if sharding is not None else jax.device_put(value))
    except ValueError as e:  # typically a dim not divisible by its mesh axes: name the param and the rule
      raise ValueError(f"cannot place param {'/'.join(path)} {value.shape} with {sharding}: {e}") from e

  for name, arr, fname in iter_checkpoint(path):
    en = entries.get(name)
    if en is None:
      unexpected.append(name)
      continue
    if tuple(arr.shape) != en.hf_shape:
      raise ValueError(
        f"{fname}: tensor {name} has shape {tuple(arr.shape)}, expected {en.hf_shape} for this "
        f"config (check config.json matches the weights)"
      )
    if name in seen:
      raise ValueError(f"{fname}: tensor {name} appears twice in the checkpoint")
    seen.add(name)
    for (fpath, fshape), value in zip(en.targets, en.split(np.asarray(arr)), strict=True):
      assert value.shape == fshape, (name, fpath, value.shape, fshape)
      real_path, layer, n = _scan_location(cfg, fpath)
      value = np.ascontiguousarray(value, dtype=dtype if dtypes is None else _get(dtypes, real_path))
      if layer is None:
        place(real_path, value)
        continue
      buf, done = pending.setdefault(real_path, (np.empty((n,) + fshape, dtype), set()))
      buf[layer] = value
      done.add(layer)
      if len(done) == n:
        place(real_path, buf)
        del pending[real_path]
  if unexpected:
    raise ValueError(
      f"{path}: {len(unexpected)} unexpected tensor(s) not in Qwen-VL's layout for this config, "
      f"e.g. {unexpected[:5]} (wrong checkpoint type, or a GPTQ/Int4 checkpoint?)"
    )
  missing = [n for n in entries if n not in seen]
  if missing:
    raise ValueError(
      f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:5]} (incomplete download or "
      f"num_hidden_layers/visual.layers in config.json too large)"
    )
  return params


def load_pretrained(
  path: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] | None = None,
  shardings: Any = None,
  **config_overrides: Any,
) -> tuple[QwenVLConfig, dict]:
  """HF Qwen-VL checkpoint dir -> (QwenVLConfig, params). dtype = compute dtype; params stored in
  param_dtype (default: dtype). config_overrides go to QwenVLConfig (e.g. scan_layers=True, remat_policy)."""
  cfg_file = Path(path) / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(
      f"{cfg_file} not found: point load_pretrained at a Hugging Face Qwen-VL checkpoint dir"
    )
  cfg = QwenVLConfig.from_hf_config(
    json.loads(cfg_file.read_text()), dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides
  )
  return cfg, load_params(path, cfg, shardings=shardings, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------- export


def _to_host(x: Any) -> np.ndarray:
  x = nn.unbox(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _write_safetensors(fname: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, arr in tensors:
    header[name] = {
      "dtype": _ST_NAMES[arr.dtype],
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
  tmp = fname.with_suffix(fname.suffix + ".tmp")
  with open(tmp, "wb") as fh:
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for _, arr in tensors:
      fh.write(np.ascontiguousarray(arr).tobytes())
  tmp.replace(fname)


def export_hf(
  params: dict,
  cfg: QwenVLConfig,
  out_dir: str | os.PathLike,
  *,
  shard_size: int = 5 * 2**30,
  dtype: str | None = "bfloat16",
  extra_files_from: str | os.PathLike | None = None,
) -> list[Path]:
  """Writes params as a Qwen-VL HF checkpoint: safetensors shards + index json + config.json.

  dtype: tensor dtype in the files (None: keep the params' dtype). extra_files_from: copy the non-weight files
  of that dir (tokenizer, generation_config.json, remote-code .py) so the result loads with the HF code.
  Only process 0 writes (all processes must call it when params are sharded across hosts).
  """
  import shutil

  out = Path(out_dir)
  write = jax.process_index() == 0
  if write:
    out.mkdir(parents=True, exist_ok=True)
  entries = checkpoint_entries(cfg)
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype) if dtype else None)

  # Plan shards from shapes first so file names can say "-of-N".
  itemsize = lambda: target.itemsize if target is not None else None
  plan: list[list[Entry]] = [[]]
  size = 0
  for en in entries:
    nbytes = int(np.prod(en.hf_shape)) * (itemsize() or _leaf_dtype(params, cfg, en).itemsize)
    if plan[-1] and size + nbytes > shard_size:
      plan.append([])
      size = 0
    plan[-1].append(en)
    size += nbytes
  n = len(plan)
  weight_map: dict[str, str] = {}
  total = 0
  files = []
  for k, group in enumerate(plan):
    fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    tensors = []
    for en in group:
      arr = _hf_tensor(params, cfg, en, target)
      tensors.append((en.hf_name, np.ascontiguousarray(arr)))
      weight_map[en.hf_name] = fname
      total += arr.nbytes
    if write:
      _write_safetensors(out / fname, tensors)
    files.append(out / fname)
  if write:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_cfg = cfg.to_hf_config()
    if dtype:
      hf_cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if extra_files_from is not None:
      for src in Path(extra_files_from).iterdir():
        skip = (
          src.suffix in (".safetensors", ".bin")
          or src.name.endswith(".index.json")
          or src.name == "config.json"
        )
        if src.is_file() and not skip:
          shutil.copyfile(src, out / src.name)
  return files


def _hf_tensor(params: dict, cfg: QwenVLConfig, en: Entry, target: np.dtype | None) -> np.ndarray:
  parts = []
  for fpath, _ in en.targets:
    real_path, layer, _n = _scan_location(cfg, fpath)
    leaf = _to_host(_get(params, real_path))
    parts.append(leaf if layer is None else leaf[layer])
  arr = en.join(parts)
  if target is not None:
    arr = arr.astype(target)
  if tuple(arr.shape) != en.hf_shape:
    raise ValueError(f"param for {en.hf_name} has shape {arr.shape}, expected {en.hf_shape}")
  return np.ascontiguousarray(arr)


def to_hf_state_dict(params: dict, cfg: QwenVLConfig, dtype: str | None = None) -> dict[str, np.ndarray]:
  """All checkpoint tensors in memory (torch names and layouts), e.g. to build a PyTorch reference model."""
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype) if dtype else None)
  return {en.hf_name: _hf_tensor(params, cfg, en, target) for en in checkpoint_entries(cfg)}


def _leaf_dtype(params: dict, cfg: QwenVLConfig, en: Entry) -> np.dtype:
  real_path, _, _ = _scan_location(cfg, en.targets[0][0])
  return np.dtype(nn.unbox(_get(params, real_path)).dtype)
