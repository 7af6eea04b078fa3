"""Built-in synthetic source: modality-flavoured phantoms that a tiny model can actually learn from.

Why it looks like this: the CPU demo trains a tiny ViT + decoder for minutes, and its scores must say
something. So every class has its own shape AND grey level (nearest-centroid on the mean intensity alone
separates them), objects sit at random positions and sizes (a "mean box per class" baseline is weak), and
objects never overlap (the box of an instance is unambiguous). Slices of one 3-D case share the case's
layout with small jitter, so a split by slice would leak test layouts into training; split by case.

Determinism: case k of modality m is generated from `np.random.default_rng([seed, m_index, k])` alone, so
adding cases, `limit`, or worker count never changes the existing cases.

Defaults (`PhantomSource()`): modalities ct, mr, x; 150 cases each; 6 axial slices per ct/mr case and one
image per x-ray case -> 1,950 images of 128x128. With the pipeline's test_fraction=0.2 (by case, per
modality) that is about 1,560 train and 390 test images. `balance_modalities=True` gives x-ray 900 cases
(2,700 images in all), so each modality contributes as many images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from data_gen.sources.base import Instance, Sample, make_image_id

SHAPES = ("ellipse", "rectangle", "ring", "triangle", "diamond", "cross")
SHAPE_WORDS = {
  "ellipse": "oval",
  "rectangle": "rectangular",
  "ring": "ring-shaped",
  "triangle": "triangular",
  "diamond": "diamond-shaped",
  "cross": "cross-shaped",
}


@dataclasses.dataclass(frozen=True)
class PhantomClass:
  name: str
  shape: str
  level: int | tuple[int, int, int]  # grey level, or RGB for colour modalities
  home: tuple[float, float] = (0.5, 0.5)  # (row, col) centre as a fraction of the side, for layout="anatomical"


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  slices: int  # >1: a 3-D-like modality, several slices per case
  plane: str  # what the MII answer calls the view
  background: int | tuple[int, int, int]
  body: int | tuple[int, int, int]
  noise: str  # gaussian | rician | speckle
  sigma: float
  classes: tuple[PhantomClass, ...]
  dataset: str = "Phantom"
  texture_cycles: int = 16  # texture period = image side / texture_cycles: each modality its own scale


# Grey levels are >= 30 apart from each other and from the body, noise sigma <= 7, per-case jitter small:
# separable by intensity alone (tested).
SPECS: dict[str, ModalitySpec] = {
  "ct": ModalitySpec(
    slices=6, plane="axial", background=0, body=85, noise="gaussian", sigma=6.0,
    classes=(
      PhantomClass("liver", "ellipse", 170, home=(0.38, 0.28)),
      PhantomClass("spleen", "triangle", 130, home=(0.36, 0.72)),
      PhantomClass("left kidney", "ring", 205, home=(0.68, 0.70)),
      PhantomClass("right kidney", "diamond", 240, home=(0.68, 0.30)),
      PhantomClass("aorta", "rectangle", 30, home=(0.56, 0.50)),
    ),
    texture_cycles=16,
  ),
  "mr": ModalitySpec(
    slices=6, plane="axial", background=5, body=60, noise="rician", sigma=6.0,
    classes=(
      PhantomClass("left ventricle", "ellipse", 235, home=(0.64, 0.68)),
      PhantomClass("right ventricle", "triangle", 175, home=(0.64, 0.30)),
      PhantomClass("myocardium", "ring", 120, home=(0.50, 0.50)),
      PhantomClass("left atrium", "rectangle", 205, home=(0.32, 0.68)),
      PhantomClass("right atrium", "cross", 145, home=(0.32, 0.30)),
    ),
    texture_cycles=11,
  ),
  "x": ModalitySpec(
    slices=1, plane="frontal", background=10, body=150, noise="gaussian", sigma=5.0,
    classes=(
      PhantomClass("left lung", "ellipse", 55, home=(0.42, 0.74)),
      PhantomClass("right lung", "triangle", 95, home=(0.42, 0.26)),
      PhantomClass("heart", "ring", 205, home=(0.70, 0.62)),
      PhantomClass("trachea", "rectangle", 20, home=(0.18, 0.50)),
      PhantomClass("spine", "diamond", 245, home=(0.72, 0.36)),
    ),
    texture_cycles=8,
  ),
  "ultrasound": ModalitySpec(
    slices=1, plane="transverse", background=0, body=70, noise="speckle", sigma=0.12,
    classes=(
      PhantomClass("gallbladder", "ellipse", 15, home=(0.34, 0.32)),
      PhantomClass("kidney", "ring", 150, home=(0.66, 0.68)),
      PhantomClass("liver lesion", "diamond", 200, home=(0.34, 0.68)),
      PhantomClass("nerve", "triangle", 250, home=(0.66, 0.32)),
    ),
    texture_cycles=13,
  ),
  "fundus": ModalitySpec(
    slices=1, plane="posterior pole", background=(0, 0, 0), body=(170, 70, 30), noise="gaussian", sigma=5.0,
    classes=(
      PhantomClass("optic disc", "ellipse", (250, 230, 150), home=(0.50, 0.28)),
      PhantomClass("macula", "diamond", (90, 30, 15), home=(0.50, 0.62)),
      PhantomClass("hemorrhage", "triangle", (120, 10, 10), home=(0.26, 0.56)),
      PhantomClass("exudate", "rectangle", (240, 220, 60), home=(0.74, 0.56)),
    ),
    texture_cycles=10,
  ),
}
DEFAULT_MODALITIES = ("ct", "mr", "x")
# "random": a structure may sit anywhere in the body, so naming one means finding it by its look among 2-4
# others. "anatomical": each class sits around its own home (`PhantomClass.home` +- home_jitter of the side,
# size still random), as organs do in real scans; the box still has to be read from the image.
LAYOUTS = ("random", "anatomical")
# Texture of the i-th class of a modality (with texture_amplitude > 0): stripes in four orientations or a
# checkerboard, with a period of its own per modality (`ModalitySpec.texture_cycles`), so no two classes of the
# default modalities share one. Why: grey levels repeat across modalities (CT spleen 130, MR myocardium 120), and
# Qwen-VL's patch embedding (no bias, LayerNorm after it) keeps a flat patch's grey level only as the length of
# one fixed vector, which the norm compresses (at init, liver 170 / left kidney 205 / right kidney 240 patch
# features have cosine 0.96-0.996); a texture is a direction instead. Naming a lone structure directly from the
# crowded demo's vision tower: 0.42 held-out after 600 steps with textures, 0.15 without (README).
TEXTURES = ("horizontal", "vertical", "diagonal", "antidiagonal", "checker")
# palette="hue" (not anatomy: the cpu_demo set, and a diagnostic): each class of a grey modality is drawn in a hue
# of its own (the i-th class in HUES[i]; body and background stay grey), so the patch embedding tells the classes
# apart at once (a hue is a direction after Qwen's LayerNorm, where a grey level is only a length). Grounding that
# still fails on it fails in the decoder's look-up, not in recognising the structures (README).
PALETTES = ("grey", "hue")
HUES = ((220, 40, 40), (40, 200, 40), (50, 80, 230), (220, 210, 40), (200, 40, 200))


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, period: float, phase: float) -> np.ndarray:
  w = 2 * np.pi / period
  if kind == "horizontal":
    return np.sin(w * yy + phase)
  if kind == "vertical":
    return np.sin(w * xx + phase)
  if kind == "diagonal":
    return np.sin(w * (xx + yy) / np.sqrt(2) + phase)
  if kind == "antidiagonal":
    return np.sin(w * (xx - yy) / np.sqrt(2) + phase)
  if kind == "checker":
    return np.sin(w * xx + phase) * np.sin(w * yy + phase) * 2
  raise ValueError(f"unknown phantom texture {kind!r}; use one of {TEXTURES}")


def _parse_range(text: str, cast: type, flag: str, example: str) -> tuple:
  """"MIN,MAX" -> (MIN, MAX) as `cast`; a bad text names `flag` and shows `example`."""
  try:
    lo, hi = (cast(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"{flag} {text!r}: write MIN,MAX, e.g. {flag} {example}") from None
  return lo, hi


def parse_objects(text: str) -> tuple[int, int]:
  """"MIN,MAX" labelled structures per image -> (MIN, MAX)."""
  return _parse_range(text, int, "--objects", "1,1 for one per image")


def parse_sizes(text: str) -> tuple[float, float]:
  """"MIN,MAX" structure sides as fractions of the image side -> (MIN, MAX)."""
  return _parse_range(text, float, "--size", "0.25,0.5 (fractions of the image side)")


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
  """Boolean h x w mask of `shape` filling its box (sampled at pixel centres)."""
  v = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
  u = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
  vv, uu = v[:, None], u[None, :]
  if shape == "ellipse":
    return uu * uu + vv * vv <= 1.0
  if shape == "rectangle":
    return np.ones((h, w), bool)
  if shape == "ring":
    r2 = uu * uu + vv * vv
    return (r2 <= 1.0) & (r2 >= 0.3)  # a thick wall so it stays one component at 12% of a small image
  if shape == "triangle":
    return np.abs(uu) <= (vv + 1.0) / 2.0 + 1.0 / w  # apex up; the slack keeps the apex pixel row
  if shape == "diamond":
    return np.abs(uu) + np.abs(vv) <= 1.0 + 1.0 / min(h, w)
  if shape == "cross":
    return (np.abs(uu) <= 0.4) | (np.abs(vv) <= 0.4)
  raise ValueError(f"unknown phantom shape {shape!r}; use one of {SHAPES}")


@dataclasses.dataclass
class _Placed:
  cls: PhantomClass
  y0: float  # box in pixels, float, [y0, y1) x [x0, x1)
  x0: float
  h: float
  w: float


def _in_body(y: float, x: float, size: int) -> bool:
  # Body: a superellipse |u|^4 + |v|^4 <= 1 with half-axes 0.46*size, centred. Convex, so a box whose four
  # corners are inside lies inside.
  c = size / 2.0
  a = 0.46 * size
  return ((x - c) / a) ** 4 + ((y - c) / a) ** 4 <= 1.0


def _body_mask(size: int) -> np.ndarray:
  c = size / 2.0
  a = 0.46 * size
  g = (np.arange(size, dtype=np.float32) + 0.5 - c) / a
  return g[:, None] ** 4 + g[None, :] ** 4 <= 1.0


class PhantomSource:
  """Synthetic ct/mr/x (and ultrasound, fundus) phantoms. Iterating yields `Sample`s case by case."""

  name = "phantom"

  def __init__(
    self,
    num_cases: int = 150,
    image_size: int = 128,
    seed: int = 0,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    slices_per_case: int | None = None,
    min_objects: int = 2,
    max_objects: int = 4,
    min_frac: float = 0.12,
    max_frac: float = 0.45,
    balance_modalities: bool = False,
    layout: str = "random",
    home_jitter: float = 0.12,
    texture_amplitude: float = 0.0,
    palette: str = "grey",
  ):
    if palette not in PALETTES:
      raise ValueError(f"phantom palette {palette!r} is unknown; use one of {', '.join(PALETTES)}")
    if layout not in LAYOUTS:
      raise ValueError(f"phantom layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    unknown = [m for m in modalities if m not in SPECS]
    if unknown:
      raise ValueError(f"phantom has no modality {unknown}; choose from {', '.join(SPECS)}")
    if image_size < 32:
      raise ValueError(f"phantom image_size {image_size} is too small; use >= 32")
    if not 1 <= min_objects <= max_objects:
      raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0.02 <= min_frac <= max_frac <= 0.6:
      raise ValueError(f"structure size {min_frac},{max_frac}: need 0.02 <= MIN <= MAX <= 0.6 (fractions of the "
                       "image side; the body is 0.92 of it)")
    self.num_cases = num_cases
    self.image_size = image_size
    self.seed = seed
    self.modalities = tuple(modalities)
    self.slices_per_case = slices_per_case
    self.min_objects, self.max_objects = min_objects, max_objects
    self.min_frac, self.max_frac = min_frac, max_frac
    self.balance_modalities = balance_modalities
    self.layout, self.home_jitter = layout, home_jitter
    self.texture_amplitude = texture_amplitude
    self.palette = palette
    self._body = _body_mask(image_size)

  def __len__(self) -> int:
    return sum(self.cases(m) * self._slices(m) for m in self.modalities)

  def cases(self, modality: str) -> int:
    """Cases of `modality`. With balance_modalities, a modality with fewer slices per case gets
    proportionally more cases, so each modality contributes about the same number of images (a 2-D X-ray
    case is one image, a CT case six): otherwise X-ray is 1/13 of the training set and its score lags."""
    if not self.balance_modalities:
      return self.num_cases
    most = max(self._slices(m) for m in self.modalities)
    return self.num_cases * most // self._slices(modality)

  def _slices(self, modality: str) -> int:
    spec = SPECS[modality]
    if spec.slices > 1 and self.slices_per_case is not None:
      return max(1, self.slices_per_case)
    return spec.slices

  def params(self) -> dict:
    return {
      "num_cases": self.num_cases, "image_size": self.image_size, "seed": self.seed,
      "modalities": list(self.modalities), "slices_per_case": self.slices_per_case,
      "min_objects": self.min_objects, "max_objects": self.max_objects,
      "min_frac": self.min_frac, "max_frac": self.max_frac,
      # Only when set, so folders made before the option existed keep their parameters.
      **({"balance_modalities": True} if self.balance_modalities else {}),
      **({"layout": self.layout, "home_jitter": self.home_jitter} if self.layout != "random" else {}),
      **({"texture_amplitude": self.texture_amplitude} if self.texture_amplitude else {}),
      **({"palette": self.palette} if self.palette != "grey" else {}),
    }

  def __iter__(self) -> Iterator[Sample]:
    counts = {m: self.cases(m) for m in self.modalities}
    for k in range(max(counts.values())):
      for mi, modality in enumerate(SPECS):
        if k < counts.get(modality, 0):
          yield from self.case(modality, k, _mi=mi)

  # -- one case -------------------------------------------------------------------------------------------
  def case(self, modality: str, k: int, *, _mi: int | None = None) -> list[Sample]:
    spec = SPECS[modality]
    mi = list(SPECS).index(modality) if _mi is None else _mi
    rng = np.random.default_rng([self.seed, mi, k])
    layout = self._layout(spec, rng)
    case_name = f"case_{k:04d}"
    n_slices = self._slices(modality)
    # Per-case contrast jitter: levels move together a little, so classes stay separable.
    gain = rng.uniform(0.98, 1.02)
    offset = rng.uniform(-4, 4)
    out = []
    for s in range(n_slices):
      slice_tag = f"z_{s:04d}" if n_slices > 1 else "2d_none"
      image_id = make_image_id(modality, spec.dataset, case_name, slice_tag)
      image, instances = self._render(spec, layout, rng, gain, offset, jitter=n_slices > 1)
      out.append(Sample(
        image_id=image_id, image=image, instances=instances,
        case_id=make_image_id(modality, spec.dataset, case_name, "case").rsplit("--", 1)[0],
        modality=modality, source=self.name,
        meta={"plane": spec.plane, "slice": s, "num_slices": n_slices, "dataset": spec.dataset},
      ))
    return out

  def _layout(self, spec: ModalitySpec, rng: np.random.Generator) -> list[_Placed]:
    size = self.image_size
    n = int(rng.integers(self.min_objects, min(self.max_objects, len(spec.classes)) + 1))
    classes = [spec.classes[i] for i in rng.permutation(len(spec.classes))[:n]]
    gap = max(4.0, 0.04 * size)  # room for per-slice jitter without ever touching
    margin = 3.0
    placed: list[_Placed] = []
    for cls in classes:
      hi = self.max_frac
      for attempt in range(200):
        if attempt and attempt % 40 == 0:
          hi = max(self.min_frac, hi * 0.8)  # crowded: try smaller objects rather than give up
        w = rng.uniform(self.min_frac, hi) * size
        h = float(np.clip(w * rng.uniform(0.65, 1.5), self.min_frac * size, hi * size))
        if self.layout == "anatomical":
          cy, cx = (np.asarray(cls.home) + rng.uniform(-self.home_jitter, self.home_jitter, 2)) * size
          y0, x0 = float(np.clip(cy - h / 2, 0, size - h)), float(np.clip(cx - w / 2, 0, size - w))
        else:
          x0 = rng.uniform(0, size - w)
          y0 = rng.uniform(0, size - h)
        corners = [(y0 - margin, x0 - margin), (y0 - margin, x0 + w + margin),
                   (y0 + h + margin, x0 - margin), (y0 + h + margin, x0 + w + margin)]
        if not all(_in_body(y, x, size) for y, x in corners):
          continue
        if any(y0 < p.y0 + p.h + gap and p.y0 < y0 + h + gap and x0 < p.x0 + p.w + gap and p.x0 < x0 + w + gap
               for p in placed):
          continue
        placed.append(_Placed(cls, y0, x0, h, w))
        break
    if not placed:  # cannot happen with the default fractions; keep the contract "at least one object"
      c = spec.classes[0]
      s = self.min_frac * size
      placed.append(_Placed(c, size / 2 - s / 2, size / 2 - s / 2, s, s))
    return placed

  def _render(self, spec: ModalitySpec, layout: list[_Placed], rng: np.random.Generator, gain: float,
              offset: float, jitter: bool) -> tuple[np.ndarray, list[Instance]]:
    size = self.image_size
    rgb = isinstance(spec.body, tuple) or self.palette == "hue"
    ch = 3 if rgb else 1
    img = np.empty((size, size, ch), np.float32)
    img[:] = np.asarray(spec.background, np.float32)  # a grey level broadcasts over the channels
    img[self._body] = np.asarray(spec.body, np.float32) * gain + offset
    dy, dx = (rng.integers(-2, 3, size=2) if jitter else (0, 0))
    instances = []
    for p in layout:
      scale = rng.uniform(0.88, 1.0) if jitter else 1.0
      h = max(3, int(round(p.h * scale)))
      w = max(3, int(round(p.w * scale)))
      cy = p.y0 + p.h / 2 + dy
      cx = p.x0 + p.w / 2 + dx
      y0 = int(np.clip(round(cy - h / 2), 0, size - h))
      x0 = int(np.clip(round(cx - w / 2), 0, size - w))
      local = _shape_mask(p.cls.shape, h, w)
      mask = np.zeros((size, size), bool)
      mask[y0:y0 + h, x0:x0 + w] = local
      index = spec.classes.index(p.cls)  # hue and texture go by the class's place in its modality
      level = HUES[index % len(HUES)] if self.palette == "hue" and not isinstance(p.cls.level, tuple) else p.cls.level
      value = np.asarray(level, np.float32) * gain + offset
      if self.texture_amplitude:
        kind = TEXTURES[index % len(TEXTURES)]
        yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32) + 0.5
        pattern = _texture(kind, yy[local], xx[local], size / spec.texture_cycles, rng.uniform(0, 2 * np.pi))
        value = value + (self.texture_amplitude * pattern)[:, None]
      img[y0:y0 + h, x0:x0 + w][local] = value
      instances.append(Instance(label=p.cls.name, mask=mask, meta={"shape": p.cls.shape}))
    img = self._noise(spec, img, rng)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return (out if rgb else out[..., 0]), instances

  def _noise(self, spec: ModalitySpec, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    # A grey modality drawn in hues gets the grey noise on every channel: the same random draws as its grey
    # twin (so every later slice's jitter, and so its boxes, match), and body and background stay grey.
    shape = img.shape if isinstance(spec.body, tuple) else img.shape[:2] + (1,)
    if spec.noise == "gaussian":
      img += rng.normal(0, spec.sigma, shape).astype(np.float32)
    elif spec.noise == "rician":
      # MR magnitude noise plus a smooth bias field across the field of view.
      ramp = np.linspace(-1, 1, size, dtype=np.float32)
      a, b = rng.uniform(-0.08, 0.08, size=2)
      img *= (1.0 + a * ramp[:, None] + b * ramp[None, :])[..., None]
      n1 = rng.normal(0, spec.sigma, shape).astype(np.float32)
      n2 = rng.normal(0, spec.sigma, shape).astype(np.float32)
      img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    elif spec.noise == "speckle":
      img *= 1.0 + rng.normal(0, spec.sigma, shape).astype(np.float32)
    return img
