"""Image preprocessing shared by training, evaluation and checkpoint parity: Qwen-VL's recipe.

Qwen-VL resizes straight to the square input size with PIL bicubic (no crop, aspect not kept), scales to
[0, 1] and normalises with the CLIP statistics. Doing it host-side with PIL is what makes it match the
original torchvision pipeline exactly (torchvision delegates PIL inputs to PIL).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """Any uint8 HxW / HxWx1 / HxWx3 / HxWx4 array or PIL image -> RGB PIL image."""
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image array, got {arr.dtype}; scale it to 0..255 first")
  return Image.fromarray(arr).convert("RGB")


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
  """Returns float32 (size, size, 3), CLIP-normalised, channels last (NHWC for the Flax ViT)."""
  pil = to_pil_rgb(image).resize((size, size), Image.BICUBIC)
  x = np.asarray(pil, np.float32) / 255.0
  return (x - CLIP_MEAN) / CLIP_STD
