"""A plain folder of 2-D PNGs with masks: the simplest way to bring your own data.

  root/images/<stem>.png                       8-bit grey or RGB
  root/masks/<stem>/<label>[_<NNN>].png        binary masks, one instance per file        (either this)
  root/labels/<stem>.png + root/classes.json   integer label map, {"1": "liver", ...}      (or this)
  root/meta.json (optional)                    {"modality": "ct", "dataset": "MyData",
                                                "cases": {"<stem>": "<case>"}}

Ids: a stem already in SA-Med2D form (`ct_00--Data--case--z_0001`) is kept, its case being the first three
fields. Otherwise `modality` (argument or meta.json) is required and the id becomes
`{ct_00}--{dataset}--{stem}--2d_none`; the case is meta.json's `cases[stem]`, else the stem without a
trailing `_<digits>` / `-<digits>` slice number (`patient7_031` -> `patient7`).
Problems are counted in `self.skips`, never raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.sources._io import SkipError, read_image, read_instance_mask
from data_gen.sources.base import (
  MODALITIES,
  MODALITY_PREFIX,
  Instance,
  Sample,
  SkipReport,
  modality_from_id,
  sanitize_token,
)

_SLICE_SUFFIX = re.compile(r"^(.*?)[_-]\d+$")


class PngFolderSource:
  name = "png_folder"

  def __init__(self, root: str | Path, *, modality: str | None = None, dataset: str | None = None):
    self.root = Path(root)
    if not (self.root / "images").is_dir():
      raise FileNotFoundError(f"{self.root}/images not found; expected images/, masks/<stem>/ or labels/ "
                              "(see data_gen/sources/png_folder.py)")
    meta: dict[str, Any] = {}
    mp = self.root / "meta.json"
    if mp.is_file():
      meta = json.loads(mp.read_text())
    self.modality = modality or meta.get("modality")
    if self.modality is not None and self.modality not in MODALITIES:
      raise ValueError(f"unknown modality {self.modality!r}; use one of {', '.join(MODALITIES)}")
    self.dataset = sanitize_token(dataset or meta.get("dataset") or self.root.name)
    self.cases: dict[str, str] = dict(meta.get("cases", {}))
    self.classes: dict[int, str] = {}
    cp = self.root / "classes.json"
    if cp.is_file():
      self.classes = {int(k): str(v) for k, v in json.loads(cp.read_text()).items() if int(k) != 0}
    self.skips = SkipReport()

  def params(self) -> dict[str, Any]:
    return {"root": str(self.root.resolve()), "modality": self.modality, "dataset": self.dataset}

  def _ids(self, stem: str) -> tuple[str, str, str] | None:
    """-> (image id, case id, modality) or None (counted)."""
    parts = stem.split("--")
    if len(parts) == 4 and modality_from_id(stem) in MODALITIES:
      return stem, "--".join(parts[:3]), modality_from_id(stem)
    if self.modality is None:
      self.skips.add(f"images/{stem}.png", "no modality",
                     "name is not <mod>--<dataset>--<case>--<slice>; pass modality= or set it in meta.json")
      return None
    m = _SLICE_SUFFIX.match(stem)
    case = self.cases.get(stem) or (m.group(1) if m else stem)
    prefix = MODALITY_PREFIX[self.modality]
    image_id = f"{prefix}--{self.dataset}--{sanitize_token(stem)}--2d_none"
    return image_id, f"{prefix}--{self.dataset}--{sanitize_token(case)}", self.modality

  def __iter__(self) -> Iterator[Sample]:
    self.skips = SkipReport()
    for img_path in sorted((self.root / "images").glob("*.png")):
      if img_path.name.startswith((".", "_")):  # macOS ._* junk
        continue
      stem = img_path.stem
      where = f"images/{img_path.name}"
      ids = self._ids(stem)
      if ids is None:
        continue
      try:
        image = read_image(img_path)
      except SkipError as e:
        self.skips.add(where, e.reason, e.detail)
        continue
      h, w = image.shape[:2]
      instances = self._instances(stem, h, w)
      if not instances:
        self.skips.add(where, "no usable masks", "")
        continue
      yield Sample(image_id=ids[0], image=image, instances=instances, case_id=ids[1], modality=ids[2],
                   source=self.name, meta={"dataset": self.dataset, "plane": None, "file": img_path.name})

  def _instances(self, stem: str, h: int, w: int) -> list[Instance]:
    out: list[Instance] = []
    mdir = self.root / "masks" / stem
    if mdir.is_dir():
      for mp in sorted(mdir.glob("*.png")):
        mask = read_instance_mask(mp, f"masks/{stem}/{mp.name}", (h, w), self.skips)
        if mask is None:
          continue
        label, _, inst = mp.stem.rpartition("_")
        out.append(Instance(label=label if label and inst.isdigit() else mp.stem, mask=mask))
    lp = self.root / "labels" / f"{stem}.png"
    if lp.is_file():
      try:
        from PIL import Image

        with Image.open(lp) as im:
          lab = np.asarray(im)
      except OSError as e:
        self.skips.add(f"labels/{stem}.png", "unreadable label map", str(e))
        return out
      if lab.ndim == 3:
        lab = lab[..., 0]
      if lab.shape != (h, w):
        self.skips.add(f"labels/{stem}.png", "mask size mismatch", f"label map {lab.shape} vs image {(h, w)}")
        return out
      for v in np.unique(lab):
        if v == 0:
          continue
        if int(v) not in self.classes:
          self.skips.add(f"labels/{stem}.png", "label value not in classes.json", str(int(v)))
          continue
        out.append(Instance(label=self.classes[int(v)], mask=lab == v))
    return out
