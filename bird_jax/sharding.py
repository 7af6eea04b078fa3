"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names every weight and activation dimension (`embed`, `mlp`, `heads`, `vocab`, `vit_*` …);
this module alone decides where those names live on the ('data', 'fsdp', 'tensor') mesh, so a new
hardware target is a new config, not a model change (MaxText's `logical_axis_rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the large weight dims, tensor parallelism the head/MLP/vocab dims, activations split their
# batch over data+fsdp. A name missing here (or mapped to None) is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("norm", None),
  ("vit_embed", "fsdp"),
  ("vit_heads", "tensor"),
  ("vit_kv", None),
  ("vit_mlp", "tensor"),
  ("vit_layers", None),
  ("vit_patch", None),
  ("resampler_embed", "fsdp"),
  ("resampler_queries", None),
  # The chunked LM loss (train_step.chunked_token_nll) runs vocabulary-parallel: the head's vocabulary over
  # every model axis, each chunk's rows gathered over them.
  ("loss_batch", "data"),
  ("loss_embed", None),
  ("loss_vocab", ("fsdp", "tensor")),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in the single -1 so the product equals the device count; errors name the fix."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} has more than one -1; set all but one axis explicitly")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices but {num_devices} exist")
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  resolved = resolve_mesh_shape(shape, len(devices))
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(resolved, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(resolved)
  # Plain Mesh keeps Auto axis types: Explicit axes (jax.make_mesh's default) reject sharded contractions.
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree produced under `nn.with_logical_partitioning` (boxed or specs). A dim that does
  not divide over its mesh axes is a one-line ConfigError naming the param, its logical axis and the fix (XLA's
  own error names neither)."""
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  _check_divisible(abstract_tree, shardings, mesh)
  return shardings


def _check_divisible(abstract_tree, shardings, mesh: Mesh) -> None:
  from bird_jax.config_util import ConfigError

  def check(path, boxed, sharding) -> None:
    if not isinstance(boxed, nn.LogicallyPartitioned):
      return
    names = boxed.names
    for dim, (size, axes) in enumerate(zip(boxed.value.shape, sharding.spec, strict=False)):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      parts = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if size % parts:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(
          f"mesh {dict(mesh.shape)}: param {where} {tuple(boxed.value.shape)} has {size} along '{names[dim]}', "
          f"which does not divide over mesh axes {'x'.join(axes)} ({parts} devices); choose a --config.mesh.shape "
          "whose axes divide the model's dims (e.g. tensor=1, or a tensor size dividing the head counts)")

  jax.tree_util.tree_map_with_path(check, abstract_tree, shardings,
                                   is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (restore targets, ahead-of-time lowering)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
