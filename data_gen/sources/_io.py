"""File helpers shared by the file-based sources: confined path resolution and tolerant PNG reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class SkipError(Exception):
  """A file-level problem a source records in its SkipReport: `reason` is the counted category."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def confined(root: Path, rel: str, *, strip_first: bool = False) -> Path:
  """`root / rel`, refusing anything that escapes `root` (absolute paths, `..`, symlinks out)."""
  p = Path(rel)
  if strip_first and len(p.parts) > 1:
    p = Path(*p.parts[1:])
  if p.is_absolute() or ".." in p.parts:
    raise SkipError("path traversal", f"{rel!r} points outside {root}")
  full = (root / p).resolve()
  if not full.is_relative_to(root.resolve()):
    raise SkipError("path traversal", f"{rel!r} resolves outside {root}")
  return full


def read_image(path: Path) -> np.ndarray:
  """8-bit image as uint8 HxW (grey) or HxWx3 (colour). Identical-channel RGB (SA-Med2D CT) becomes HxW:
  lossless, a third of the size, and the boxes are computed on exactly what is saved."""
  if not path.is_file():
    raise SkipError("missing file", str(path))
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise SkipError("unsupported image mode", f"{path.name} is {mode}; convert to 8-bit first")
      if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
      if im.mode in ("LA", "La"):
        im = im.convert("L")
      elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
      arr = np.asarray(im)
  except SkipError:
    raise
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise SkipError("unreadable image", f"{path.name}: {type(e).__name__}: {e}") from e
  if arr.ndim == 3:
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
      arr = arr[..., 0]
  return np.ascontiguousarray(arr)


def read_mask(path: Path) -> np.ndarray:
  """Binary mask (any non-zero pixel of the first channel is foreground) as bool HxW."""
  if not path.is_file():
    raise SkipError("missing mask file", str(path))
  try:
    with Image.open(path) as im:
      im.load()
      arr = np.asarray(im)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise SkipError("unreadable mask", f"{path.name}: {type(e).__name__}: {e}") from e
  if arr.ndim == 3:
    arr = arr[..., 0]
  return arr > 0


def read_instance_mask(path: Path, where: str, image_shape: tuple[int, int], skips) -> np.ndarray | None:
  """A mask for an image of `image_shape`, or None with the reason counted in `skips` (a SkipReport):
  unreadable or missing file, size mismatch, empty mask."""
  try:
    mask = read_mask(path)
  except SkipError as e:
    skips.add(where, e.reason, e.detail)
    return None
  if mask.shape != tuple(image_shape):
    skips.add(where, "mask size mismatch", f"mask {mask.shape} vs image {tuple(image_shape)}")
    return None
  if not mask.any():
    skips.add(where, "empty mask", "")
    return None
  return mask
