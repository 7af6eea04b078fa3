"""Grain input pipeline: Med-GRIT TFDS records -> fixed-shape numpy training batches.

Per record (all picklable module-level transforms, so `worker_count > 0` works):
  ChatML tokenize with a loss mask (bird_jax.tokenizer) -> drop trailing turns that do not fit seq_len
  (a record whose system block + first turn does not fit is dropped and counted) -> decode the PNG ->
  preprocess_image(image_size) -> one padded row, or greedy packing of several records into one row.

Batch (numpy, per process; `make_global_batch` turns it into global jax.Arrays):
  input_ids    int32   [b, L]  pad = <|endoftext|>
  labels       int32   [b, L]  input_ids shifted left by one; the last column is pad
  loss_mask    float32 [b, L]  1 where labels[t] is a supervised token (same segment, target mask set)
  segment_ids  int32   [b, L]  1..k for the k records in a row, 0 = padding
  positions    int32   [b, L]  0.. restarting at each segment start (0 on padding)
  pixel_values float32 [b, K, S, S, 3]  CLIP-normalised; K = 1 without packing. With packing K =
               `max_images_per_row` and image k belongs to the k-th `<img>` of the row (the model's rule);
               unused slots are zeros and have no `<img>` pointing at them.

Ordering: source -> global shuffle(seed) -> repeat(num_epochs, reshuffled each epoch) -> every
shard_count-th element from shard_index -> transforms -> (pack) -> batch. So the stream is a pure function
of (seed, shard, position), and the iterator state (`it.get_state()` / `it.set_state()`) is checkpointable
with Grain's Orbax handler.

Dropped/truncated records are counted per process in `STATS` (and logged); with worker processes those
counts live in the workers, so use `scan_lengths` for dataset-wide numbers.
"""

from __future__ import annotations

import collections
import copy
import io
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from bird_jax.data.image import preprocess_image
from bird_jax.tokenizer import DEFAULT_SYSTEM, Tokenizer, as_turn_pairs, chatml_segments

# Process-local counters: records dropped because their first turn does not fit, records truncated.
STATS: collections.Counter[str] = collections.Counter()

_IMG_RE = re.compile(r"<img>.*?</img>", re.DOTALL)


def as_text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes | bytearray) else str(x)


def decode_image(image: Any) -> np.ndarray:
  """uint8 HxWx3 from encoded bytes (SkipDecoding sources) or an already decoded array."""
  if isinstance(image, bytes | bytearray | np.bytes_):
    with Image.open(io.BytesIO(bytes(image))) as im:
      return np.asarray(im.convert("RGB"))
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  return arr


def record_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The record's turns as (user, assistant); a first turn without `<img>` gets Qwen's image prefix, so
  every record has exactly one image slot for its one image."""
  pairs = as_turn_pairs(record["conversations"])
  if pairs and not _IMG_RE.search(pairs[0][0]):
    pairs[0] = (f"Picture 1: <img></img>\n{pairs[0][0]}", pairs[0][1])
  return pairs


def fit_segments(segments: list[tuple[list[int], list[int]]], seq_len: int, has_system: bool
                 ) -> tuple[list[int], list[int], int] | None:
  """Keeps the system block and as many whole leading turns as fit in seq_len; None if not even the
  first turn fits. Returns (ids, target_mask, turns_kept)."""
  head = segments[:1] if has_system else []
  turns = segments[1:] if has_system else segments
  ids: list[int] = [t for s, _ in head for t in s]
  mask: list[int] = [t for _, m in head for t in m]
  kept = 0
  for s_ids, s_mask in turns:
    if len(ids) + len(s_ids) > seq_len:
      break
    ids += s_ids
    mask += s_mask
    kept += 1
  return (ids, mask, kept) if kept else None


def tokenize_record(record: Mapping[str, Any], tokenizer: Tokenizer, seq_len: int,
                    system: str | None = DEFAULT_SYSTEM, loss_on: str = "assistant"
                    ) -> tuple[tuple[list[int], list[int]] | None, dict[str, int]]:
  """((ids, target_mask) or None when the first turn cannot fit, {"turns", "kept", "full_len", "first_len"}).
  Pure: no counters, no logging (TokenizeRecord and scan_lengths add those)."""
  pairs = record_pairs(record)
  segments = chatml_segments(tokenizer, pairs, system, loss_on)
  n_head = 2 if system is not None else 1
  info = {"turns": len(pairs), "kept": 0, "full_len": sum(len(s) for s, _ in segments),
          "first_len": sum(len(s) for s, _ in segments[:n_head])}
  fit = fit_segments(segments, seq_len, system is not None)
  if fit is None:
    return None, info
  ids, mask, info["kept"] = fit
  return (ids, mask), info


class NoRecordFits(ValueError):
  """Not one record's system block + first turn fits seq_len: training would drop records forever."""


def check_some_record_fits(data_source: Any, tokenizer: Tokenizer, seq_len: int, system: str | None = DEFAULT_SYSTEM,
                           loss_on: str = "assistant") -> None:
  """Raises NoRecordFits (one line naming seq_len and the shortest first turn) unless a record fits. Stops at the
  first record that does, which on any usable set is the first one, so this costs one tokenization."""
  shortest: tuple[int, str] | None = None
  for i in range(len(data_source)):
    record = data_source[i]
    fit, info = tokenize_record(record, tokenizer, seq_len, system, loss_on)
    if fit is not None:
      return
    if shortest is None or info["first_len"] < shortest[0]:
      shortest = (info["first_len"], as_text(record.get("id", b"?")))
  if shortest is not None:
    raise NoRecordFits(f"no record fits data.seq_len={seq_len}: the shortest first turn (system prompt included) "
                       f"needs {shortest[0]} tokens (record {shortest[1]}); raise --config.data.seq_len to at least "
                       f"{shortest[0]}")


class TokenizeRecord(grain.transforms.Map):
  """TFDS record -> {"drop", "id", "ids", "mask", "image"}; records whose first turn cannot fit are marked
  (KeepFitting removes them), counted in STATS and logged (the first 20 by id, then every 1000th)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, system: str | None = DEFAULT_SYSTEM,
               loss_on: str = "assistant") -> None:
    self.tokenizer, self.seq_len, self.system, self.loss_on = tokenizer, seq_len, system, loss_on

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    rid = as_text(record.get("id", b"?"))
    fit, info = tokenize_record(record, self.tokenizer, self.seq_len, self.system, self.loss_on)
    if fit is None:
      STATS["dropped_too_long"] += 1
      n = STATS["dropped_too_long"]
      if n <= 20 or n % 1000 == 0:
        logging.warning("pipeline: drop %s: its first turn needs %d tokens > seq_len %d (%d dropped so far "
                        "in this process)", rid, info["first_len"], self.seq_len, n)
      return {"drop": True, "id": rid}
    if info["kept"] < info["turns"]:
      STATS["truncated_turns"] += info["turns"] - info["kept"]
      STATS["truncated_records"] += 1
    ids, mask = fit
    return {"drop": False, "id": rid, "ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.int8),
            "image": record["image"]}


class KeepFitting(grain.transforms.Filter):
  def filter(self, element: Mapping[str, Any]) -> bool:
    return not element["drop"]


class PrepareImage(grain.transforms.Map):
  """Decode -> Qwen-VL preprocessing (bicubic resize, CLIP normalisation) -> float32 [S, S, 3]."""

  def __init__(self, image_size: int) -> None:
    self.image_size = image_size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    out["image"] = preprocess_image(decode_image(element["image"]), self.image_size)
    return out


def build_row(segments: list[tuple[np.ndarray, np.ndarray]], images: list[np.ndarray], seq_len: int,
              pad_id: int, num_image_slots: int, image_size: int) -> dict[str, np.ndarray]:
  """Lays records out in one row of seq_len; see the module docstring for the fields."""
  input_ids = np.full(seq_len, pad_id, np.int32)
  targets = np.zeros(seq_len, np.float32)
  segment_ids = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  off = 0
  for k, (ids, mask) in enumerate(segments, 1):
    n = len(ids)
    input_ids[off:off + n] = ids
    targets[off:off + n] = mask
    segment_ids[off:off + n] = k
    positions[off:off + n] = np.arange(n, dtype=np.int32)
    off += n
  labels = np.concatenate([input_ids[1:], np.asarray([pad_id], np.int32)])
  # A label is supervised only if it is a target token of the same (non-padding) segment: never predict
  # the next packed record's first token from the previous record.
  same = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] != 0)
  loss_mask = np.concatenate([targets[1:] * same, np.zeros(1, np.float32)]).astype(np.float32)
  pixel_values = np.zeros((num_image_slots, image_size, image_size, 3), np.float32)
  for k, img in enumerate(images):
    pixel_values[k] = img
  return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "segment_ids": segment_ids,
          "positions": positions, "pixel_values": pixel_values}


class PadToRow(grain.transforms.Map):
  """One record per row (no packing)."""

  def __init__(self, seq_len: int, pad_id: int, image_size: int) -> None:
    self.seq_len, self.pad_id, self.image_size = seq_len, pad_id, image_size

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return build_row([(element["ids"], element["mask"])], [element["image"]], self.seq_len, self.pad_id, 1,
                     self.image_size)


class _PackIterator(grain.DatasetIterator):
  """Greedy packing: append records in stream order while they fit (tokens and image slots), then emit.

  State = the parent's state just before the record that has been read but not yet placed, so restoring
  re-reads it; nothing else is buffered, which keeps the state small and exact.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, max_images: int, pad_id: int,
               image_size: int) -> None:
    super().__init__(parent)
    self._seq_len, self._max_images, self._pad_id, self._image_size = seq_len, max_images, pad_id, image_size
    self._pending: dict[str, Any] | None = None
    self._pending_state: dict[str, Any] | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    segments: list[tuple[np.ndarray, np.ndarray]] = []
    images: list[np.ndarray] = []
    used = 0
    while True:
      if self._pending is None:
        before = copy.deepcopy(self._parent.get_state())
        try:
          element = next(self._parent)
        except StopIteration:
          break
        self._pending, self._pending_state = element, before
      n = len(self._pending["ids"])
      if segments and (used + n > self._seq_len or len(images) >= self._max_images):
        break
      segments.append((self._pending["ids"], self._pending["mask"]))
      images.append(self._pending["image"])
      used += n
      self._pending = self._pending_state = None
    if not segments:
      raise StopIteration
    return build_row(segments, images, self._seq_len, self._pad_id, self._max_images, self._image_size)

  def get_state(self) -> dict[str, Any]:
    parent = self._pending_state if self._pending is not None else self._parent.get_state()
    return {"parent": copy.deepcopy(parent)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = self._pending_state = None


class PackIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int, pad_id: int,
               image_size: int) -> None:
    super().__init__(parent)
    self._seq_len, self._max_images, self._pad_id, self._image_size = seq_len, max_images, pad_id, image_size

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._max_images, self._pad_id,
                         self._image_size)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, max_images={self._max_images})"


def default_max_images(image_tokens: int, seq_len: int) -> int:
  """Image slots per packed row: as many records as could fit if each were only its image span
  (`image_tokens` placeholders between `<img>` and `</img>`)."""
  return max(1, seq_len // (image_tokens + 2))


def make_train_dataset(data_source: Any, tokenizer: Tokenizer, *, seq_len: int, image_size: int,
                       batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                       packing: bool = False, max_images_per_row: int | None = None, worker_count: int = 0,
                       num_epochs: int | None = None, system: str | None = DEFAULT_SYSTEM,
                       loss_on: str = "assistant", read_threads: int = 4,
                       drop_remainder: bool = True) -> grain.IterDataset:
  """Per-process training stream of batches (see the module docstring). `batch_size` is per process.

  num_epochs=None repeats forever. worker_count > 0 runs the pipeline in that many processes (the calling
  script needs an `if __name__ == "__main__":` guard; absl flags are marked parsed if nothing parsed them);
  Grain then batches within each worker, so batches group records differently than with 0 workers.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if len(data_source) == 0:
    raise ValueError("the data source is empty; build the dataset first (tfds build med_grit ...)")
  check_some_record_fits(data_source, tokenizer, seq_len, system, loss_on)
  ds = grain.MapDataset.source(data_source).shuffle(seed=seed).repeat(num_epochs)
  ds = ds[shard_index::shard_count]
  ds = ds.map(TokenizeRecord(tokenizer, seq_len, system, loss_on)).filter(KeepFitting())
  ds = ds.map(PrepareImage(image_size))
  if not packing:
    ds = ds.map(PadToRow(seq_len, tokenizer.pad_id, image_size))
  # Small prefetch buffer: each element carries a float32 image (2.4 MB at 448 px).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * batch_size, 8)))
  if packing:
    k = max_images_per_row or default_max_images(tokenizer.image_tokens, seq_len)
    it = PackIterDataset(it, seq_len=seq_len, max_images=k, pad_id=tokenizer.pad_id, image_size=image_size)
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  if worker_count > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app nothing parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def scan_lengths(data_source: Any, tokenizer: Tokenizer, seq_len: int, system: str | None = DEFAULT_SYSTEM,
                 loss_on: str = "assistant") -> dict[str, Any]:
  """Dataset-wide token-length statistics (text only, images untouched): records, dropped (first turn does
  not fit), truncated (some trailing turns dropped), max/mean/p95 of the full conversation length."""
  lengths = []
  dropped = truncated = 0
  for i in range(len(data_source)):
    fit, info = tokenize_record(data_source[i], tokenizer, seq_len, system, loss_on)
    lengths.append(info["full_len"])
    dropped += fit is None
    truncated += fit is not None and info["kept"] < info["turns"]
  arr = np.asarray(lengths or [0])
  return {"records": len(lengths), "dropped": dropped, "truncated": truncated, "max_len": int(arr.max()),
          "mean_len": float(arr.mean()), "p95_len": float(np.percentile(arr, 95))}


def load_split(data_dir: str, split: str, config: str = "generated", decode_images: bool = False) -> Any:
  """Random-access TFDS data source for med_grit/<config> (array_record). Images stay PNG bytes by default
  (the pipeline decodes them after dropping records that do not fit)."""
  import tensorflow_datasets as tfds

  import bird_jax.data.med_grit  # noqa: F401  (registers the builder)

  how = (f"build it: tfds build med_grit --config {config} --data_dir {data_dir} [--manual_dir DIR] "
         "(array_record)")
  if "://" in str(data_dir):
    raise FileNotFoundError(f"data_dir {data_dir}: ArrayRecord opens local files only (google/array_record#120); "
                            "mount the bucket with gcsfuse and pass the mount's path (launch/tpu_vm.sh --bucket does)")
  if not list(Path(data_dir).glob(f"med_grit/{config}/*/dataset_info.json")):
    raise FileNotFoundError(f"no prepared med_grit/{config} under {data_dir}; {how}")
  decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
  try:
    return tfds.data_source(f"med_grit/{config}", split=split, data_dir=data_dir, download=False,
                            decoders=decoders)
  except (FileNotFoundError, AssertionError, ValueError, NotImplementedError) as e:
    raise FileNotFoundError(f"med_grit/{config} split {split!r} under {data_dir} is not readable ({e}); {how}"
                            ) from e


def make_global_batch(batch: Mapping[str, np.ndarray], mesh: Any, shardings: Any) -> dict[str, Any]:
  """Process-local numpy batch -> global jax.Arrays (batch dim concatenated over processes).

  `shardings`: one Sharding/PartitionSpec for every field, or a mapping field -> Sharding/PartitionSpec.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  def as_sharding(s: Any) -> Any:
    return NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s

  out = {}
  for name, value in batch.items():
    s = shardings[name] if isinstance(shardings, Mapping) else shardings
    out[name] = jax.make_array_from_process_local_data(as_sharding(s), np.asarray(value))
  return out


def eval_examples(data_source: Any, task: str | None = None) -> Iterator[dict[str, Any]]:
  """One dict per one-turn test record: id, modality, task, question (the full first user turn, with its
  `<img>` span), reference (first assistant turn) and image (uint8 HxWx3)."""
  for i in range(len(data_source)):
    r = data_source[i]
    rtask = as_text(r["task"])
    if task is not None and rtask != task:
      continue
    (question, reference), *_ = as_turn_pairs(r["conversations"])
    yield {"id": as_text(r["id"]), "modality": as_text(r["modality"]), "task": rtask, "question": question,
           "reference": reference, "image": decode_image(r["image"])}
