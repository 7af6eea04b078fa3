"""SA-Med2D-20M (release layout) and SAM-Med2D `data_demo` (older demo layout) reader.

Release layout (dataset_layouts.md 1.1-1.3), `root` = the `SAMed2Dv1/` folder:
  images/<mod>--<dataset>--<case>--<slice>.png
  masks/<mod>--<dataset>--<case>--<slice>--<CCCC>_<III>.png     one binary mask per (class, instance)
  SAMed2D_v1.json                    {"images/<img>.png": ["masks/<mask>.png", ...]}   (optional: else masks/
                                     is scanned). ~3.7M keys, several GB: streamed once (_json_stream), so
                                     the source has no len() and a bad file raises only when reached.
  SAMed2D_v1_class_mapping_id.json   {"<dataset>": {"<class name>": "<CCCC>"}} (or the flat {"name": "CCCC"})
  Class id 0000 is a real class. `union_*` classes are aggregates overlapping atomic masks: skipped.
  The image id is the release stem, so the modality is its prefix (`x_ray--...` -> x).

Demo layout (SAM-Med2D repo `data_demo/`), `root` = that folder:
  images/amos_0006_90.png   masks/amos_0006_90_liver_000.png   (class *name* in the mask file name)
  image2label_train.json {image: [masks]}   label2image_test.json {mask: image}   (paths carry `data_demo/`)
  Both indexes are read (their train/test division is ignored: data_gen splits by case itself). The demo has
  no modality in its names: `modality` (default ct) says what it is. Ids are rewritten to the SA-Med2D form,
  `ct_00--AMOS2022--amos_0006--z_0090`, so the modality-from-id rule holds.

Problems are counted in `self.skips` (one line each: file + reason), never raised: missing or unreadable
files, path traversal in an index, size mismatch, empty masks, blank or binary "images", names that do not
parse, class ids without a name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.sources._io import SkipError, confined, read_image, read_instance_mask
from data_gen.sources._json_stream import iter_json_object
from data_gen.sources.base import MODALITIES, Instance, Sample, SkipReport, make_image_id, modality_from_id

RELEASE_INDEX = "SAMed2D_v1.json"
RELEASE_MAPPING = "SAMed2D_v1_class_mapping_id.json"
DEMO_INDEXES = ("image2label_train.json", "label2image_test.json")
# Demo case prefixes -> the SA-Med2D dataset token they come from.
DEMO_DATASETS = (("amos_", "AMOS2022"), ("s", "Totalsegmentator_dataset"))
_GENERIC = re.compile(r"^(class\d*|left|right|foreground|background|\d+)$", re.I)


class SamMed2DSource:
  name = "sam_med2d"

  def __init__(self, root: str | Path, *, layout: str = "auto", modality: str = "ct",
               datasets: list[str] | None = None, index: str | Path | None = None,
               class_mapping: str | Path | None = None, max_mask_fraction: float = 0.9):
    self.root = Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"SA-Med2D root {self.root} is not a folder; pass the SAMed2Dv1/ or data_demo/ "
                              "folder")
    if layout == "auto":
      if (self.root / RELEASE_INDEX).is_file() or index is not None:
        layout = "release"
      elif any((self.root / n).is_file() for n in DEMO_INDEXES):
        layout = "demo"
      elif (self.root / "masks").is_dir() and any("--" in e.name for e in _scan(self.root / "masks", 50)):
        layout = "release"
      else:
        raise ValueError(f"{self.root}: neither {RELEASE_INDEX}, {' / '.join(DEMO_INDEXES)} nor "
                         "masks/*--*.png found; pass layout='release' or 'demo' with the right root")
    if layout not in ("release", "demo"):
      raise ValueError(f"layout must be auto, release or demo, got {layout!r}")
    if modality not in MODALITIES:
      raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    self.layout = layout
    self.modality = modality
    self.datasets = set(datasets) if datasets else None
    self.index = Path(index) if index else None
    self.max_mask_fraction = max_mask_fraction
    self.skips = SkipReport()
    self._names: dict[str, dict[str, str]] | None = None
    if layout == "release":
      mp = Path(class_mapping) if class_mapping else self.root / RELEASE_MAPPING
      if not mp.is_file():
        raise FileNotFoundError(f"{mp} not found: class ids cannot be named without it; "
                                "pass class_mapping=PATH")
      self._names = _load_mapping(mp)

  def params(self) -> dict[str, Any]:
    return {"root": str(self.root.resolve()), "layout": self.layout, "modality": self.modality,
            "datasets": sorted(self.datasets) if self.datasets else None,
            "max_mask_fraction": self.max_mask_fraction}

  def __iter__(self) -> Iterator[Sample]:
    self.skips = SkipReport()
    if self.layout == "demo":
      yield from self._iter_demo()
    else:
      yield from self._iter_release()

  # ---- shared ------------------------------------------------------------------------------------------
  def _load_sample(self, image_path: Path, masks: list[tuple[Path | None, str, str]], *, image_id: str,
                   case_id: str, modality: str, dataset: str, where: str) -> Sample | None:
    """masks: (path or None if already rejected, raw label, where-string)."""
    try:
      image = read_image(image_path)
    except SkipError as e:
      self.skips.add(where, e.reason, e.detail)
      return None
    n_unique = len(np.unique(image))
    if n_unique <= 2:  # blank, or a mask saved as an image (Brain_PTM, brain-growth)
      self.skips.add(where, "blank or binary image", f"{n_unique} distinct values")
      return None
    h, w = image.shape[:2]
    instances = []
    for mpath, label, mwhere in masks:
      if mpath is None:
        continue
      mask = read_instance_mask(mpath, mwhere, (h, w), self.skips)
      if mask is None:
        continue
      area = int(mask.sum())
      if area > self.max_mask_fraction * h * w:
        self.skips.add(mwhere, "mask covers nearly the whole image", f"{area / (h * w):.0%} (inverted?)")
        continue
      instances.append(Instance(label=label, mask=mask, meta={"file": mpath.name}))
    if not instances:
      self.skips.add(where, "no usable masks", f"{len(masks)} listed")
      return None
    return Sample(image_id=image_id, image=image, instances=instances, case_id=case_id, modality=modality,
                  source=self.name, meta={"dataset": dataset, "plane": None, "file": image_path.name})

  def _resolve(self, rel: str, where: str, *, demo: bool) -> Path | None:
    try:
      if demo:  # demo paths are relative to the repo root and start with the folder's own name
        p = confined(self.root, rel, strip_first=True)
        if p.exists():
          return p
      return confined(self.root, rel)
    except SkipError as e:
      self.skips.add(where, e.reason, e.detail)
      return None

  # ---- demo layout -------------------------------------------------------------------------------------
  def _demo_index(self) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in DEMO_INDEXES:
      p = self.root / name
      if not p.is_file():
        continue
      try:
        data = json.loads(p.read_text())
      except (OSError, json.JSONDecodeError) as e:
        self.skips.add(name, "unreadable index", f"{type(e).__name__}: {e}")
        continue
      if not isinstance(data, dict):
        self.skips.add(name, "unreadable index", "expected a JSON object")
        continue
      if name.startswith("image2label"):
        for img, masks in data.items():
          lst = out.setdefault(str(img), [])
          lst.extend(str(m) for m in (masks if isinstance(masks, list) else [masks]) if str(m) not in lst)
      else:
        for mask, img in data.items():
          lst = out.setdefault(str(img), [])
          if str(mask) not in lst:
            lst.append(str(mask))
    return out

  def _iter_demo(self) -> Iterator[Sample]:
    index = self._demo_index()
    listed = {Path(k).name for k in index}
    if (self.root / "images").is_dir():
      for e in sorted(_scan(self.root / "images"), key=lambda e: e.name):
        if e.name.endswith(".png") and e.name not in listed:
          self.skips.add(f"images/{e.name}", "image not in any index", "no masks listed for it")
    for img_rel, mask_rels in index.items():
      where = img_rel
      img_path = self._resolve(img_rel, where, demo=True)
      if img_path is None:
        continue
      stem = img_path.stem
      case, sl = _demo_case_slice(stem)
      dataset = next((d for pre, d in DEMO_DATASETS if case.startswith(pre)), "SAM-Med2D_demo")
      image_id = make_image_id(self.modality, dataset, case, f"z_{sl:04d}" if sl is not None else "2d_none")
      masks = []
      for m_rel in mask_rels:
        mp = self._resolve(m_rel, m_rel, demo=True)
        if mp is None:
          continue
        label = _demo_label(stem, mp.stem)
        if label is None:
          self.skips.add(m_rel, "mask name does not match image", f"expected {stem}_<label>_<NNN>.png")
          continue
        masks.append((mp, label, m_rel))
      s = self._load_sample(img_path, masks, image_id=image_id, case_id=image_id.rsplit("--", 1)[0],
                            modality=self.modality, dataset=dataset, where=where)
      if s is not None:
        yield s

  # ---- release layout ----------------------------------------------------------------------------------
  def _release_index(self) -> Iterator[tuple[str, list[str]]]:
    p = self.index or self.root / RELEASE_INDEX
    if p.is_file():
      # ~3.7M keys (several GB) for the full release: streamed member by member in one pass, never held whole.
      # A malformed file raises (JsonStreamError, a ValueError: file + byte offset) when the reader reaches it.
      for img, masks in iter_json_object(p):
        yield str(img), [str(m) for m in (masks if isinstance(masks, list) else [masks])]
      return
    groups: dict[str, list[str]] = {}
    for e in _scan(self.root / "masks"):
      if e.name.endswith(".png"):
        groups.setdefault(e.name[:-4].rsplit("--", 1)[0], []).append(f"masks/{e.name}")
    for stem in sorted(groups):
      yield f"images/{stem}.png", sorted(groups[stem])

  def _iter_release(self) -> Iterator[Sample]:
    assert self._names is not None
    for img_rel, mask_rels in self._release_index():
      where = img_rel
      stem = Path(img_rel).name[:-4] if img_rel.endswith(".png") else Path(img_rel).name
      parts = stem.split("--")
      if len(parts) != 4:
        self.skips.add(where, "image name does not parse", "expected <mod>--<dataset>--<case>--<slice>")
        continue
      dataset = parts[1]
      if self.datasets is not None and dataset not in self.datasets:
        continue
      modality = modality_from_id(stem)
      if modality not in MODALITIES:
        self.skips.add(where, "unknown modality prefix", parts[0])
        continue
      img_path = self._resolve(img_rel, where, demo=False)
      if img_path is None:
        continue
      names = self._names.get(dataset, self._names.get("*", {}))
      masks: list[tuple[Path | None, str, str]] = []
      for m_rel in mask_rels:
        mstem = Path(m_rel).name[:-4]
        mparts = mstem.split("--")
        if len(mparts) != 5 or mparts[:4] != parts:
          self.skips.add(m_rel, "mask name does not match image", f"expected {stem}--CCCC_III.png")
          continue
        cid = mparts[4].split("_")[0]
        label = names.get(cid)
        if label is None:
          self.skips.add(m_rel, "class id not in mapping", f"{dataset} class {cid}")
          continue
        if label.lower().startswith("union"):
          self.skips.add(m_rel, "union_* aggregate mask", label)
          continue
        if _GENERIC.match(label):
          self.skips.add(m_rel, "generic class name", label)
          continue
        mp = self._resolve(m_rel, m_rel, demo=False)
        if mp is not None:
          masks.append((mp, label, m_rel))
      s = self._load_sample(img_path, masks, image_id=stem, case_id="--".join(parts[:3]), modality=modality,
                            dataset=dataset, where=where)
      if s is not None:
        yield s


def _scan(folder: Path, limit: int | None = None) -> list[os.DirEntry]:
  out = []
  if not folder.is_dir():
    return out
  with os.scandir(folder) as it:
    for e in it:
      out.append(e)
      if limit is not None and len(out) >= limit:
        break
  return out


def _load_mapping(path: Path) -> dict[str, dict[str, str]]:
  """-> {dataset: {class id "CCCC": class name}}; a flat {name: id} file maps under "*"."""
  data = json.loads(path.read_text())
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  nested = all(isinstance(v, dict) for v in data.values())
  items = data.items() if nested else [("*", data)]
  out: dict[str, dict[str, str]] = {}
  for ds, mapping in items:
    inv = out.setdefault(ds, {})
    for name, cid in mapping.items():
      inv[f"{int(cid):04d}"] = str(name)
  return out


def _demo_case_slice(stem: str) -> tuple[str, int | None]:
  head, _, tail = stem.rpartition("_")
  if head and tail.isdigit():
    return head, int(tail)
  return stem, None


def _demo_label(image_stem: str, mask_stem: str) -> str | None:
  if not mask_stem.startswith(image_stem + "_"):
    return None
  rest = mask_stem[len(image_stem) + 1:]
  label, _, inst = rest.rpartition("_")
  if label and inst.isdigit():
    return label
  return rest or None
