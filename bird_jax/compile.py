"""Compiles the exact train step of a config for a TPU slice, on this machine, without the TPU.

  python -m bird_jax.compile --config=tpu_v4                      # the slice named in the config (v4-16)
  python -m bird_jax.compile --config=tpu_v5e --topology=v5e-32 --config.train.grad_accum=16

The step is `bird_jax.train_step.build_train_step`, the one `python -m bird_jax.train` runs, lowered with
abstract state and batch in their shardings over the slice's devices and compiled by libtpu
(`pip install -e ".[tpu]"`). It prints, per device: parameters, optimizer state, the batch, XLA's temporaries
and the total against the chip's HBM with the headroom; XLA's FLOPs next to the analytic count; and the bytes
each collective kind moves as written in the HLO. A step that does not fit exits 1 with one line.

Slice names are the ones rented: `v4-N` and `v5p-N` count TensorCores (two per chip, one megacore device per
chip), `v5e-N` counts chips. `v4-16` is libtpu's topology `v4:2x2x2` with chip config `megacore`: 8 devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

GiB = 1024**3

# Shapes of the 3-D tori (v4, v5p) by chip count, and of the 2-D v5e slices.
_TORUS = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
          256: "4x8x8"}
_V5E = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# HBM per device available to XLA, as libtpu reports it in its out-of-memory errors.
HBM_BYTES = {"v4": 30.75 * GiB, "v5e": 15.75 * GiB, "v5p": 95.74 * GiB}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # e.g. "v4-16"
  generation: str  # "v4", "v5e", "v5p"
  topology: str  # libtpu's name, e.g. "v4:2x2x2"
  chip_config: str  # "megacore" or "default"
  devices: int
  hbm_bytes: float
  # Slices smaller than one host (v4-2/4, v5p-2/4: one or two chips) need libtpu told the host's bounds.
  host_bounds: tuple[int, ...] | None = None


def parse_slice(name: str) -> Slice:
  """'v4-16' -> Slice(topology='v4:2x2x2', chip_config='megacore', devices=8, ...)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v5litepod)-(\d+)", name.strip().lower())
  if not m:
    raise ValueError(f"--topology={name!r}: use a slice name such as v4-16, v5e-16 or v5p-8")
  gen, n = ("v5e" if m.group(1) == "v5litepod" else m.group(1)), int(m.group(2))
  if gen == "v5e":
    if n not in _V5E:
      raise ValueError(f"--topology={name}: v5e slices have {sorted(_V5E)} chips")
    return Slice(name, gen, f"v5e:{_V5E[n]}", "default", n, HBM_BYTES[gen])
  chips = n // 2
  if n % 2 or chips not in _TORUS:
    raise ValueError(f"--topology={name}: {gen} slices count TensorCores, two per chip: "
                     f"{', '.join(f'{gen}-{2 * c}' for c in sorted(_TORUS))}")
  prefix = "v4" if gen == "v4" else "v5"
  bounds = tuple(int(d) for d in _TORUS[chips].split("x")) if chips < 4 else None
  return Slice(name, gen, f"{prefix}:{_TORUS[chips]}", "megacore", chips, HBM_BYTES[gen], bounds)


def slice_devices(sl: Slice) -> list[Any]:
  from jax.experimental import topologies

  extra = {"chips_per_host_bounds": sl.host_bounds} if sl.host_bounds else {}
  topo = topologies.get_topology_desc(sl.topology, platform="tpu", chip_config_name=sl.chip_config, **extra)
  devices = list(topo.devices)
  if len(devices) != sl.devices:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {sl.topology} ({sl.chip_config}), "
                       f"expected {sl.devices}")
  return devices


# ------------------------------------------------------------------------------------------------ HLO reading

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count": ops, "bytes": result bytes}} over the HLO's collectives (a `-start`/`-done` pair counts
  once). Ops inside a loop body are counted once, not per trip."""
  out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    result, kind = m.group(1), m.group(2)
    shapes = _SHAPE_RE.findall(result)
    if m.group(3) and len(shapes) > 1:  # async start: (operand, result[, context]) tuple -> the result
      shapes = shapes[1:2]
    nbytes = sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in shapes)
    out[kind]["count"] += 1
    out[kind]["bytes"] += nbytes
  return out


def per_device_bytes(tree: Any) -> float:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax
  import numpy as np

  total = 0.0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += float(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


# ------------------------------------------------------------------------------------------------ the compile


class DoesNotFit(RuntimeError):
  pass


def compile_step(config, sl: Slice, name: str = "") -> dict[str, Any]:
  """Lower and compile the config's train step for the slice; the report as a dict (raises DoesNotFit)."""
  import jax

  from bird_jax import sharding as shd
  from bird_jax.flops import train_step_flops
  from bird_jax.model import QwenVLConfig
  from bird_jax.train_step import abstract_batch, build_train_step, images_per_row, lora_fields, model_config_from

  devices = slice_devices(sl)
  mesh = shd.make_mesh(config.mesh.shape, devices)
  model_cfg = (model_config_from(config, None) if config.init_from
               else QwenVLConfig(**config.model.to_dict(), **lora_fields(config)))
  tc = config.train
  warnings = []
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.batch_size % batch_shards or tc.batch_size % tc.grad_accum:
    raise ValueError(f"train.batch_size {tc.batch_size} must divide by the {batch_shards} batch shards (data x fsdp) "
                     f"of mesh {dict(mesh.shape)} and by train.grad_accum {tc.grad_accum}")
  if (tc.batch_size // tc.grad_accum) % batch_shards:
    warnings.append(f"micro-batches of {tc.batch_size // tc.grad_accum} rows (batch_size / grad_accum) do not "
                    f"divide over the {batch_shards} batch shards: some devices idle or pad")
  parts = build_train_step(config, model_cfg, mesh)
  state = shd.abstract_with_shardings(parts.abstract_state, parts.state_shardings)
  batch = abstract_batch(config, model_cfg, mesh)
  with jax.set_mesh(mesh):
    lowered = parts.step.lower(state, batch)
    try:
      compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the step does not fit
      msg = str(e)
      if "RESOURCE_EXHAUSTED" in msg or "exceeds" in msg:
        found = re.search(r"(HLO temporaries[^.\n]*?exceeds available HBM \([^)]*\))", msg) or re.search(
          r"(Used [^\n]*? of [^\n]*? hbm[^\n]*)", msg)
        raise DoesNotFit(found.group(1) if found else msg.splitlines()[0][:300]) from None
      raise
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  n_img = images_per_row(config, model_cfg.n_queries)
  analytic = train_step_flops(model_cfg, batch=tc.batch_size, seq_len=config.data.seq_len, images_per_row=n_img,
                              train_vit=tc.train_vit, train_resampler=tc.train_resampler, train_llm=tc.train_llm)
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  params_b = per_device_bytes(state["params"])
  opt_b = per_device_bytes(state["opt_state"])
  return {
    "config": name, "slice": sl.name, "topology": sl.topology, "chip_config": sl.chip_config,
    "devices": sl.devices, "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
    "batch": tc.batch_size, "grad_accum": tc.grad_accum, "seq_len": config.data.seq_len, "images_per_row": n_img,
    "params_bytes": params_b, "opt_state_bytes": opt_b, "batch_bytes": per_device_bytes(batch),
    "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
    "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
    "code_bytes": mem.generated_code_size_in_bytes, "total_bytes": total, "hbm_bytes": sl.hbm_bytes,
    "headroom": 1.0 - total / sl.hbm_bytes,
    "xla_flops": float(cost.get("flops", 0.0)), "analytic_flops_per_device": analytic.total / sl.devices,
    "analytic_flops": dataclasses.asdict(analytic), "loops_counted_once": bool(model_cfg.scan_layers
                                                                               or tc.grad_accum > 1),
    "collectives": collective_bytes(compiled.as_text()), "warnings": warnings,
  }


def format_report(r: dict[str, Any]) -> str:
  g = lambda b: f"{b / GiB:8.2f} GiB"
  lines = [
    f"{r['config']} on {r['slice']} ({r['topology']}, {r['chip_config']}: {r['devices']} x {r['device_kind']}, "
    f"{r['hbm_bytes'] / GiB:.2f} GiB HBM each), mesh {r['mesh']}",
    f"batch {r['batch']} x {r['seq_len']} tokens ({r['images_per_row']} image slots per row), "
    f"grad_accum {r['grad_accum']}",
    "per device:",
    f"  parameters        {g(r['params_bytes'])}",
    f"  optimizer state   {g(r['opt_state_bytes'])}",
    f"  batch             {g(r['batch_bytes'])}",
    f"  temporaries       {g(r['temp_bytes'])}   (gradients, activations, XLA buffers)",
    f"  total             {g(r['total_bytes'])}   of {r['hbm_bytes'] / GiB:.2f} GiB: headroom {r['headroom']:.1%}",
    f"FLOPs per device per step: analytic {r['analytic_flops_per_device']:.3e}; XLA {r['xla_flops']:.3e}"
    + ("  (XLA counts each scanned loop body once: layers and grad_accum)" if r["loops_counted_once"] else ""),
    "collectives in the HLO (each op once; loop bodies once):",
  ]
  for kind, c in r["collectives"].items():
    if c["count"]:
      lines.append(f"  {kind:<19}{c['count']:5d} ops  {c['bytes'] / GiB:9.3f} GiB")
  lines += [f"warning: {w}" for w in r["warnings"]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target; never look for one here
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from bird_jax.config_util import ConfigError, parse_config_flags

  argv = sys.argv[1:] if argv is None else argv
  topology, out_json, min_headroom, rest = "", "", "0", []
  for a in argv:
    if a.startswith("--topology="):
      topology = a.split("=", 1)[1]
    elif a.startswith("--json="):
      out_json = a.split("=", 1)[1]
    elif a.startswith("--min_headroom="):
      min_headroom = a.split("=", 1)[1]
    else:
      rest.append(a)
  try:
    try:
      min_headroom = float(min_headroom)
    except ValueError:
      raise ConfigError(f"--min_headroom={min_headroom}: use a fraction, e.g. 0.1 for 10 %") from None
    config, name, unknown = parse_config_flags(rest)
    if unknown:
      raise ConfigError(f"unknown arguments {unknown}; use --config=NAME, --topology=SLICE and --config.FIELD=VALUE")
    topology = topology or config.get("topology", "")
    if not topology:
      raise ConfigError(f"config {name} names no slice; pass --topology=v4-16 (or v5e-16, v5p-8, ...)")
    sl = parse_slice(topology)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print('error: compiling for a TPU needs libtpu: pip install -e ".[tpu]"', file=sys.stderr)
    raise SystemExit(2) from None
  try:
    report = compile_step(config, sl, name)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  except DoesNotFit as e:
    print(f"error: {name} does not fit {sl.name} ({sl.devices} x {sl.hbm_bytes / GiB:.2f} GiB): {e}",
          file=sys.stderr)
    raise SystemExit(1) from None
  print(format_report(report), flush=True)
  if out_json:
    Path(out_json).write_text(json.dumps(report, indent=2))
  if report["headroom"] < 0:
    print(f"error: {name} does not fit {sl.name}: {report['total_bytes'] / GiB:.2f} GiB per device of "
          f"{sl.hbm_bytes / GiB:.2f} GiB HBM (temporaries {report['temp_bytes'] / GiB:.2f} GiB); raise "
          "train.grad_accum, use more chips or a lighter remat_policy", file=sys.stderr)
    raise SystemExit(1)
  if report["headroom"] < min_headroom:
    print(f"error: headroom {report['headroom']:.1%} is below --min_headroom={min_headroom:.0%}", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
  main()
