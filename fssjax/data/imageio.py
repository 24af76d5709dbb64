"""Image and mask file reading shared by every source, with clear errors.

`read_rgb` returns uint8 [H, W, 3] RGB for any PIL-readable image (grey, palette, CMYK and RGBA
images are converted). `read_mask` returns the stored label values of a segmentation PNG as
uint8 [H, W]: palette ('P') images give their palette indices (the VOC convention), grey images
their grey values; an RGB(A) file whose channels are equal is read as grey, a colour-coded RGB
mask is rejected. `read_mask(path, gray=True)` instead returns the luminance (PIL `convert('L')`),
as FSS-1000 masks are read. Every failure raises `DataError` naming the file.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from fssjax.data.base import DataError


def _open(path: str, what: str) -> Image.Image:
  if not os.path.isfile(path):
    raise DataError(f"Missing {what} file: {path}")
  try:
    img = Image.open(path)
    img.load()
  except Exception as e:  # PIL raises several exception types on bad files.
    raise DataError(f"Corrupt or unreadable {what} file {path}: {type(e).__name__}: {e}") from e
  return img


def image_size(path: str) -> tuple[int, int]:
  """Returns (height, width) of an image file from its header, without decoding the pixels."""
  if not os.path.isfile(path):
    raise DataError(f"Missing image file: {path}")
  try:
    with Image.open(path) as img:
      w, h = img.size
  except Exception as e:
    raise DataError(f"Corrupt or unreadable image file {path}: {type(e).__name__}: {e}") from e
  return h, w


def read_rgb(path: str) -> np.ndarray:
  """Reads an image as uint8 [H, W, 3] RGB.

  Raises:
    DataError: the file is missing or PIL cannot decode it (the message names the file).
  """
  img = _open(path, "image")
  try:
    if img.mode != "RGB":
      img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
  except Exception as e:
    raise DataError(f"Corrupt or unreadable image file {path}: {type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[2] != 3:
    raise DataError(f"Image file {path} decoded to shape {arr.shape}, expected [H, W, 3]")
  return arr


def read_mask(path: str, *, gray: bool = False) -> np.ndarray:
  """Reads a segmentation mask file as uint8 [H, W].

  Args:
    path: mask file (usually PNG).
    gray: False (default): return the stored label values (palette indices for 'P' images,
      values for 'L'/'I' images, one channel of an RGB image whose channels are all equal).
      True: return the luminance, as PIL's `convert('L')` computes it (white = 255).

  Raises:
    DataError: missing or corrupt file, a colour-coded RGB label image, or label values > 255.
  """
  img = _open(path, "mask")
  try:
    if gray:
      arr = np.asarray(img.convert("L"), dtype=np.uint8)
    elif img.mode in ("P", "L"):
      arr = np.asarray(img, dtype=np.uint8)
    elif img.mode == "1":
      arr = np.asarray(img, dtype=np.uint8)  # 0/1
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
      raw = np.asarray(img)
      if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise DataError(
            f"Mask file {path} ({img.mode}) has values in [{raw.min()}, {raw.max()}]; "
            "expected label values 0..255")
      arr = raw.astype(np.uint8)
    elif img.mode in ("LA", "PA"):
      arr = np.asarray(img, dtype=np.uint8)[..., 0]
    elif img.mode in ("RGB", "RGBA"):
      rgb = np.asarray(img, dtype=np.uint8)[..., :3]
      r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
      if not (np.array_equal(r, g) and np.array_equal(r, b)):
        raise DataError(
            f"Mask file {path} is a colour-coded RGB image; expected a label PNG (palette or "
            "greyscale with one class value per pixel)")
      arr = np.ascontiguousarray(rgb[..., 0])
    else:
      arr = np.asarray(img.convert("L"), dtype=np.uint8)
  except DataError:
    raise
  except Exception as e:
    raise DataError(f"Corrupt or unreadable mask file {path}: {type(e).__name__}: {e}") from e
  if arr.ndim != 2:
    raise DataError(f"Mask file {path} decoded to shape {arr.shape}, expected [H, W]")
  return arr


def check_same_size(image: np.ndarray, image_path: str, mask: np.ndarray, mask_path: str) -> None:
  """Raises DataError naming both files and sizes when image and mask differ in size."""
  if image.shape[:2] != mask.shape[:2]:
    raise DataError(
        f"Mask size differs from its image: image {image_path} is "
        f"{image.shape[0]}x{image.shape[1]} (HxW), mask {mask_path} is "
        f"{mask.shape[0]}x{mask.shape[1]} (HxW)")


def load_skipping_corrupt(source, index: int, class_id: int, read, finish, log=None):
  """Shared `skip_corrupt=True` behaviour of the sources.

  Tries record `index`, then the following records of `class_id` (cyclically, in
  `source.images_with_class(class_id)` order). `read(r)` reads record r's files and raises
  `DataError` when one is missing or corrupt: such a record is counted in
  `source.corrupt_count`, remembered in `source._bad` (so it is not decoded again) and skipped.
  `finish(r, data)` turns the read files into (image, mask); its errors (for example a size
  mismatch) are not skipped.

  Raises:
    DataError: no record of the class is readable.
  """
  candidates = source.images_with_class(class_id)
  start = int(np.searchsorted(candidates, index))
  order = [index] + [int(candidates[(start + k) % len(candidates)]) for k in range(len(candidates))]
  for r in order:
    if r in source._bad:  # pylint: disable=protected-access
      continue
    try:
      data = read(r)
    except DataError as e:
      source._bad.add(r)  # pylint: disable=protected-access
      source.corrupt_count += 1
      if log is not None:
        log.warning("%s: skipping unreadable record %d (%s)", source.name, r, e)
      continue
    return finish(r, data)
  raise DataError(f"{source.name}: no readable image of class {class_id} "
                  f"({source.class_names[class_id]!r}); {source.corrupt_count} corrupt records")
