"""Checkpoint damage on real Orbax folders: each way the newest step can be damaged (a truncated array file, a
deleted state metadata file, a garbage manifest, garbage or edited iterator JSON, flipped bytes, arrays that decode
but are not the saved ones, a missing meta item) makes restore fall back to the newest valid step with one
warning naming what it skipped, never deleting the good one; with no valid step it is one line. A leftover
`*.orbax-checkpoint-tmp*` folder is not a step. Resharding on restore (8 devices -> 1) works and verifies."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bird_jax.checkpoint import Checkpointer, CheckpointMismatch, DamagedCheckpoint, state_checksums


def make_state(seed: int) -> dict:
  """The trainer's state shape in small: a step, bf16 and fp32 params and an optax state (namedtuples)."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(32,)), jnp.bfloat16)}
  opt_state = optax.adamw(1e-3).init(params)
  return {"step": jnp.int32(seed), "params": params, "opt_state": opt_state}


def abstract_of(state: dict) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def two_steps(tmp_path) -> Path:
  """A checkpoint folder with steps 1 and 2 (data states {"next_index": 10 * step})."""
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  for step in (1, 2):
    ckpt.save(step, make_state(step), data_state={"next_index": 10 * step}, meta={"config": "toy"})
  ckpt.close()
  return tmp_path / "ckpt"


def biggest_array_file(step_dir: Path) -> Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
             key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> None:
  f = biggest_array_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bytes(step_dir: Path) -> None:
  f = biggest_array_file(step_dir)
  data = bytearray(f.read_bytes())
  for k in range(len(data) // 2, len(data) // 2 + 8):
    data[k] ^= 0xFF
  f.write_bytes(bytes(data))


def other_arrays(step_dir: Path) -> None:
  """Step 1's arrays in step 2's folder: everything decodes, only the checksums can tell."""
  shutil.rmtree(step_dir / "state")
  shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


def edit_data(step_dir: Path) -> None:
  (step_dir / "data" / "metadata").write_text(json.dumps({"something_else": 20}))


DAMAGE = {
  "truncated array file": truncate,
  "deleted state metadata": lambda d: (d / "state" / "_METADATA").unlink(),
  "garbage manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage" * 9),
  "garbage data JSON": lambda d: (d / "data" / "metadata").write_text("{not json"),
  "iterator state without next_index": edit_data,
  "flipped bytes": flip_bytes,
  "arrays of another step": other_arrays,
  "deleted meta": lambda d: shutil.rmtree(d / "meta"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_step_falls_back_to_the_newest_valid_one(two_steps, damage, caplog):
  DAMAGE[damage](two_steps / "2")
  ckpt = Checkpointer(two_steps, max_to_keep=5)
  with caplog.at_level(logging.WARNING, logger="bird_jax"):
    state, data_state, meta = ckpt.restore(abstract_of(make_state(0)), set_aside=True)
  want = make_state(1)
  assert int(state["step"]) == 1 and meta["step"] == 1 and data_state == {"next_index": 10}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(want["params"]["w"]))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "bird_jax"]
  assert len(warnings) == 1 and "skipped damaged step(s) 2 (" in warnings[0] and "resumed from step 1" in warnings[0]
  assert "\n" not in warnings[0]
  # the damaged step is set aside (not deleted), the good one untouched, and the run can write step 2 again
  assert (two_steps.parent / "ckpt.damaged" / "2").is_dir() and (two_steps / "1").is_dir()
  assert ckpt.all_steps() == [1]
  ckpt.save(2, want, data_state={"next_index": 20}, meta={"config": "toy"})
  ckpt.close()


def test_no_valid_step_is_one_line(two_steps):
  for step in ("1", "2"):
    truncate(two_steps / step)
  with pytest.raises(DamagedCheckpoint) as e:
    Checkpointer(two_steps).restore(abstract_of(make_state(0)))
  msg = str(e.value)
  assert "\n" not in msg and "step 2:" in msg and "step 1:" in msg and "move that folder away" in msg
  assert (two_steps / "1").is_dir() and (two_steps / "2").is_dir()  # nothing deleted without set_aside


def test_a_checkpoint_of_another_setup_is_refused_before_its_state_is_read(tmp_path):
  """Another LoRA rank (or scan_layers) also means another state shape: the metadata is compared first, so the
  run gets CheckpointMismatch naming both settings instead of the step failing to restore, being taken for
  damaged and set aside."""
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, make_state(1), data_state={"next_index": 10}, meta={"lora": {"lora_rank": 4}})
  ckpt.close()
  other_shape = {**make_state(0), "params": {"w": jnp.zeros((64, 8)), "b": jnp.zeros((32,), jnp.bfloat16)}}
  with pytest.raises(CheckpointMismatch, match=r"written with lora=\{'lora_rank': 4\}, this run has lora="):
    Checkpointer(tmp_path / "ckpt").restore(abstract_of(other_shape), expect_meta={"lora": {"lora_rank": 8}},
                                            set_aside=True)
  assert (tmp_path / "ckpt" / "1").is_dir() and not (tmp_path / "ckpt.damaged").exists()


def test_leftover_tmp_folder_is_not_a_step(two_steps):
  tmp = two_steps / "3.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"half written")
  ckpt = Checkpointer(two_steps, max_to_keep=5)
  assert ckpt.all_steps() == [1, 2]
  state, _, meta = ckpt.restore(abstract_of(make_state(0)))
  assert meta["step"] == 2 and int(state["step"]) == 2
  assert not tmp.exists()  # cleanup_tmp_directories removed it
  ckpt.close()


def test_restore_onto_another_device_count_reshards_and_verifies(tmp_path):
  """Saved sharded over 8 devices, restored onto 1: Orbax reshards; the checksums (sharding-independent) match."""
  mesh8 = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])
  state = make_state(3)
  state["params"]["w"] = jax.device_put(state["params"]["w"], NamedSharding(mesh8, PartitionSpec("d", None)))
  sums = state_checksums(state)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, state, data_state={}, meta={"mesh": [8]})
  ckpt.close()
  one = NamedSharding(jax.make_mesh((1,), ("d",), devices=jax.devices()[:1]), PartitionSpec())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
  restored, _, meta = Checkpointer(tmp_path / "ckpt").restore(target)
  assert meta["mesh"] == [8] and state_checksums(restored) == sums
  assert restored["params"]["w"].sharding == one
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))


def test_checksum_sees_one_flipped_bit():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
  bits = np.asarray(x).view(np.uint32).copy()
  bits[5, 3] ^= 1 << 31
  y = jnp.asarray(bits.view(np.float32))
  assert state_checksums({"x": x}) != state_checksums({"x": y})
  # a swap of two elements (same multiset of values) is seen too: the sum is position-weighted
  z = np.asarray(x).copy()
  z[[0, 1]] = z[[1, 0]]
  assert state_checksums({"x": x}) != state_checksums({"x": jnp.asarray(z)})
