"""TensorBoard event files for a training run (tensorboardX: no TensorFlow in the training process).

`MetricWriter(<workdir>/tensorboard, enabled=is_process_0)`: other processes get a writer that writes nothing,
so callers need no `if`. Scalars are grouped by prefix (`train/loss`, `perf/mfu`, `eval/VG/recall@0.5`), which is
how TensorBoard's Scalars tab groups its charts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class MetricWriter:
  def __init__(self, logdir: str | Path, *, enabled: bool = True) -> None:
    # a gs:// URL stays a string (pathlib would fold "gs://b" into "gs:/b"); tensorboardX writes it through
    # google-cloud-storage (the `gcs` extra)
    self.logdir = str(logdir) if "://" in str(logdir) else Path(logdir).absolute()
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      # flush_secs: a run left alone shows its curves within half a minute
      self._writer = SummaryWriter(str(self.logdir), flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      if value is not None:
        self._writer.add_scalar(name, float(value), int(step))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """uint8 HxWx3."""
    if self._writer is not None:
      self._writer.add_image(name, np.asarray(image, np.uint8), int(step), dataformats="HWC")

  def text(self, step: int, name: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(name, text, int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def eval_scalars(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """evaluate_on_test's summary {"VG": {"model": {"recall@0.5": .3}, "baseline": {...}}} -> flat
  {"eval/VG/recall@0.5": .3, "eval_baseline/VG/recall@0.5": ...}."""
  out: dict[str, float] = {}
  for task, s in summary.items():
    for kind, prefix in (("model", "eval"), ("baseline", "eval_baseline"), ("class_prior", "eval_class_prior")):
      for metric, value in (s.get(kind) or {}).items():
        if isinstance(value, int | float):
          out[f"{prefix}/{task}/{metric}"] = float(value)
  return out


def _events(logdir: str | Path):
  """Every Event of the event files under logdir (TFRecord framing parsed by hand, the protos from
  tensorboardX), for tests and scripts."""
  import struct

  from tensorboardX.proto import event_pb2

  for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      yield event_pb2.Event.FromString(record)


def read_events(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalars, plus {tag: [(step, 0.0)]} for images and text."""
  out: dict[str, list[tuple[int, float]]] = {}
  for event in _events(logdir):
    for v in event.summary.value:
      value = v.simple_value if v.HasField("simple_value") else 0.0
      out.setdefault(v.tag, []).append((int(event.step), float(value)))
  return out


def read_images(logdir: str | Path) -> dict[str, list[tuple[int, np.ndarray]]]:
  """{tag: [(step, uint8 HxWx3), ...]} of the images."""
  import io

  from PIL import Image

  out: dict[str, list[tuple[int, np.ndarray]]] = {}
  for event in _events(logdir):
    for v in event.summary.value:
      if v.HasField("image"):
        image = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)).convert("RGB"))
        out.setdefault(v.tag, []).append((int(event.step), image))
  return out
