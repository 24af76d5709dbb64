"""Image and mask file reading shared by every source, with clear errors.

`read_rgb` returns uint8 [H, W, 3] RGB for every image mode Pillow reads, by one rule
(`to_8bit`), so that no bit depth is clipped:
  * 8-bit modes ('1', 'L', 'P', 'RGB', 'RGBA', 'RGBX', 'LA', 'PA', 'CMYK', 'YCbCr', 'LAB',
    'HSV') are converted by Pillow; the alpha channel of 'RGBA' / 'LA' / 'PA' and palette
    transparency are dropped (the colour under a transparent pixel is kept, as the published
    loaders' `convert('RGB')` keeps it);
  * 16-bit grey ('I;16', 'I;16L', 'I;16B', 'I;16N') is scaled to 8 bits,
    v8 = round(v16 * 255 / 65535) (Pillow's own conversion clips every value above 255 to
    white);
  * 32-bit integer grey ('I') is read as 16-bit data (Pillow's mode for 16-bit PNGs before
    version 10) when its values lie in 0..65535, else rejected;
  * 32-bit float grey ('F') is scaled by 255 when its values lie in [0, 1], rounded when they
    lie in [0, 255], else rejected; NaN or infinite values are rejected;
  * any other mode is rejected with a `DataError` that names the file and the mode.

Masks whose size differs from their image (FSS-1000 ships several) are resized to the image
with nearest-neighbour sampling (`fit_mask`, PyTorch's 'nearest' index rule, so only the
stored label values survive). Every source uses this one rule; each resize is logged with both
file names and sizes and counted (`resized_mask_count()` per thread, the sources'
`resized_masks` attribute per process, and the evaluation batches' `masks_resized` key).

`read_mask` returns the stored label values of a segmentation PNG as
uint8 [H, W]: palette ('P') images give their palette indices (the VOC convention), grey images
their grey values; an RGB(A) file whose channels are equal is read as grey, a colour-coded RGB
mask is rejected. `read_mask(path, gray=True)` instead returns the luminance (PIL `convert('L')`),
as FSS-1000 masks are read. Every failure raises `DataError` naming the file.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from PIL import Image

from fssjax.data.base import DataError

log = logging.getLogger(__name__)

EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr",
                   "LAB", "HSV")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_LOGGED_RESIZES = 20  # per process: log this many resized masks, then every 1000th
_local = threading.local()
_resized_total = [0]
_resized_lock = threading.Lock()


def to_8bit(img: Image.Image, path: str) -> Image.Image:
  """An image in an 8-bit-per-channel mode, by the module's rule (no clipping of deep images).

  Returns 'L' for 16-bit, 32-bit integer and float grey images; 'RGBA' for palette images with
  transparency; other 8-bit modes unchanged.

  Raises:
    DataError: a mode outside the rule, or values outside the range the mode allows; the
      message names the file and the mode.
  """
  mode = img.mode
  if mode in EIGHT_BIT_MODES:
    if mode == "P" and "transparency" in img.info:
      return img.convert("RGBA")  # no Pillow warning; same colours as convert('RGB')
    if mode == "RGBa":
      return img.convert("RGBA")
    return img
  if mode in SIXTEEN_BIT_MODES or mode == "I":
    raw = np.asarray(img).astype(np.int64)
    if raw.size and (raw.min() < 0 or raw.max() > 65535):
      raise DataError(
          f"Image file {path} (mode {mode}) has values in [{raw.min()}, {raw.max()}]; expected "
          "16-bit values 0..65535 (other 32-bit integer images are not supported)")
    return Image.fromarray(((raw * 255 + 32767) // 65535).astype(np.uint8), mode="L")
  if mode == "F":
    raw = np.asarray(img, dtype=np.float64)
    if raw.size and not np.isfinite(raw).all():
      raise DataError(f"Image file {path} (mode F, 32-bit float) has NaN or infinite values")
    lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
      raise DataError(f"Image file {path} (mode F, 32-bit float) has values in [{lo}, {hi}]; "
                      "expected [0, 1] or [0, 255]")
    scale = 255.0 if hi <= 1.0 else 1.0
    return Image.fromarray(np.rint(raw * scale).astype(np.uint8), mode="L")
  raise DataError(f"Image file {path} has Pillow mode {mode!r}, which fssjax does not decode; "
                  f"supported modes: {list(EIGHT_BIT_MODES + SIXTEEN_BIT_MODES + ('I', 'F'))}")


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
    img = to_8bit(img, path)
    if img.mode != "RGB":
      img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
  except DataError:
    raise
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
      True: return the luminance, as PIL's `convert('L')` computes it (white = 255), after
      the 8-bit rule of `to_8bit` (a 16-bit mask is scaled, not clipped).

  Raises:
    DataError: missing or corrupt file, a colour-coded RGB label image, or label values > 255.
  """
  img = _open(path, "mask")
  try:
    if gray:
      arr = np.asarray(to_8bit(img, path).convert("L"), dtype=np.uint8)
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
    elif img.mode in EIGHT_BIT_MODES:
      arr = np.asarray(img.convert("L"), dtype=np.uint8)
    else:
      raise DataError(f"Mask file {path} has Pillow mode {img.mode!r}, which is not a label "
                      "image mode ('P', 'L', '1', 'I', 'I;16', 'F', 'LA', 'PA', or grey RGB)")
  except DataError:
    raise
  except Exception as e:
    raise DataError(f"Corrupt or unreadable mask file {path}: {type(e).__name__}: {e}") from e
  if arr.ndim != 2:
    raise DataError(f"Mask file {path} decoded to shape {arr.shape}, expected [H, W]")
  return arr


def fit_mask(mask: np.ndarray, image_shape, image_path: str, mask_path: str,
             source=None) -> np.ndarray:
  """The mask at its image's size: unchanged when the sizes agree, else resized nearest.

  The one rule of every source for a mask whose size differs from its image (FSS-1000 ships
  such masks; the published loaders resize them). Nearest-neighbour with PyTorch's index rule
  (`fssjax.data.transforms.resize_nearest`) keeps only the stored label values. A resize is
  logged (with both files and sizes; the first few per process, then every 1000th), counted
  per thread (`resized_mask_count`) and, when `source` is given, in `source.resized_masks`.

  Args:
    mask: uint8 [h, w] (or [h, w, ...]).
    image_shape: the image's shape; its first two entries are the target (H, W).
    image_path, mask_path: names for the log line (a file, or an annotation reference).
    source: the source whose `resized_masks` counter to increment.
  """
  h, w = int(image_shape[0]), int(image_shape[1])
  if tuple(mask.shape[:2]) == (h, w):
    return mask
  from fssjax.data import transforms  # pylint: disable=import-outside-toplevel
  out = np.ascontiguousarray(transforms.resize_nearest(mask, h, w))
  _local.count = getattr(_local, "count", 0) + 1
  with _resized_lock:
    _resized_total[0] += 1
    total = _resized_total[0]
  if source is not None:
    source.resized_masks = getattr(source, "resized_masks", 0) + 1
  if total <= _LOGGED_RESIZES or total % 1000 == 0:
    log.warning("Mask size differs from its image; resized the mask (nearest) to the image: "
                "image %s is %dx%d (HxW), mask %s is %dx%d (HxW) [%d masks resized in this "
                "process]", image_path, h, w, mask_path, mask.shape[0], mask.shape[1], total)
  return out


def resized_mask_count() -> int:
  """Masks resized by `fit_mask` in the calling thread so far (the pipeline counts an
  episode's resizes as the difference before / after loading it)."""
  return getattr(_local, "count", 0)


def resized_mask_total() -> int:
  """Masks resized by `fit_mask` in this process so far (all threads)."""
  return _resized_total[0]


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
