"""Input pipeline: samples/s and packed tokens/s per CPU core of the Grain training pipeline, and how far that is
above what the accelerators of one host consume at 50 % MFU (issue 17, item 4).

  python -m bird_jax.benchmarks.input_pipeline [--toy] [--json=FILE]    # alone
  python -m bird_jax.bench                                              # in the suite

Data: a phantom Med-GRIT set built once into a temporary folder by the trainer's own steps
(`bird_jax.prepare.prepare`: data_gen's phantom source -> demo BPE tokenizer -> `tfds build med_grit`, array_record),
with BiRD's recipe from `configs/tpu_v4.py`: 2,048-token packed rows, 448 px images, 256 image queries per image
(the `<img>` span is 258 tokens). The real qwen.tiktoken is not available, so the tokenizer is the demo BPE
(at most 1,024 tokens) with 256 image tokens. The phantom images are stored at 512 px, so the pipeline's bicubic resize
to 448 does real work (Pillow skips a resize to the size an image already has).

Measured: `bird_jax.data.pipeline.make_train_dataset` called with the arguments `python -m bird_jax.train` passes
(packing on, default image slots per row, system prompt, loss mask), with Grain worker_count 0, 1 and 2. Per
configuration: `WARMUP` batches untimed (worker start-up included; the time to the first batch is reported), then
`ROUNDS` rounds of `BATCHES` batches, each round timed on its own; rates are medians over rounds. A sample is a
record (one image, one conversation) placed in a row; a row is one packed `seq_len` row; tokens/s = rows/s x
seq_len (padding included: the train step computes on whole rows, and the FLOPs below count whole rows).

Per core: tokens/s divided by max(1, workers), i.e. one core per Grain worker process and one core for the
in-process pipeline (worker_count 0 uses Grain's read threads in the main process). `cpu_busy` is the measured
CPU time of this process and its worker processes over the timed rounds divided by wall time (cores kept busy),
and `tok_per_cpu_s` the tokens per CPU-second, for a check of that counting.

Headline: tokens/s one chip consumes at 50 % MFU = 0.5 x peak_flops(chip) / (analytic FLOPs of the real 7B train
step per token: `bird_jax.flops.train_step_flops` for the tpu_v4 config's model, one 2,048-token row with its
image slots, ViT frozen). Per host kind: factor = (pipeline tokens/s per core x vCPUs of one host) / (tokens/s
per chip at 50 % MFU x chips of that host). The per-core figure used is the lowest of the configurations with
workers > 0 (how the train configs run the pipeline). Goal: factor >= 10 on every host kind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bird_jax.benchmarks.common import BenchResult, median, report, versions

MFU = 0.5
GOAL = 10.0  # the pipeline must feed every chip of its host this many times over


class Host(NamedTuple):
  name: str
  device_kind: str  # what bird_jax.flops.peak_flops looks up
  chips: int
  vcpus: int


# One host (VM / node) of each kind: accelerator chips and vCPUs.
HOSTS: tuple[Host, ...] = (
  # cloud.google.com/tpu/docs/v4: a TPU v4 VM host has 4 chips, 240 vCPUs (407 GB RAM).
  Host("TPU v4", "TPU v4", 4, 240),
  # cloud.google.com/tpu/docs/v5e: machine type ct5lp-hightpu-8t, 8 chips, 224 vCPUs.
  Host("TPU v5e", "TPU v5e", 8, 224),
  # cloud.google.com/tpu/docs/v5p: machine type ct5p-hightpu-4t, 4 chips, 208 vCPUs.
  Host("TPU v5p", "TPU v5p", 4, 208),
  # NVIDIA DGX H100 datasheet: 8 H100 SXM GPUs, 2x Xeon Platinum 8480C (56 cores each) = 224 vCPUs with SMT.
  Host("8x H100", "H100", 8, 224),
)


class Size(NamedTuple):
  seq_len: int
  image_size: int
  image_queries: int
  source_px: int  # side of the stored phantom images
  phantom_cases: int  # per modality (ct, mr: 6 slices a case, x-ray: 1)
  batch_size: int  # rows per batch (per process)
  workers: tuple[int, ...]
  warmup: int  # untimed batches per configuration
  rounds: int
  batches: int  # per round


FULL = Size(seq_len=2048, image_size=448, image_queries=256, source_px=512, phantom_cases=5, batch_size=8,
            workers=(0, 1, 2), warmup=3, rounds=5, batches=4)
TOY = Size(seq_len=256, image_size=64, image_queries=16, source_px=72, phantom_cases=2, batch_size=2,
           workers=(0, 1), warmup=1, rounds=3, batches=2)


def pipeline_config(size: Size) -> Any:
  """The tpu_v4 config (BiRD's recipe) with the phantom source and the demo tokenizer, at this size."""
  from bird_jax.prepare import phantom_config
  from configs import tpu_v4

  c = tpu_v4.get_config()
  c.data.source = "phantom"
  c.data.builder_config = "generated"
  c.data.raw_dir = c.data.tfds_dir = c.data.tokenizer = ""  # under the work dir; "" tokenizer -> demo BPE
  c.data.phantom = phantom_config()
  c.data.phantom.cases = size.phantom_cases
  c.data.phantom.image_size = size.source_px
  c.data.seq_len = size.seq_len
  c.data.curriculum.steps = 0
  c.model.image_size = size.image_size
  c.model.n_queries = size.image_queries
  return c


def flops_per_token() -> float:
  """Analytic FLOPs per token of the real train step: the tpu_v4 config's 7B model, 2,048-token packed rows with
  their image slots, its frozen/trained towers."""
  from bird_jax.flops import train_step_flops
  from bird_jax.model.config import QwenVLConfig
  from bird_jax.train_step import images_per_row
  from configs import tpu_v4

  c = tpu_v4.get_config()
  model = QwenVLConfig(**c.model.to_dict())
  seq = c.data.seq_len
  step = train_step_flops(model, batch=1, seq_len=seq, images_per_row=images_per_row(c, model.n_queries),
                          train_vit=c.train.train_vit, train_resampler=c.train.train_resampler,
                          train_llm=c.train.train_llm)
  return step.total / seq


def _tree_cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live descendants (Linux /proc; None elsewhere)."""
  if not os.path.isdir("/proc"):
    return None
  tick = os.sysconf("SC_CLK_TCK")
  parent: dict[int, int] = {}
  cpu: dict[int, float] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
      continue
    pid = int(name)
    parent[pid] = int(fields[1])
    cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
  total, todo = 0.0, [os.getpid()]
  while todo:
    pid = todo.pop()
    total += cpu.get(pid, 0.0)
    todo += [p for p, pp in parent.items() if pp == pid]
  return total


def measure(source: Any, tokenizer: Any, config: Any, size: Size, workers: int) -> dict[str, Any]:
  """One configuration: the training stream as train.py makes it, timed after `size.warmup` batches."""
  from bird_jax.data.pipeline import make_train_dataset

  seq = config.data.seq_len
  ds = make_train_dataset(
    source, tokenizer, seq_len=seq, image_size=config.model.image_size, batch_size=size.batch_size,
    seed=config.seed, packing=config.data.packing, max_images_per_row=config.data.images_per_row or None,
    worker_count=workers, loss_on=config.data.loss_on, system=config.data.system_prompt or None,
  )
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  first_batch_s = time.perf_counter() - t0
  for _ in range(size.warmup - 1):
    next(it)
  rows_s, samples_s = [], []
  rows = samples = real = 0
  cpu0, wall0 = _tree_cpu_seconds(), time.perf_counter()
  for _ in range(size.rounds):
    r = s = 0
    t = time.perf_counter()
    for _ in range(size.batches):
      b = next(it)
      seg = b["segment_ids"]
      r += seg.shape[0]
      s += int(seg.max(axis=1).sum())  # segments are numbered 1..k in each row
      real += int((seg > 0).sum())
    dt = time.perf_counter() - t
    rows_s.append(r / dt)
    samples_s.append(s / dt)
    rows, samples = rows + r, samples + s
  wall = time.perf_counter() - wall0
  cpu1 = _tree_cpu_seconds()
  with contextlib.suppress(Exception):  # stops the worker processes
    it.close()
  del it
  cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
  rows_per_s = median(rows_s)
  tokens_per_s = rows_per_s * seq
  return {
    "workers": workers, "samples_per_s": median(samples_s), "rows_per_s": rows_per_s,
    "tokens_per_s": tokens_per_s, "tokens_per_s_per_core": tokens_per_s / max(1, workers),
    "cpu_busy": None if cpu is None else cpu / wall,
    "tok_per_cpu_s": None if not cpu else rows * seq / cpu,
    "samples_per_row": samples / rows, "fill": real / (rows * seq), "first_batch_s": first_batch_s,
  }


def _quiet() -> None:
  import tensorflow_datasets as tfds
  from absl import logging as absl_logging

  tfds.display_progress_bar(False)
  absl_logging.set_verbosity(absl_logging.WARNING)
  for noisy in ("absl", "tensorflow_datasets", "bird_jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(toy: bool = False) -> BenchResult:
  from bird_jax.data.pipeline import load_split
  from bird_jax.flops import peak_flops
  from bird_jax.prepare import prepare

  _quiet()
  size = TOY if toy else FULL
  config = pipeline_config(size)
  rows = []
  with tempfile.TemporaryDirectory(prefix="bird_input_pipeline_") as tmp:
    t0 = time.perf_counter()
    data = prepare(config, Path(tmp))
    build_s = time.perf_counter() - t0
    source = load_split(str(data.tfds_dir), "train", config.data.builder_config)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for workers in size.workers:
      rows.append(measure(source, data.tokenizer, config, size, workers))
    n_records = len(source)
    vocab = data.tokenizer.vocab_size

  fpt = flops_per_token()
  pooled = [r for r in rows if r["workers"] > 0]
  per_core = min(r["tokens_per_s_per_core"] for r in pooled)
  per_cpu_s = [r["tok_per_cpu_s"] for r in pooled if r["tok_per_cpu_s"]]
  summary: dict[str, Any] = {"tokens_per_s_per_core": per_core, "flops_per_token": fpt}
  notes = []
  factors, host_need = [], []
  for h in HOSTS:
    chip_tokens = MFU * peak_flops(h.device_kind) / fpt
    factor = per_core * h.vcpus / (chip_tokens * h.chips)
    factors.append(factor)
    host_need.append(chip_tokens * h.chips / h.vcpus)  # tokens/s each vCPU must make for a factor of 1
    key = h.name.lower().replace(" ", "_")
    summary[f"chip_tokens_per_s_{key}"] = chip_tokens
    summary[f"factor_{key}"] = factor
    notes.append(f"{h.name}: {peak_flops(h.device_kind) / 1e12:.0f} TFLOP/s peak -> {chip_tokens:,.0f} tokens/s per "
                 f"chip at {MFU:.0%} MFU, x {h.chips} chips = {chip_tokens * h.chips:,.0f}/s per host; pipeline "
                 f"{per_core:,.0f}/s per core x {h.vcpus} vCPUs = {per_core * h.vcpus:,.0f}/s: {factor:.1f}x")
  summary["min_factor"] = min(factors)
  if per_cpu_s:  # the same factor with the per-core rate counted from measured CPU time instead
    summary["tokens_per_cpu_s"] = min(per_cpu_s)
    summary["min_factor_per_cpu_s"] = min(per_cpu_s) / max(host_need)
  summary["goal"] = f">= {GOAL:g}x per host"
  summary["meets_goal"] = min(factors) >= GOAL
  notes.append("per core = tokens/s / max(1, workers); headline per core = the lowest of the workers > 0 rows; "
               "cpu_busy = measured CPU time (this process + workers) / wall time")
  for r in rows:
    cores = max(1, r["workers"])
    if r["cpu_busy"] is not None and r["cpu_busy"] < 0.9 * cores:
      notes.append(f"workers={r['workers']}: kept {r['cpu_busy']:.2f} of the {cores} core(s) it is counted for busy "
                   f"(a shared or smaller machine, or waiting), so its per-core figure undercounts; per CPU-second "
                   f"it made {r['tok_per_cpu_s']:,.0f} tokens")
  from bird_jax.data.pipeline import default_max_images

  slots = config.data.images_per_row or default_max_images(size.image_queries, size.seq_len)
  per_row = median([r["samples_per_row"] for r in rows])
  notes += [
    f"rows held {per_row:.2f} images of their {slots} slots; with shorter text (Qwen's tokenizer) up to {slots}, "
    f"i.e. up to {slots / per_row:.2f}x the image work per token measured here",
    f"data: {n_records} training records (phantom, {size.source_px} px PNG -> {size.image_size} px), demo BPE "
    f"tokenizer ({vocab} tokens; Qwen's 151k vocabulary gives shorter text, so a few more images per row); built "
    f"in {build_s:.1f} s; load average before timing {load:.2f}",
    f"versions: {json.dumps(versions())}",
  ]
  if toy:
    notes.append("toy size: figures say nothing about the real pipeline")
  shapes = {"seq_len": size.seq_len, "image_size": size.image_size, "image_queries": size.image_queries,
            "batch_size": size.batch_size, "batches_timed": size.rounds * size.batches,
            "cores_here": os.cpu_count()}
  return BenchResult(name="input_pipeline", shapes=shapes, rows=rows, summary=summary, notes=notes)


def main(argv: Sequence[str] | None = None) -> BenchResult:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--toy", action="store_true", help="tiny shapes, workers 0 and 1 (seconds)")
  ap.add_argument("--json", default=None, help="also write the result here")
  args = ap.parse_args(argv)
  result = run(toy=args.toy)
  print(report(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
