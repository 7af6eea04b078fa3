"""Grain pipeline on a real array_record TFDS build: shapes, exact loss masks, label shift, truncation and
drop counts, packing, determinism, sharding, checkpointed iterator state, worker processes, eval records and
global batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bird_jax.data import pipeline as P
from bird_jax.data.image import preprocess_image
from bird_jax.data.med_grit import Builder
from bird_jax.data.tiny_dataset import TASKS, write_tiny_med_grit
from bird_jax.tokenizer import chatml_tokenize, train_demo_tokenizer

S = 28  # image size: small, the preprocessing itself is tested elsewhere


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  written = write_tiny_med_grit(root / "folder", n_train=12, n_test_per_task=2, max_turns=3)
  Builder(config="generated", data_dir=root / "tfds", file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=root / "folder"))
  texts = [u + " " + a for r in written["train"] for u, a in r["conversations"]]
  tok = train_demo_tokenizer(texts, root / "tok", vocab_size=512, image_tokens=64)
  train = P.load_split(str(root / "tfds"), "train")
  by_first_user = {r["conversations"][0][0]: r for r in written["train"]}
  return {"root": root, "written": written, "tok": tok, "train": train, "by_first_user": by_first_user,
          "test": P.load_split(str(root / "tfds"), "test")}


def _all_rows(ds) -> list[dict[str, np.ndarray]]:
  return [{k: v[i] for k, v in b.items()} for b in ds for i in range(len(b["input_ids"]))]


def _segments(row: dict[str, np.ndarray]) -> list[np.ndarray]:
  return [np.flatnonzero(row["segment_ids"] == k) for k in range(1, int(row["segment_ids"].max()) + 1)]


def _record_of(env, tok, ids: np.ndarray) -> dict:
  text = tok.decode(ids)
  hits = [r for u, r in env["by_first_user"].items() if u in text]
  assert len(hits) == 1, text
  return hits[0]


def _expected_image(env, image_id: str) -> np.ndarray:
  from PIL import Image
  return preprocess_image(Image.open(env["root"] / "folder" / "images" / f"{image_id}.png"), S)


def _turn_lengths(tok, turns) -> list[int]:
  """Token length of the conversation cut after 1, 2, ... turns (computed without the pipeline)."""
  return [len(chatml_tokenize(tok, turns[:k])[0]) for k in range(1, len(turns) + 1)]


def test_batch_fields_masks_and_images(env):
  tok = env["tok"]
  ds = P.make_train_dataset(env["train"], tok, seq_len=400, image_size=S, batch_size=3, seed=0, num_epochs=1)
  batches = list(ds)
  assert len(batches) == 4  # 12 records, none too long at 400 tokens, drop_remainder
  b = batches[0]
  want = {"input_ids": (np.int32, (3, 400)), "labels": (np.int32, (3, 400)),
          "loss_mask": (np.float32, (3, 400)), "segment_ids": (np.int32, (3, 400)),
          "positions": (np.int32, (3, 400)),
          "pixel_values": (np.float32, (3, 1, S, S, 3))}
  assert {k: (v.dtype.type, v.shape) for k, v in b.items()} == want
  for row in _all_rows(batches):
    n = int((row["segment_ids"] == 1).sum())
    assert np.array_equal(row["segment_ids"], (np.arange(400) < n).astype(np.int32))
    assert np.array_equal(row["positions"][:n], np.arange(n)) and not row["positions"][n:].any()
    assert np.array_equal(row["labels"][:-1], row["input_ids"][1:]) and row["labels"][-1] == tok.pad_id
    assert (row["input_ids"][n:] == tok.pad_id).all()
    rec = _record_of(env, tok, row["input_ids"][:n])
    # Supervised labels are exactly every assistant answer followed by its <|im_end|>.
    supervised = tok.decode(row["labels"][row["loss_mask"] > 0])
    assert supervised == "".join(a + "<|im_end|>" for _, a in rec["conversations"])
    assert set(np.unique(row["loss_mask"])) <= {0.0, 1.0}
    assert np.allclose(row["pixel_values"][0], _expected_image(env, rec["id"]), atol=1e-6)
    assert tok.decode(row["input_ids"][:n]).count("<img>") == 1


def test_truncation_and_drop_counts(env):
  tok, train = env["tok"], env["train"]
  records = env["written"]["train"]
  lengths = {r["id"]: _turn_lengths(tok, r["conversations"]) for r in records}
  firsts = sorted(v[0] for v in lengths.values())
  seq_len = firsts[len(firsts) // 2]  # about half the records cannot fit their first turn
  kept = {i: sum(n <= seq_len for n in v) for i, v in lengths.items()}
  n_drop = sum(k == 0 for k in kept.values())
  n_trunc = sum(0 < kept[i] < len(v) for i, v in lengths.items())
  assert n_drop > 0 and n_trunc > 0, "fixture no longer exercises both cases"

  before = P.STATS.copy()
  ds = P.make_train_dataset(train, tok, seq_len=seq_len, image_size=S, batch_size=1, seed=3, num_epochs=1,
                            drop_remainder=False)
  rows = _all_rows(ds)
  assert len(rows) == len(records) - n_drop
  assert P.STATS["dropped_too_long"] - before["dropped_too_long"] == n_drop
  assert P.STATS["truncated_records"] - before["truncated_records"] == n_trunc
  for row in rows:
    n = int((row["segment_ids"] == 1).sum())
    rec = _record_of(env, tok, row["input_ids"][:n])
    k = kept[rec["id"]]
    assert n == lengths[rec["id"]][k - 1]  # whole turns only
    assert tok.decode(row["labels"][row["loss_mask"] > 0]) == "".join(
      a + "<|im_end|>" for _, a in rec["conversations"][:k])
  stats = P.scan_lengths(train, tok, seq_len)
  assert (stats["records"], stats["dropped"], stats["truncated"]) == (len(records), n_drop, n_trunc)


def test_packing_segments_images_and_masks(env):
  tok, records = env["tok"], env["written"]["train"]
  seq_len, k_max = 600, 3
  ds = P.make_train_dataset(env["train"], tok, seq_len=seq_len, image_size=S, batch_size=2, seed=1,
                            num_epochs=1, packing=True, max_images_per_row=k_max, drop_remainder=False)
  rows = _all_rows(ds)
  assert rows[0]["pixel_values"].shape == (k_max, S, S, 3)
  seen = []
  for row in rows:
    segs = _segments(row)
    assert 1 <= len(segs) <= k_max
    ends = [s[-1] + 1 for s in segs]
    assert [s[0] for s in segs] == [0, *ends[:-1]]  # contiguous, in order, padding only at the end
    assert not row["segment_ids"][ends[-1]:].any()
    for j, s in enumerate(segs):
      assert np.array_equal(row["positions"][s], np.arange(len(s)))
      assert tok.decode(row["input_ids"][s]).startswith("<|im_start|>system\n")
      rec = _record_of(env, tok, row["input_ids"][s])
      seen.append(rec["id"])
      # The j-th <img> of the row is this segment's image; its labels never cross into the next segment.
      assert np.allclose(row["pixel_values"][j], _expected_image(env, rec["id"]), atol=1e-6)
      labels_here = row["labels"][s][row["loss_mask"][s] > 0]
      assert tok.decode(labels_here) == "".join(a + "<|im_end|>" for _, a in rec["conversations"])
      assert row["loss_mask"][s[-1]] == 0
    assert not row["pixel_values"][len(segs):].any()
    assert int((row["input_ids"] == tok.special["img_start"]).sum()) == len(segs)
    # Greedy: the next record would not have fitted (tokens or image slots).
  assert sorted(seen) == sorted(r["id"] for r in records)
  assert len(rows) < len(records)  # packing actually packed


def test_packing_with_official_mask_never_crosses_segments(env):
  """In qwen_official mode a record's first token (<|im_start|>) is a target; packed after another record it
  must still not be predicted from that record's last token."""
  tok = env["tok"]
  ds = P.make_train_dataset(env["train"], tok, seq_len=600, image_size=S, batch_size=1, seed=1, num_epochs=1,
                            packing=True, max_images_per_row=3, loss_on="qwen_official", drop_remainder=False)
  packed_rows = 0
  for row in _all_rows(ds):
    segs = _segments(row)
    packed_rows += len(segs) > 1
    for s in segs:
      rec = _record_of(env, tok, row["input_ids"][s])
      ids, mask = chatml_tokenize(tok, rec["conversations"], loss_on="qwen_official")
      assert np.array_equal(row["input_ids"][s], ids)
      assert np.array_equal(row["loss_mask"][s], np.asarray(mask[1:] + [0], np.float32))
  assert packed_rows > 0


def test_determinism_sharding_epochs_and_checkpoint(env):
  tok, train = env["tok"], env["train"]

  def make(**kw):
    args = {"seq_len": 400, "image_size": S, "batch_size": 2, "seed": 7} | kw
    return P.make_train_dataset(train, tok, **args)

  def take(it, n):
    return [next(it) for _ in range(n)]

  def same(xs, ys):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in x)

  a, b, c = take(iter(make()), 3), take(iter(make()), 3), take(iter(make(seed=8)), 3)
  assert same(a, b) and not same(a, c)

  def keys(ds):
    return sorted(r["input_ids"].tobytes() for r in _all_rows(ds))

  full = keys(make(num_epochs=1, batch_size=1, drop_remainder=False))
  s0 = keys(make(num_epochs=1, batch_size=1, drop_remainder=False, shard_index=0, shard_count=2))
  s1 = keys(make(num_epochs=1, batch_size=1, drop_remainder=False, shard_index=1, shard_count=2))
  assert len(s0) == len(s1) == 6 and not set(s0) & set(s1) and sorted(s0 + s1) == full

  two = [r["input_ids"].tobytes() for r in _all_rows(make(num_epochs=2, batch_size=1))]
  assert sorted(two[:12]) == sorted(two[12:]) == full and two[:12] != two[12:]  # reshuffled per epoch

  for packing in (False, True):
    it = iter(make(packing=packing, seq_len=600))
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    resumed = iter(make(packing=packing, seq_len=600))
    resumed.set_state(state)
    assert same(take(resumed, 3), expected), packing


def test_worker_processes(env):
  tok, train = env["tok"], env["train"]
  kw = {"seq_len": 400, "image_size": S, "batch_size": 2, "seed": 0, "num_epochs": 1, "drop_remainder": False}
  rows0 = _all_rows(P.make_train_dataset(train, tok, worker_count=0, **kw))
  ds2 = P.make_train_dataset(train, tok, worker_count=2, **kw)
  it = iter(ds2)
  rows2 = _all_rows(it)
  # Workers batch their own slices, so grouping differs; the rows (and images) must be the same.
  assert sorted(r["input_ids"].tobytes() + r["pixel_values"].tobytes() for r in rows2) == \
    sorted(r["input_ids"].tobytes() + r["pixel_values"].tobytes() for r in rows0)
  assert isinstance(it.get_state(), dict)


def test_eval_examples(env):
  test = env["test"]
  everything = list(P.eval_examples(test))
  assert len(everything) == 2 * len(TASKS)
  vg = list(P.eval_examples(test, task="VG"))
  assert len(vg) == 2 and all(e["task"] == "VG" for e in vg)
  want = {r["id"]: r for r in env["written"]["test"]["VG"]}
  for e in vg:
    rec = want[e["id"]]
    assert e["question"] == rec["conversations"][0][0] and e["reference"] == rec["conversations"][0][1]
    assert e["modality"] == e["id"].split("_", 1)[0]
    assert e["image"].dtype == np.uint8 and e["image"].shape == (40, 48, 3)


def test_load_split_missing_dataset_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build med_grit"):
    P.load_split(str(tmp_path), "train")


def test_make_global_batch_on_four_devices():
  code = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as PS
    from bird_jax.data.pipeline import make_global_batch
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = {"input_ids": np.arange(32, dtype=np.int32).reshape(4, 8),
             "pixel_values": np.ones((4, 1, 2, 2, 3), np.float32)}
    out = make_global_batch(batch, mesh, {"input_ids": PS("data"), "pixel_values": PS("data")})
    x = out["input_ids"]
    assert x.shape == (4, 8) and len(x.addressable_shards) == 4
    assert all(s.data.shape == (1, 8) for s in x.addressable_shards)
    assert np.array_equal(np.asarray(x), batch["input_ids"])
    y = make_global_batch(batch, mesh, PS())["pixel_values"]
    assert y.sharding.is_fully_replicated and y.shape == (4, 1, 2, 2, 3)
    print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
