"""TFDS builder for Med-GRIT (BiRD's refer-and-ground instruction data), TensorFlow-free.

Configs:
  generated  a data_gen folder (train.json, test_{VG,RO,GC,MII}.json, images/) given as --manual_dir; with no
             manual dir it builds the built-in phantom demo (data_gen's PhantomSource) so CI needs no data.
  official   the Med-GRIT-270k release (*_train*.json, *_test_chatlm_{TASK}_*OneConv.json) plus the
             SA-Med2D images as <id>.png in the manual dir, its images/ or SAMed2D_v1/images/.

Build: `tfds build med_grit --config generated --manual_dir DIR --data_dir OUT` (our TF-free `tfds`), or
`Builder(config=..., data_dir=OUT).download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=DIR))`. Images are stored as RGB PNG (grayscale slices are replicated to 3 channels, pixel
geometry unchanged); they are yielded as paths or PIL images, never ndarrays (that would need TensorFlow).
Bad records are skipped, counted in `builder.skip_counts` and logged one line each.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from bird_jax.data.med_grit import records as rec_lib

_DESCRIPTION = """Med-GRIT: biomedical refer-and-ground instruction data (BiRD, MICCAI 2024) as
multi-turn ChatML conversations over 2-D medical images, with tasks VG (grounding), RO (referring object
classification), GC (region captioning) and MII (whole-image interpretation). Boxes are written
`<box>(x1,y1),(x2,y2)</box>` with integers in [0,1000) relative to the image."""

_CITATION = """@inproceedings{huang2024bird,
  title={A Refer-and-Ground Multimodal Large Language Model for Biomedicine},
  author={Huang, Xiaoshuang and Huang, Haifeng and Shen, Lingdong and Yang, Yehui and Shang, Fangxin
          and Liu, Junwei and Liu, Jia},
  booktitle={MICCAI},
  year={2024}
}"""

_INSTRUCTIONS = """\
config "generated": pass --manual_dir=<folder written by `python -m data_gen`> (train.json,
test_{VG,RO,GC,MII}.json, images/<id>.png). Without --manual_dir the phantom demo is generated.
config "official": request Med-GRIT-270k (Google Form in github.com/ShawnHuang497/BiRD), put its
*_train*.json and *_test_chatlm_{VG,RO,GC,MII}_*OneConv.json files in the manual dir, and the
SA-Med2D-20M images they refer to as <id>.png in the manual dir, in <manual_dir>/images/ or
<manual_dir>/SAMed2D_v1/images/.
"""


@dataclasses.dataclass
class MedGritConfig(tfds.core.BuilderConfig):
  layout: str = "generated"
  # Phantom demo used by "generated" when no manual dir is given (None = data_gen's default).
  phantom_num_cases: int | None = 40
  phantom_image_size: int | None = None
  phantom_seed: int = 0


def _tfds_image(path: Path) -> str | Image.Image:
  """RGB PNGs go in as their path (bytes copied as-is); anything else is converted to RGB by PIL."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.format == "PNG" and im.mode == "RGB":
        return str(path)
      return im.convert("RGB")
  except (OSError, ValueError) as e:
    raise rec_lib.BadRecord(f"image {path.name} unreadable ({type(e).__name__}: {e})",
                           "unreadable_image") from e


class Builder(tfds.core.GeneratorBasedBuilder):
  """Med-GRIT conversations with their images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: configs generated (data_gen / phantom) and official."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
    MedGritConfig(name="generated", layout="generated",
                  description="data_gen folder from --manual_dir, else the built-in phantom demo."),
    MedGritConfig(name="official", layout="official",
                  description="The Med-GRIT-270k release files + SA-Med2D images from --manual_dir."),
  ]
  DEFAULT_CONFIG_NAME = "generated"
  # Where TFDS looks for README/CITATIONS; set directly because its package lookup breaks on namespace
  # packages (e.g. an editable install made before the __init__.py files existed).
  pkg_dir_path = epath.Path(__file__).parent

  def __init__(self, **kwargs: Any) -> None:
    super().__init__(**kwargs)
    # split -> reason kind -> count (filled while generating; the logs carry the per-record lines).
    self.skip_counts: dict[str, collections.Counter[str]] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=_DESCRIPTION,
      features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "id": tfds.features.Text(),
        "modality": tfds.features.Text(),
        "task": tfds.features.Text(),
        "case_id": tfds.features.Text(),
        "conversations": tfds.features.Sequence({
          "user": tfds.features.Text(),
          "assistant": tfds.features.Text(),
        }),
      }),
      homepage="https://github.com/ShawnHuang497/BiRD",
      citation=_CITATION,
    )

  def _manual_root(self, dl_manager: tfds.download.DownloadManager) -> Path | None:
    """The manual dir, or None when none was given (then only "generated" has a fallback)."""
    try:
      return Path(dl_manager.manual_dir)
    except AssertionError:
      given = getattr(dl_manager, "_manual_dir", None)
      default = Path(dl_manager.download_dir) / "manual"
      if given is not None and Path(given) != default:
        raise FileNotFoundError(f"--manual_dir {given} does not exist or is empty; pass the folder holding the "
                                "Med-GRIT files, see the instructions:\n"
                                f"{_INSTRUCTIONS}") from None
      return None

  def _phantom_root(self, dl_manager: tfds.download.DownloadManager) -> Path:
    """Generates (once, cached in the download dir) the phantom demo folder with data_gen."""
    cfg = self.builder_config
    out = Path(dl_manager.download_dir) / (
      f"med_grit_phantom_n{cfg.phantom_num_cases}_s{cfg.phantom_image_size}_seed{cfg.phantom_seed}")
    if (out / "manifest.json").is_file():
      return out
    from data_gen.pipeline import generate_dataset
    from data_gen.sources.phantom import PhantomSource

    kwargs: dict[str, Any] = {"seed": cfg.phantom_seed}
    if cfg.phantom_num_cases is not None:
      kwargs["num_cases"] = cfg.phantom_num_cases
    if cfg.phantom_image_size is not None:
      kwargs["image_size"] = cfg.phantom_image_size
    logging.info("med_grit: no --manual_dir; generating the phantom demo into %s", out)
    generate_dataset(PhantomSource(**kwargs), out)
    return out

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    layout = self.builder_config.layout
    root = self._manual_root(dl_manager)
    if root is None:
      if layout != "generated":
        raise FileNotFoundError(f"config {layout!r} needs --manual_dir; instructions:\n{_INSTRUCTIONS}")
      root = self._phantom_root(dl_manager)
    if layout == "official":
      train, tests = rec_lib.find_official_files(root)
      image_dirs = [root, root / "images", root / "SAMed2D_v1" / "images"]
    else:
      train, tests = rec_lib.find_generated_files(root)
      image_dirs = []
    if not train:
      want = "*_train*.json" if layout == "official" else "train.json"
      raise FileNotFoundError(f"{root}: no {want} found for config {layout!r}; see the instructions:\n"
                              f"{_INSTRUCTIONS}")
    splits = {"train": self._generate_examples(root=root, files=[(p, "mixed") for p in train],
                                               layout=layout, image_dirs=image_dirs, split="train")}
    if tests:
      splits["test"] = self._generate_examples(root=root, files=tests, layout=layout, image_dirs=image_dirs,
                                               split="test")
    else:
      logging.warning("med_grit: %s has no test files; building the train split only", root)
    return splits

  def _generate_examples(self, *, root: Path, files: list[tuple[Path, str]], layout: str,
                         image_dirs: list[Path], split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    counts = self.skip_counts.setdefault(split, collections.Counter())
    total = 0
    for path, task in files:
      try:
        records = rec_lib.read_records(path)
      except rec_lib.UnreadableFile:
        raise
      except OSError as e:
        raise rec_lib.UnreadableFile(f"{path}: cannot read records ({e}); fix or remove the file") from e
      for i, raw in enumerate(records):
        total += 1
        try:
          r = rec_lib.parse_record(raw, root=root, layout=layout, default_task=task, image_dirs=image_dirs)
          image = _tfds_image(r["image_path"])
        except rec_lib.BadRecord as e:
          counts[e.kind] += 1
          rid = raw.get("id") if isinstance(raw, dict) else None
          logging.warning("med_grit: skip %s[%d] (id=%s): %s", path.name, i, rid, e)
          continue
        yield f"{path.name}:{i}", {
          "image": image,
          "id": r["id"],
          "modality": r["modality"],
          "task": r["task"],
          "case_id": r["case_id"],
          "conversations": [{"user": u, "assistant": a} for u, a in r["conversations"]],
        }
    skipped = sum(counts.values())
    if skipped:
      logging.warning("med_grit: %s split skipped %d of %d records", split, skipped, total)
    else:
      logging.info("med_grit: %s split: all %d records kept", split, total)
