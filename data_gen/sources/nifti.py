"""3-D NIfTI segmentation datasets: the Medical Segmentation Decathlon (MSD) and nnU-Net v2 raw layouts.

  MSD        root/dataset.json   {"labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"},
                                  "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}
             multi-channel tasks store one 4-D image (X, Y, Z, C); `channel` picks C.
  nnU-Net v2 root/dataset.json   {"labels": {"background": 0, "PZ": 1, "whole": [1, 2]}, "channel_names":
                                  {"0": "T2", "1": "ADC"}, "file_ending": ".nii.gz"}
             root/labelsTr/<case>.nii.gz and root/imagesTr/<case>_<CCCC>.nii.gz (CCCC = channel). A label
             given as a list (region-based training) is the union of those ids. The `ignore` label is dropped.

Display orientation (what every PNG looks like, whatever the file's affine):
  Both volumes go through the *image's* reorientation to the closest canonical RAS+ voxel order (the same
  flips/transposes `nibabel.as_closest_canonical` applies; the label is never resampled to get there). Then,
  in radiological convention:
    axial    (slice index along S, id tag `z_NNNN`): patient right on image left, anterior at the top
    coronal  (along A, tag `y_NNNN`):                patient right on image left, superior at the top
    sagittal (along R, tag `x_NNNN`):                anterior on image left,      superior at the top
  In array terms, with `plane` the 2-D slice of the canonical array (remaining axes in R, A, S order),
  image = plane.T[::-1, ::-1]. The slice number is the index in that canonical array (0 = right / posterior /
  inferior end). Pixels are made square: when the two in-plane spacings differ (coronal/sagittal slices of
  thick-slice CT) the slice is resampled to the finer spacing, linearly for the image and by nearest
  neighbour (centre-aligned index lookup) for labels, so labels stay exact integers. Sides are capped at
  `max_side`. Boxes are computed later on exactly this image.

Intensities -> uint8:
  CT  Hounsfield units windowed: [L - W/2, L + W/2] -> 0..255 (`CT_WINDOWS`, or "L,W", or "auto" = a preset
      picked from the dataset name: lung -> lung, brain/head -> brain, spine/bone/pelvi -> bone, else abdomen).
  MR / other  per-volume (not per-slice, so the slices of a case share one contrast) percentiles
      `mr_percentiles` (default 0.5..99.5) of all voxels -> 0..255, clipped.
  NaN/inf image voxels: if at most `max_nonfinite_fraction` (1%) of the volume, they are replaced by the
  volume's lowest finite value (dark, like air/background) and the count is put in sample.meta; more than
  that skips the case (counted). Non-finite or non-integer label voxels always skip the case.

Slices: only slices where some named label covers at least the tiny-object threshold (`boxes.min_area_for`
of the output size) are candidates; at most `max_slices_per_case` of them are taken per case (shared
across the requested axes), evenly spaced through the candidates ("even") or a seeded random pick
("random", seeded by (seed, case)), so one large volume does not dominate. One `Instance` per label present
in the slice (connected components are split later by the pipeline); names go through
`boxes.label_to_name`.

Modality (per channel name from dataset.json): CT -> ct; MRI/MR/T1/T1w/T1gd/T2/T2w/FLAIR/ADC/DWI/PD/... ->
mr; PET -> pet; US -> ultrasound. The id prefix keeps the sub-modality like SA-Med2D does (`mr_t2--`,
`mr_flair--`, `ct_00--`). nnU-Net normalisation names (`zscore`, `noNorm`, ...) say nothing about the
modality: pass `modality=`.

Bad input is counted in `self.skips` (one line: file + reason) and never raised: a dataset.json naming a
missing file, path traversal in dataset.json, corrupt or truncated volumes, image/label shape or
orientation mismatch, non-finite voxels, label values with no name in dataset.json (that label is dropped,
the others kept). Only a missing or unusable dataset.json raises (nothing could be read at all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.boxes import label_to_name, min_area_for
from data_gen.sources._io import SkipError, confined
from data_gen.sources.base import MODALITIES, MODALITY_PREFIX, Instance, Sample, SkipReport, sanitize_token

# (level, width) in HU. Values: the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
  "abdomen": (40.0, 400.0),
  "soft_tissue": (50.0, 350.0),
  "mediastinum": (50.0, 350.0),
  "liver": (30.0, 150.0),
  "lung": (-600.0, 1500.0),
  "bone": (400.0, 1800.0),
  "brain": (40.0, 80.0),
  "head_neck": (60.0, 350.0),
}
_AUTO_WINDOW = (("lung", "lung"), ("brain", "brain"), ("head", "head_neck"), ("neck", "head_neck"),
                ("spine", "bone"), ("vert", "bone"), ("bone", "bone"), ("pelvi", "bone"), ("skull", "bone"))

# axis name -> (canonical RAS axis the slice index runs along, SA-Med2D-style tag letter)
AXES: dict[str, tuple[int, str]] = {"sagittal": (0, "x"), "coronal": (1, "y"), "axial": (2, "z")}

_MR_NAMES = {"mr", "mri", "t1", "t1w", "t1gd", "t1c", "t1ce", "t1wce", "t2", "t2w", "flair", "adc", "dwi",
             "pd", "pdw", "hbv", "cine", "mprage", "lge", "swi", "dce", "bold", "t2star"}
_NIFTI_ENDINGS = (".nii.gz", ".nii")
_PERCENTILE_SAMPLE = 2_000_000  # voxels; a strided subsample is enough for 0.5/99.5 percentiles


def channel_modality(name: str) -> tuple[str, str] | None:
  """dataset.json channel name -> (modality key, id prefix), e.g. "FLAIR" -> ("mr", "mr_flair"), or None."""
  key = re.sub(r"[\s_\-]+", "", str(name).strip().lower())
  if key in ("ct", "cta", "cect", "nect"):
    return "ct", MODALITY_PREFIX["ct"]
  if key in ("pet", "pt"):
    return "pet", MODALITY_PREFIX["pet"]
  if key in ("us", "ultrasound"):
    return "ultrasound", MODALITY_PREFIX["ultrasound"]
  if key in _MR_NAMES or key.startswith(("mr", "t1", "t2")):
    sub = "00" if key in ("mr", "mri") else re.sub(r"[^a-z0-9]", "", key.removeprefix("mr")) or "00"
    return "mr", f"mr_{sub}"
  return None


def parse_ct_window(spec: str | tuple[float, float], dataset: str = "") -> tuple[float, float]:
  """"abdomen" | "40,400" (level,width) | "auto" (preset from the dataset name) -> (low HU, high HU)."""
  if isinstance(spec, tuple):
    level, width = spec
  else:
    s = spec.strip().lower()
    if s == "auto":
      d = dataset.lower()
      s = next((preset for key, preset in _AUTO_WINDOW if key in d), "abdomen")
    if s in CT_WINDOWS:
      level, width = CT_WINDOWS[s]
    else:
      try:
        level, width = (float(v) for v in s.split(","))
      except ValueError:
        raise ValueError(f"--ct-window {spec!r}: use one of {', '.join(CT_WINDOWS)}, auto, or LEVEL,WIDTH "
                         "in HU (e.g. --ct-window=-600,1500)") from None
  if not width > 0:
    raise ValueError(f"CT window width must be > 0, got {width}")
  return level - width / 2.0, level + width / 2.0


def to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Linear map [lo, hi] -> [0, 255], clipped, rounded half to even (np.rint)."""
  y = (np.asarray(x, np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
  return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


def display(plane: np.ndarray) -> np.ndarray:
  """2-D slice of the canonical (RAS+) array -> radiological display orientation (see module docstring)."""
  return plane.T[::-1, ::-1]


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
  # Basic indexing gives a view; np.take copies through a slow generic path (12 ms per 256x256 slice of an
  # F-ordered NIfTI array against microseconds here).
  return vol[(slice(None),) * axis + (index,)]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  # Output pixel centre o+0.5 maps to input coordinate (o+0.5)*n_in/n_out; nearest input pixel = floor of it.
  return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Label resampling: picks input values, never mixes them."""
  if a.shape == shape:
    return a
  return a[np.ix_(_nearest_index(a.shape[0], shape[0]), _nearest_index(a.shape[1], shape[1]))]


def resize_linear(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Separable linear resampling with the same pixel-centre alignment as `resize_nearest`."""
  if a.shape == shape:
    return a
  out = np.asarray(a, np.float32)
  for axis, n_out in enumerate(shape):
    n_in = out.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    w = w[:, None] if axis == 0 else w[None, :]
    out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
  return out


@dataclasses.dataclass
class _Case:
  name: str  # case stem, e.g. la_003
  where: str  # for skip lines: the dataset.json entry or the label file
  image: Path  # resolved (confined) path
  label: Path
  channel: int | None  # index into a 4-D image's last axis (MSD); None: the file is one channel (nnU-Net)


def _load_volume(path: Path):
  import nibabel as nib

  if not path.is_file():
    raise SkipError("missing file", str(path))
  try:
    return nib.load(str(path))
  except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ValueError...
    raise SkipError("unreadable volume", f"{path.name}: {type(e).__name__}: {e}") from e


def _read(img, path: Path, *, channel: int | None = None, dtype=None) -> np.ndarray:
  try:
    arr = img.dataobj if channel is None else img.dataobj[..., channel]  # proxy slicing: one channel only
    return np.asarray(arr, dtype=dtype) if dtype is not None else np.asanyarray(arr)
  except Exception as e:  # truncated .nii.gz fails here, after the header parsed fine
    raise SkipError("unreadable volume", f"{path.name}: {type(e).__name__}: {e}") from e


class _NiftiSource:
  """Shared slicing machinery; subclasses provide the case list, label names and channel names."""

  name = "nifti"
  layout = ""

  def __init__(self, root: str | Path, *, axis: str | Sequence[str] = "axial", ct_window: str = "auto",
               mr_percentiles: tuple[float, float] = (0.5, 99.5), max_slices_per_case: int | None = 10,
               slice_sampling: str = "even", seed: int = 0, channel: int = 0, modality: str | None = None,
               dataset: str | None = None, square_pixels: bool = True, max_side: int = 1024,
               max_nonfinite_fraction: float = 0.01):
    self.root = Path(root)
    if not (self.root / "dataset.json").is_file():
      raise FileNotFoundError(f"{self.root}/dataset.json not found; --root must be the {self.layout} dataset "
                              "folder (the one holding dataset.json, imagesTr/, labelsTr/)")
    try:
      self.meta: dict[str, Any] = json.loads((self.root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.root}/dataset.json is not valid JSON ({e}); fix or re-export it") from e
    if not isinstance(self.meta, dict):
      raise ValueError(f"{self.root}/dataset.json must hold a JSON object")
    axes = [axis] if isinstance(axis, str) else list(axis)
    axes = [a.strip().lower() for part in axes for a in part.split(",") if a.strip()]
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
      raise ValueError(f"axis {bad or axis!r}: use axial, coronal or sagittal (comma list allowed)")
    if slice_sampling not in ("even", "random"):
      raise ValueError(f"slice_sampling must be 'even' or 'random', got {slice_sampling!r}")
    if not 0 <= mr_percentiles[0] < mr_percentiles[1] <= 100:
      raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {mr_percentiles}")
    if modality is not None and modality not in MODALITIES:
      raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    self.axes = tuple(dict.fromkeys(axes))
    self.mr_percentiles = (float(mr_percentiles[0]), float(mr_percentiles[1]))
    self.max_slices_per_case = max_slices_per_case if max_slices_per_case and max_slices_per_case > 0 else None
    self.slice_sampling = slice_sampling
    self.seed = seed
    self.channel = channel
    self.square_pixels = square_pixels
    self.max_side = max_side
    self.max_nonfinite_fraction = max_nonfinite_fraction
    self.dataset = sanitize_token(dataset) if dataset else self._default_dataset()
    self.ct_window_spec = ct_window
    self.ct_window = parse_ct_window(ct_window, self.dataset)
    self.classes = self._classes()  # [(raw name, (ids...))], background/ignore removed
    if not self.classes:
      raise ValueError(f"{self.root}/dataset.json names no foreground labels; nothing to ground")
    self.modality, self.prefix = self._modality(modality)
    self.skips = SkipReport()
    self.stats: Counter[str] = Counter()

  # ---- subclass hooks ----------------------------------------------------------------------------------
  def _default_dataset(self) -> str:
    raise NotImplementedError

  def _classes(self) -> list[tuple[str, tuple[int, ...]]]:
    raise NotImplementedError

  def _channel_names(self) -> dict[int, str]:
    raise NotImplementedError

  def _cases(self) -> Iterator[_Case]:
    raise NotImplementedError

  # ---- common ------------------------------------------------------------------------------------------
  def _modality(self, override: str | None) -> tuple[str, str]:
    names = self._channel_names()
    cname = names.get(self.channel)
    if names and cname is None:
      raise ValueError(f"{self.root}/dataset.json has channels {sorted(names)}; channel {self.channel} "
                       "does not exist")
    found = channel_modality(cname) if cname is not None else None
    if override is not None:
      if found is not None and found[0] == override:
        return found
      return override, MODALITY_PREFIX[override]
    if found is None:
      raise ValueError(f"{self.root}/dataset.json: channel {self.channel} is {cname!r}, which does not say "
                       f"the modality; pass modality= (--modalities) as one of {', '.join(MODALITIES)}")
    return found

  def params(self) -> dict[str, Any]:
    return {
      "root": str(self.root.resolve()), "layout": self.layout, "axes": list(self.axes),
      "ct_window": self.ct_window_spec, "ct_window_hu": list(self.ct_window),
      "mr_percentiles": list(self.mr_percentiles), "max_slices_per_case": self.max_slices_per_case,
      "slice_sampling": self.slice_sampling, "seed": self.seed, "channel": self.channel,
      "modality": self.modality, "dataset": self.dataset, "square_pixels": self.square_pixels,
      "max_side": self.max_side, "max_nonfinite_fraction": self.max_nonfinite_fraction,
    }

  def __iter__(self) -> Iterator[Sample]:
    self.skips = SkipReport()
    self.stats = Counter()
    for case in self._cases():
      self.stats["cases"] += 1
      try:
        samples = self._case_samples(case)
      except SkipError as e:
        self.skips.add(case.where, e.reason, e.detail)
        self.stats["cases_skipped"] += 1
        continue
      yield from samples

  def _load_case(self, case: _Case) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], int]:
    """-> (image float32 XYZ, label int XYZ, both in canonical RAS order; canonical zooms; non-finite count)."""
    import nibabel as nib

    img = _load_volume(case.image)
    lab_img = _load_volume(case.label)
    ishape, lshape = tuple(img.shape), tuple(lab_img.shape)
    lshape3 = lshape[:3] if len(lshape) <= 3 or all(d == 1 for d in lshape[3:]) else None
    if len(ishape) < 2 or len(lshape) < 2 or lshape3 is None:
      raise SkipError("unsupported volume shape", f"image {ishape}, label {lshape}; need 3-D (+channels)")
    if tuple(ishape[:3]) != tuple(lshape3):
      raise SkipError("image/label shape mismatch", f"image {ishape[:3]} vs label {lshape3}")
    n_channels = int(np.prod(ishape[3:])) if len(ishape) > 3 else 1
    if case.channel is not None and not 0 <= case.channel < n_channels:
      raise SkipError("missing channel", f"{case.image.name} has {n_channels} channel(s), wanted {case.channel}")
    if case.channel is None and n_channels != 1:
      raise SkipError("unsupported volume shape", f"{case.image.name} is {ishape}; expected one channel")
    if len(ishape) > 4:
      raise SkipError("unsupported volume shape", f"{case.image.name} is {ishape}; expected (X, Y, Z[, C])")
    try:
      ornt = nib.orientations.io_orientation(img.affine)
      lornt = nib.orientations.io_orientation(lab_img.affine)
    except Exception as e:
      raise SkipError("bad affine", f"{case.image.name}: {type(e).__name__}: {e}") from e
    if not np.array_equal(ornt, lornt):
      raise SkipError("image/label orientation differ",
                      f"{''.join(nib.aff2axcodes(img.affine))} vs {''.join(nib.aff2axcodes(lab_img.affine))}")

    data = _read(img, case.image, channel=(case.channel or 0) if len(ishape) == 4 else None, dtype=np.float32)
    if data.ndim == 2:
      data = data[:, :, None]
    lab = _read(lab_img, case.label)
    lab = lab.reshape(lab.shape[:3]) if lab.ndim >= 3 else lab[:, :, None]
    lab = self._check_labels(lab, case.label)

    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad:
      if n_bad > self.max_nonfinite_fraction * data.size:
        raise SkipError("non-finite image voxels", f"{case.image.name}: {n_bad} of {data.size} NaN/inf "
                        f"(> {self.max_nonfinite_fraction:.1%}); fix the volume or raise max_nonfinite_fraction")
      data = np.where(finite, data, np.float32(data[finite].min()))

    zooms = tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(ishape))
    czooms = [1.0, 1.0, 1.0]
    for i in range(3):
      czooms[int(ornt[i, 0])] = zooms[i]
    # Identical index flips/transposes for both: the label is never resampled to reach RAS.
    data = nib.orientations.apply_orientation(data, ornt)
    lab = nib.orientations.apply_orientation(lab, ornt)
    return data, lab, (czooms[0], czooms[1], czooms[2]), n_bad

  def _check_labels(self, lab: np.ndarray, path: Path) -> np.ndarray:
    if lab.dtype.kind == "f":
      if not np.isfinite(lab).all():
        raise SkipError("non-finite label voxels", path.name)
      if not np.array_equal(lab, np.round(lab)):
        raise SkipError("non-integer label values", f"{path.name}: labels must be integer ids (interpolated?)")
    elif lab.dtype.kind not in "uib":
      raise SkipError("unsupported label dtype", f"{path.name}: {lab.dtype}")
    if lab.size and lab.min() < 0:
      raise SkipError("negative label values", path.name)
    top = int(lab.max()) if lab.size else 0
    return lab.astype(np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.int64), copy=False)

  def _intensity_range(self, data: np.ndarray) -> tuple[float, float]:
    if self.modality == "ct":
      return self.ct_window
    flat = data.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
      flat = flat[:: flat.size // _PERCENTILE_SAMPLE]
    lo, hi = (float(v) for v in np.percentile(flat, self.mr_percentiles))
    return lo, hi

  def _out_shape(self, n_rows: int, n_cols: int, sp_row: float, sp_col: float) -> tuple[int, int]:
    if not self.square_pixels or not (sp_row > 0 and sp_col > 0 and np.isfinite(sp_row * sp_col)):
      h, w = n_rows, n_cols
    else:
      target = min(sp_row, sp_col)
      h, w = max(1, round(n_rows * sp_row / target)), max(1, round(n_cols * sp_col / target))
    if max(h, w) > self.max_side:
      f = self.max_side / max(h, w)
      h, w = max(1, round(h * f)), max(1, round(w * f))
    return h, w

  def _pick(self, candidates: list[int], k: int | None, case: str, axis: str) -> list[int]:
    if k is None or len(candidates) <= k:
      return candidates
    if self.slice_sampling == "even":
      return [candidates[i] for i in np.round(np.linspace(0, len(candidates) - 1, k)).astype(int)]
    h = int.from_bytes(hashlib.sha256(f"{case}\x00{axis}".encode()).digest()[:8], "little")
    rng = np.random.default_rng([self.seed, h])
    return sorted(candidates[i] for i in rng.choice(len(candidates), size=k, replace=False))

  def _case_samples(self, case: _Case) -> list[Sample]:
    data, lab, zooms, n_bad = self._load_case(case)
    all_ids = {i for _, ids in self.classes for i in ids}
    present = set((np.unique(lab) if lab.dtype.itemsize > 2 else np.flatnonzero(np.bincount(lab.ravel()))).tolist())
    for v in sorted(present - all_ids - self._ignored_ids() - {0}):
      self.skips.add(f"{case.label.name} value {v}", "label value not in dataset.json",
                     "add it to dataset.json labels; that label is left out")
    max_id = max(present)
    # ids absent from this volume are dropped so per-slice counting can index bincount rows directly
    classes = [(n, tuple(i for i in ids if i in present)) for n, ids in self.classes]
    classes = [(n, ids) for n, ids in classes if ids]
    if not classes:
      raise SkipError("no named labels in volume", case.label.name)
    lo, hi = self._intensity_range(data)
    if not hi > lo:
      raise SkipError("constant image volume", f"{case.image.name}: intensity range {lo}..{hi}")

    case_token = sanitize_token(case.name)
    case_id = f"{self.prefix}--{self.dataset}--{case_token}"
    budget = self.max_slices_per_case
    per_axis = [None] * len(self.axes) if budget is None else [
      budget // len(self.axes) + (1 if i < budget % len(self.axes) else 0) for i in range(len(self.axes))]
    out: list[Sample] = []
    for axis_name, k in zip(self.axes, per_axis, strict=True):
      if k == 0:
        continue
      ax, tag = AXES[axis_name]
      rest = [i for i in range(3) if i != ax]  # display cols run along rest[0], rows along rest[1]
      n_cols, n_rows = lab.shape[rest[0]], lab.shape[rest[1]]
      oh, ow = self._out_shape(n_rows, n_cols, zooms[rest[1]], zooms[rest[0]])
      thr = min_area_for(oh, ow) * (n_rows * n_cols) / (oh * ow)  # threshold in input voxels
      candidates = []
      for s in range(lab.shape[ax]):
        counts = np.bincount(_plane(lab, ax, s).ravel(), minlength=max_id + 1)
        self.stats["slices_seen"] += 1
        if any(counts[list(ids)].sum() >= thr for _, ids in classes):
          candidates.append(s)
      self.stats["slices_with_labels"] += len(candidates)
      for s in self._pick(candidates, k, case.name, axis_name):
        lab2 = resize_nearest(display(_plane(lab, ax, s)), (oh, ow))
        img2 = resize_linear(display(_plane(data, ax, s)), (oh, ow))
        image = to_uint8(img2, lo, hi)
        instances = []
        for raw, ids in classes:
          mask = lab2 == ids[0] if len(ids) == 1 else np.isin(lab2, ids)
          if mask.any():
            instances.append(Instance(label=label_to_name(raw, self.dataset), mask=mask,
                                      meta={"raw_label": raw, "label_ids": list(ids)}))
        if not instances:
          continue
        self.stats["slices_emitted"] += 1
        meta = {"dataset": self.dataset, "plane": axis_name, "slice": s, "num_slices": int(lab.shape[ax]),
                "file": case.image.name, "window": [lo, hi],
                "pixel_spacing_mm": [zooms[rest[1]] * n_rows / oh, zooms[rest[0]] * n_cols / ow]}
        if n_bad:
          meta["nonfinite_replaced"] = n_bad
        out.append(Sample(image_id=f"{case_id}--{tag}_{s:04d}", image=image, instances=instances,
                          case_id=case_id, modality=self.modality, source=self.name, meta=meta))
    return out

  def _ignored_ids(self) -> set[int]:
    return set()


class MsdSource(_NiftiSource):
  """Medical Segmentation Decathlon task folder (Task03_Liver/ with dataset.json, imagesTr/, labelsTr/)."""

  name = "msd"
  layout = "MSD"

  def _default_dataset(self) -> str:
    m = re.match(r"^Task\d+_(.+)$", self.root.resolve().name)
    if m:
      return sanitize_token(f"MSD_{m.group(1)}")  # the SA-Med2D token for MSD tasks (MSD_Liver)
    return sanitize_token(str(self.meta.get("name") or self.root.resolve().name))

  def _classes(self) -> list[tuple[str, tuple[int, ...]]]:
    labels = self.meta.get("labels")
    if not isinstance(labels, dict):
      raise ValueError(f"{self.root}/dataset.json has no 'labels' object {{\"1\": \"name\", ...}}")
    out = []
    for k, v in labels.items():
      try:
        i = int(k)
      except (TypeError, ValueError):
        raise ValueError(f"{self.root}/dataset.json labels key {k!r} is not an integer id; MSD maps "
                         "\"id\": \"name\" (nnU-Net v2 maps name: id: use --source nnunet)") from None
      if i != 0 and str(v).strip().lower() != "background":
        out.append((str(v), (i,)))
    return out

  def _channel_names(self) -> dict[int, str]:
    mods = self.meta.get("modality") or {}
    return {int(k): str(v) for k, v in mods.items()} if isinstance(mods, dict) else {}

  def _cases(self) -> Iterator[_Case]:
    training = self.meta.get("training")
    if not isinstance(training, list):
      raise ValueError(f"{self.root}/dataset.json has no 'training' list of {{image, label}}")
    for n, entry in enumerate(training):
      where = f"dataset.json training[{n}]"
      if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
         or not isinstance(entry.get("label"), str):
        self.skips.add(where, "bad dataset.json entry", "expected {\"image\": path, \"label\": path}")
        continue
      where = f"{where} {entry['image']}"
      try:
        image = confined(self.root, entry["image"])
        label = confined(self.root, entry["label"])
      except SkipError as e:
        self.skips.add(where, e.reason, e.detail)
        continue
      stem = image.name
      for end in _NIFTI_ENDINGS:
        stem = stem.removesuffix(end)
      yield _Case(name=stem, where=where, image=image, label=label, channel=self.channel)


class NnUNetSource(_NiftiSource):
  """nnU-Net v2 raw dataset folder (DatasetNNN_Name/ with dataset.json, imagesTr/, labelsTr/)."""

  name = "nnunet"
  layout = "nnU-Net v2"

  def _default_dataset(self) -> str:
    m = re.match(r"^Dataset\d+_(.+)$", self.root.resolve().name)
    return sanitize_token(m.group(1) if m else str(self.meta.get("name") or self.root.resolve().name))

  def _classes(self) -> list[tuple[str, tuple[int, ...]]]:
    labels = self.meta.get("labels")
    if not isinstance(labels, dict):
      raise ValueError(f"{self.root}/dataset.json has no 'labels' object {{\"name\": id, ...}}")
    out = []
    self._ignore: set[int] = set()
    for name, v in labels.items():
      ids = v if isinstance(v, list) else [v]
      try:
        ids = tuple(int(i) for i in ids)
      except (TypeError, ValueError):
        raise ValueError(f"{self.root}/dataset.json label {name!r}: {v!r} is not an integer id (or list); "
                         "nnU-Net v2 maps \"name\": id (MSD maps id: name: use --source msd)") from None
      if str(name).strip().lower() == "ignore":
        self._ignore.update(ids)
      elif str(name).strip().lower() != "background" and ids != (0,):
        out.append((str(name), ids))
    return out

  def _ignored_ids(self) -> set[int]:
    return self._ignore

  def _channel_names(self) -> dict[int, str]:
    ch = self.meta.get("channel_names") or self.meta.get("modality") or {}
    return {int(k): str(v) for k, v in ch.items()} if isinstance(ch, dict) else {}

  def _cases(self) -> Iterator[_Case]:
    ending = str(self.meta.get("file_ending", ".nii.gz"))
    if ending not in _NIFTI_ENDINGS:
      raise ValueError(f"{self.root}/dataset.json file_ending {ending!r}: this source reads NIfTI "
                       f"({', '.join(_NIFTI_ENDINGS)}); for 2-D PNG datasets use --source png_folder")
    labels_dir = self.root / "labelsTr"
    if not labels_dir.is_dir():
      raise FileNotFoundError(f"{labels_dir} not found; an nnU-Net v2 dataset has labelsTr/<case>{ending}")
    for p in sorted(labels_dir.iterdir()):
      if not p.name.endswith(ending) or p.name.startswith((".", "_")):  # macOS ._* junk
        continue
      case = p.name[: -len(ending)]
      image = self.root / "imagesTr" / f"{case}_{self.channel:04d}{ending}"
      yield _Case(name=case, where=f"labelsTr/{p.name}", image=image, label=p, channel=None)
