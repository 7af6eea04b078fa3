"""Everything the trainer needs on disk before step 0: the Med-GRIT folder, the tokenizer, the TFDS build.

Each step is skipped when its output already exists, so a rerun (or a resumed run) starts training at
once. The demo path generates the phantom set with data_gen; real runs point `data.raw_dir` at a
Med-GRIT folder (data_gen output or the official release) and `data.tokenizer` at a Qwen-VL checkpoint.

  python -m bird_jax.prepare --config=cpu_demo [--config.workdir=runs/cpu_demo] [--config.data.x=y]

does these steps alone (e.g. on a login node before a multi-host job) and prints where each result is.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_collections

from bird_jax.tokenizer import Tokenizer, load_tokenizer, train_demo_tokenizer

log = logging.getLogger("bird_jax")


@dataclass
class PreparedData:
  raw_dir: Path
  tfds_dir: Path
  tokenizer: Tokenizer
  tokenizer_path: Path
  curriculum_tfds_dir: Path | None = None  # the first data stage's TFDS dir (data.curriculum), if any


def raw_dir_for(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  if config.data.raw_dir:
    return Path(config.data.raw_dir)
  if config.data.source == "phantom":
    return workdir / "data" / "med_grit_phantom"
  raise ValueError("config.data.raw_dir is empty; set --config.data.raw_dir=/path/to/med_grit_folder "
                   "or --config.data.source=phantom")


def phantom_config() -> ml_collections.ConfigDict:
  """data.phantom: the options of the built-in phantom source (data.source="phantom"), set by the demo configs
  only, so a real run's config never lists them. Every field maps to a data_gen flag of the same meaning."""
  p = ml_collections.ConfigDict()
  p.cases = 0  # 0 -> data_gen's default demo size
  p.slices = 0  # slices per 3-D (ct/mr) phantom case; 0 -> data_gen's default (6)
  p.image_size = 128
  p.max_turns = 3
  p.records_per_image = 1
  p.balance_modalities = False  # True: as many X-ray images as CT/MR ones (more 1-slice cases)
  p.layout = "random"  # "anatomical": each class around its own home (data_gen --layout)
  p.texture = 0.0  # grey-level amplitude of the per-class stripe/checker textures (data_gen --texture)
  p.palette = "grey"  # "hue": each class its own colour (data_gen --palette)
  p.objects = ""  # "MIN,MAX" labelled structures per phantom image; "" -> data_gen's default (2,4)
  p.size = ""  # "MIN,MAX" box side / image side of a structure; "" -> data_gen's default (0.12,0.45)
  p.task_weights = ""  # e.g. "VG=0.45,RO=0.35,GC=0.1,MII=0.1"; "" -> data_gen's default mix
  # The first data stage's own phantom set (data.curriculum.steps > 0 without curriculum.raw_dir): these
  # three differ, everything else is the main set's.
  p.curriculum = ml_collections.ConfigDict()
  p.curriculum.objects = "1,1"
  p.curriculum.task_weights = "VG=1"
  p.curriculum.max_turns = 1
  return p


def _phantom(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data.phantom, or its defaults for a config that names the phantom source without setting them."""
  ph = config.data.get("phantom")
  return ph if ph is not None else phantom_config()


def _phantom_source(config: ml_collections.ConfigDict, *, seed: int, objects: str):
  from data_gen.sources.phantom import PhantomSource, parse_objects, parse_sizes

  ph = _phantom(config)
  kwargs = {"image_size": ph.image_size, "seed": seed}
  if ph.cases:
    kwargs["num_cases"] = ph.cases
  if ph.slices:
    kwargs["slices_per_case"] = ph.slices
  if objects:
    kwargs["min_objects"], kwargs["max_objects"] = parse_objects(objects)
  if ph.size:
    kwargs["min_frac"], kwargs["max_frac"] = parse_sizes(ph.size)
  if ph.balance_modalities:
    kwargs["balance_modalities"] = True
  if ph.texture:
    kwargs["texture_amplitude"] = ph.texture
  if ph.layout != "random":
    kwargs["layout"] = ph.layout
  if ph.palette != "grey":
    kwargs["palette"] = ph.palette
  try:
    return PhantomSource(**kwargs)
  except ValueError as e:  # an unknown layout / palette / object range: one line naming the config field
    from bird_jax.config_util import ConfigError

    raise ConfigError(f"data.phantom: {e}") from None


def ensure_phantom_set(raw: Path, config: ml_collections.ConfigDict, *, seed: int, objects: str, max_turns: int,
                       task_weights: str) -> Path:
  """Generates the phantom Med-GRIT set in `raw`, or reuses the one there if it was made with these settings.

  A set made with other settings is refused with a one-line error instead of being trained on silently.
  """
  from bird_jax.config_util import ConfigError
  from data_gen.pipeline import generate_dataset
  from data_gen.tasks import parse_task_weights

  source = _phantom_source(config, seed=seed, objects=objects)
  weights = parse_task_weights(task_weights) if task_weights else None
  want = {"source_params": source.params(), "seed": seed, "max_turns": max_turns,
          "records_per_image": _phantom(config).records_per_image}
  if weights is not None:
    want["task_weights"] = dict(sorted(weights.items()))
  manifest_path = raw / "manifest.json"
  if manifest_path.exists():
    have = json.loads(manifest_path.read_text()).get("params", {})
    have_source = have.get("source_params", {})
    differ = [k for k, v in want.items() if k != "source_params" and have.get(k) != v]
    differ += [k for k in {**have_source, **want["source_params"]}
               if have_source.get(k) != want["source_params"].get(k)]
    if differ:
      raise ConfigError(f"{raw} holds a phantom set made with other settings ({', '.join(differ)} differ); use a "
                        "new --config.workdir, or delete that folder and the TFDS folder built from it")
    return raw
  log.info("generating the phantom Med-GRIT set in %s", raw)
  manifest = generate_dataset(source, raw, seed=seed, max_turns=max_turns,
                              records_per_image=_phantom(config).records_per_image, task_weights=weights)
  log.info("phantom set: %s", json.dumps(manifest.get("counts", {}).get("records", manifest.get("counts", {}))))
  return raw


def ensure_raw_dataset(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  raw = raw_dir_for(config, workdir)
  if config.data.source == "phantom":
    ph = _phantom(config)
    return ensure_phantom_set(raw, config, seed=config.seed, objects=ph.objects, max_turns=ph.max_turns,
                              task_weights=ph.task_weights)
  if not raw.is_dir() or not any(raw.iterdir()):
    from bird_jax.config_util import ConfigError

    state = "is empty" if raw.is_dir() else "does not exist"
    raise ConfigError(f"Med-GRIT folder {raw} {state}; generate it with `python -m data_gen --out {raw}` or fix "
                      "--config.data.raw_dir")
  return raw


def ensure_curriculum_dataset(config: ml_collections.ConfigDict, workdir: Path) -> Path | None:
  """The first stage's Med-GRIT folder when `data.curriculum.steps > 0`: `curriculum.raw_dir`, or with the
  phantom source a phantom set of its own (other seed, so none of its layouts is a held-out case's)."""
  cur = config.data.curriculum
  if cur.steps <= 0:
    return None
  from bird_jax.config_util import ConfigError

  if cur.raw_dir:
    raw = Path(cur.raw_dir)
    if not raw.is_dir():
      raise ConfigError(f"curriculum folder {raw} does not exist; fix --config.data.curriculum.raw_dir")
    return raw
  if config.data.source != "phantom":
    raise ConfigError(f"data.curriculum.steps={cur.steps} needs a first-stage folder when data.source is not "
                      "phantom: add --config.data.curriculum.raw_dir=DIR, or --config.data.curriculum.steps=0")
  return ensure_phantom_set(workdir / "data" / "med_grit_phantom_curriculum", config, seed=config.seed + 1,
                            **_phantom(config).curriculum.to_dict())


def _read_json_records(path: Path) -> list:
  """A Med-GRIT file's list of records; a corrupt file is a one-line ConfigError naming it, where and the fix."""
  from bird_jax.config_util import ConfigError

  fix = ("fix or regenerate it (`python -m data_gen --out DIR`), or point --config.data.raw_dir at a valid "
         "Med-GRIT folder")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} (char {e.pos}: {e.msg}); "
                      f"{fix}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
  if not isinstance(data, list):
    raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not a list of records; {fix}")
  return data


def _turn_strings(record) -> list[str]:
  """The user/assistant strings of a record's [user, assistant] pairs; malformed parts give none (the TFDS build
  skips and counts such records, so the tokenizer corpus ignores them too)."""
  turns = record.get("conversations") if isinstance(record, dict) else None
  if not isinstance(turns, list):
    return []
  return [text for turn in turns if isinstance(turn, list) and len(turn) == 2
          for text in turn if isinstance(text, str)]


def _corpus(raw: Path, system_prompt: str) -> Iterator[str]:
  """The tokenizer's training text. Every file is read (and checked) here, before the first string goes to the
  trainer, so a corrupt file is a one-line error from us, not one raised inside the trainer's iterator."""
  files = [_read_json_records(name) for name in sorted(raw.glob("*.json")) if name.name != "manifest.json"]
  head = [system_prompt] if system_prompt else []
  return itertools.chain(head, (text for records in files for record in records for text in _turn_strings(record)))


def ensure_tokenizer(config: ml_collections.ConfigDict, workdir: Path, raw: Path) -> tuple[Tokenizer, Path]:
  if config.data.tokenizer:
    path = Path(config.data.tokenizer)
    return load_tokenizer(path, image_tokens=config.model.n_queries), path
  path = workdir / "tokenizer"
  if (path / "tokenizer.json").exists():
    return load_tokenizer(path), path
  log.info("training the demo BPE tokenizer (%d tokens) on %s", config.data.tokenizer_vocab_size, raw)
  tok = train_demo_tokenizer(_corpus(raw, config.data.system_prompt), path, vocab_size=config.data.tokenizer_vocab_size,
                             image_tokens=config.model.n_queries)
  return tok, path


def ensure_tfds(config: ml_collections.ConfigDict, raw: Path, data_dir: Path) -> Path:
  import tensorflow_datasets as tfds

  from bird_jax.config_util import ConfigError
  from bird_jax.data.med_grit import Builder
  from bird_jax.data.med_grit.records import UnreadableFile

  builder = Builder(config=config.data.builder_config, data_dir=str(data_dir), file_format="array_record")
  # A no-op when this version is already built: delete <tfds_dir>/med_grit to rebuild from a changed folder.
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  except UnreadableFile as e:  # a corrupt train/test file: one line naming it, not the TFDS traceback
    raise ConfigError(f"{e}, or point --config.data.raw_dir at a valid Med-GRIT folder") from None
  return data_dir


def prepare(config: ml_collections.ConfigDict, workdir: Path, *, for_training: bool = True) -> PreparedData:
  """for_training=False (evaluation, chat, export) skips the curriculum set, which only training reads."""
  if "://" in config.data.tfds_dir:
    from bird_jax.config_util import ConfigError

    raise ConfigError(f"data.tfds_dir={config.data.tfds_dir}: ArrayRecord reads and writes local files only "
                      "(google/array_record#120); mount the bucket with gcsfuse and pass the mount's path "
                      "(launch/tpu_vm.sh --bucket does)")
  raw = ensure_raw_dataset(config, workdir)
  curriculum_raw = ensure_curriculum_dataset(config, workdir) if for_training else None
  tokenizer, tok_path = ensure_tokenizer(config, workdir, raw)
  tfds_dir = ensure_tfds(config, raw, Path(config.data.tfds_dir) if config.data.tfds_dir else workdir / "tfds")
  curriculum_tfds = None
  if curriculum_raw is not None:
    curriculum_tfds = ensure_tfds(config, curriculum_raw, workdir / "tfds_curriculum")
  return PreparedData(raw_dir=raw, tfds_dir=tfds_dir, tokenizer=tokenizer, tokenizer_path=tok_path,
                      curriculum_tfds_dir=curriculum_tfds)


def main(argv: Sequence[str] | None = None) -> int:
  from bird_jax.config_util import ConfigError, exit_on_config_error, parse_config_flags

  @exit_on_config_error
  def run(args: list[str]) -> int:
    config, name, rest = parse_config_flags(args)
    if rest:
      raise ConfigError(f"unknown arguments {' '.join(rest)}; use --config=NAME and --config.FIELD=VALUE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for noisy in ("absl", "tensorflow_datasets"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    data = prepare(config, Path(config.workdir).absolute())
    print(f"{name}: data ready for `python -m bird_jax.train --config={name}` with the same overrides")
    print(f"  Med-GRIT folder  {data.raw_dir}")
    print(f"  tokenizer        {data.tokenizer_path}")
    print(f"  TFDS data_dir    {data.tfds_dir} (med_grit/{config.data.builder_config})")
    if data.curriculum_tfds_dir is not None:
      print(f"  first stage TFDS {data.curriculum_tfds_dir}")
    return 0

  return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  raise SystemExit(main())
