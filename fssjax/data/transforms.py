"""Image / mask transforms in numpy and PIL (they run inside grain worker processes).

One call, `prepare(image, mask, spec, rng)`, turns a source record (uint8 image [H,W,3], uint8
mask [H,W]) into a network input:

  1. resize to the square `spec.image_size`:
     * 'square' (HSNet): image bilinear with PIL (what torchvision's `Resize` does on a PIL
       image; `spec.interpolation='nearest'` uses PIL's nearest instead, as DiffewS's training
       loader does), mask nearest with PyTorch's `F.interpolate(mode='nearest')` index rule
       (source index floor(dst * in / out)), so masks keep only their original values;
     * 'pad': keep the aspect ratio (longer side = image_size), place the resized image at the
       top-left corner and pad bottom / right: padded mask pixels are 255 (ignore), padded
       image pixels are 0 after normalisation;
  2. optional augmentation (`spec.augment`, training only), drawn from the generator passed in
     (the pipeline derives it from (seed, step, slot), so it is deterministic): horizontal
     flip with probability 0.5, then a zoom by a factor uniform in `AUGMENT_SCALE` (image
     bilinear, mask nearest) and a random crop back to image_size x image_size;
  3. normalisation: 'imagenet' ((x / 255 - mean) / std, mean (0.485, 0.456, 0.406), std
     (0.229, 0.224, 0.225)) or 'minus_one_one' (x / 127.5 - 1); extra views may also use
     'clip', 'sam' and 'none' (see `normalize` and `fssjax.data.views`).

`support_is_empty(mask, check_size)` is the pipeline's check for a support mask that vanishes
at the model's feature size (see its docstring).

For evaluation at the original resolution the query's original mask is kept with
`pad_original_mask(mask, max_size)`: padded with 255 to [max_size, max_size] (top-left
placement), together with its size [h, w]. `DEFAULT_MAX_ORIGINAL_SIZE` = 1024 covers every
image of COCO (longest side 640), PASCAL VOC (500), FSS-1000 (224) and LVIS (COCO images);
larger images raise a DataError that names `data.max_original_size`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from fssjax.data.base import IGNORE, DataError

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)
# OpenAI CLIP (openai/CLIP clip/clip.py `_transform`), on x / 255.
CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)
# Segment Anything (facebookresearch/segment-anything, Sam.pixel_mean / pixel_std), on 0..255.
SAM_MEAN = np.asarray((123.675, 116.28, 103.53), np.float32)
SAM_STD = np.asarray((58.395, 57.12, 57.375), np.float32)
NORMALIZATIONS = ("imagenet", "minus_one_one", "clip", "sam", "none")
RESIZE_MODES = ("square", "pad")
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
AUGMENT_SCALE = (1.0, 1.25)
DEFAULT_MAX_ORIGINAL_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class TransformSpec:
  """How records become network inputs.

  Attributes:
    image_size: side of the square network input.
    resize: 'square' or 'pad'.
    normalization: 'imagenet' or 'minus_one_one'.
    augment: random flip + zoom/crop (training only).
    interpolation: image resampling, 'bilinear' or 'nearest' (PIL's filters).
    max_original_size: side of the canvas that keeps original-resolution query masks.
  """

  image_size: int
  resize: str = "square"
  normalization: str = "imagenet"
  augment: bool = False
  max_original_size: int = DEFAULT_MAX_ORIGINAL_SIZE
  interpolation: str = "bilinear"

  def __post_init__(self):
    if int(self.image_size) < 1:
      raise ValueError(f"data.image_size must be >= 1, got {self.image_size}")
    if self.resize not in RESIZE_MODES:
      raise ValueError(f"data.resize={self.resize!r}; expected one of {list(RESIZE_MODES)}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; expected one of "
                       f"{list(NORMALIZATIONS)}")
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"image interpolation={self.interpolation!r}; expected one of "
                       f"{list(INTERPOLATIONS)}")
    if int(self.max_original_size) < 1:
      raise ValueError(f"data.max_original_size must be >= 1, got {self.max_original_size}")


def _lut(normalization: str) -> np.ndarray:
  """Flat float32 [3 * 256] table: entry c * 256 + v is the normalised value v of channel c."""
  v = np.arange(256, dtype=np.float32)[:, None]
  if normalization == "imagenet":
    table = (v * np.float32(1 / 255) - IMAGENET_MEAN) / IMAGENET_STD
  elif normalization == "clip":
    table = (v * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
  elif normalization == "sam":
    table = (v - SAM_MEAN) / SAM_STD
  elif normalization == "none":
    table = np.broadcast_to(v, (256, 3))
  else:
    table = np.broadcast_to(v * np.float32(1 / 127.5) - np.float32(1.0), (256, 3))
  return np.ascontiguousarray(table.T).reshape(-1)


_LUTS = {n: _lut(n) for n in NORMALIZATIONS}
_CHANNEL_OFFSETS = np.arange(3, dtype=np.intp) * 256


def normalize(image: np.ndarray, normalization: str, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3] per `normalization` (one of NORMALIZATIONS).

  'imagenet': (x / 255 - mean) / std (ImageNet statistics); 'minus_one_one': x / 127.5 - 1;
  'clip': (x / 255 - mean) / std with OpenAI CLIP's statistics; 'sam': (x - mean) / std with
  Segment Anything's 0..255 statistics; 'none': x as float32 (0..255). Computed in float32,
  through a 256-entry table per channel. `out` (float32, same shape) receives the result.
  """
  if normalization not in _LUTS:
    raise ValueError(f"normalization={normalization!r}; expected one of {list(NORMALIZATIONS)}")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.shape[-1:] != (3,):
    raise ValueError(f"normalize expects uint8 [..., 3], got {image.dtype} {list(image.shape)}")
  return np.take(_LUTS[normalization], image + _CHANNEL_OFFSETS, out=out)


def resize_image(image: np.ndarray, height: int, width: int,
                 interpolation: str = "bilinear") -> np.ndarray:
  """Resize of a uint8 [H,W,C] image with PIL: 'bilinear' (antialiased when shrinking) or
  'nearest'."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  INTERPOLATIONS[interpolation]))


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch 'nearest' source indices: min(floor(dst * in / out), in - 1)."""
  scale = in_size / out_size
  return np.minimum(np.floor(np.arange(out_size) * scale).astype(np.int64), in_size - 1)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest resize of [H,W,...] with PyTorch's index rule (keeps only existing values)."""
  if mask.shape[:2] == (height, width):
    return mask
  rows = nearest_indices(mask.shape[0], height)
  cols = nearest_indices(mask.shape[1], width)
  return np.take(np.take(mask, rows, axis=0), cols, axis=1)


def _check_record(image: np.ndarray, mask: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise DataError(f"expected a uint8 [H,W,3] image, got {image.dtype} {list(image.shape)}")
  if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
    raise DataError(f"expected a uint8 mask of the image size {list(image.shape[:2])}, got "
                    f"{mask.dtype} {list(mask.shape)}")


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int, mode: str,
                interpolation: str = "bilinear") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Resizes an (image, mask) pair to [size, size].

  Returns:
    image uint8 [size,size,3], mask uint8 [size,size], valid bool [size,size] (False on
    padding; all True in 'square' mode).
  """
  _check_record(image, mask)
  if mode == "square":
    return (resize_image(image, size, size, interpolation), resize_nearest(mask, size, size),
            np.ones((size, size), bool))
  if mode != "pad":
    raise ValueError(f"data.resize={mode!r}; expected one of {list(RESIZE_MODES)}")
  h, w = image.shape[:2]
  scale = size / max(h, w)
  nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
  out_image = np.zeros((size, size, 3), np.uint8)
  out_mask = np.full((size, size), IGNORE, np.uint8)
  valid = np.zeros((size, size), bool)
  out_image[:nh, :nw] = resize_image(image, nh, nw, interpolation)
  out_mask[:nh, :nw] = resize_nearest(mask, nh, nw)
  valid[:nh, :nw] = True
  return out_image, out_mask, valid


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One draw of `augment`: flip, then zoom the [S, S] canvas to [zh, zw] and crop at (y0, x0)."""

  flip: bool
  zh: int
  zw: int
  y0: int
  x0: int

  def __iter__(self):
    return iter((self.flip, self.zh, self.zw, self.y0, self.x0))


def augment_params(rng: np.random.Generator, size_h: int, size_w: int) -> AugmentParams:
  """Draws the parameters of `augment` (flip with p 0.5, zoom U(AUGMENT_SCALE), crop offset)."""
  flip = bool(rng.random() < 0.5)
  scale = float(rng.uniform(*AUGMENT_SCALE))
  zh, zw = max(size_h, round(size_h * scale)), max(size_w, round(size_w * scale))
  y0 = int(rng.integers(zh - size_h + 1))
  x0 = int(rng.integers(zw - size_w + 1))
  return AugmentParams(flip, zh, zw, y0, x0)


def augment(image: np.ndarray, mask: np.ndarray, valid: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random horizontal flip, then zoom by U(AUGMENT_SCALE) and a random crop to the input size.

  Args:
    image: uint8 [S,S,3]; mask: uint8 [S,S]; valid: bool [S,S] (False on padding).
    rng: the generator of this sample (deterministic per (seed, step, slot)).

  Returns:
    The transformed (image, mask, valid), same shapes.
  """
  return _apply_augment(image, mask, valid, augment_params(rng, *mask.shape))


def _apply_augment(image: np.ndarray, mask: np.ndarray, valid: np.ndarray,
                   params: AugmentParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  size_h, size_w = mask.shape
  flip, zh, zw, y0, x0 = params
  if flip:
    image, mask, valid = image[:, ::-1], mask[:, ::-1], valid[:, ::-1]
  if (zh, zw) != (size_h, size_w):
    image = resize_image(np.ascontiguousarray(image), zh, zw)
    mask = resize_nearest(mask, zh, zw)
    valid = resize_nearest(valid, zh, zw)
  sl = (slice(y0, y0 + size_h), slice(x0, x0 + size_w))
  return (np.ascontiguousarray(image[sl]), np.ascontiguousarray(mask[sl]),
          np.ascontiguousarray(valid[sl]))


def prepare(image: np.ndarray, mask: np.ndarray, spec: TransformSpec,
            rng: np.random.Generator | None = None,
            out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Source record -> network input (see `prepare_with_params`, which also returns the
  augmentation drawn)."""
  out, mask, _ = prepare_with_params(image, mask, spec, rng, out)
  return out, mask


def prepare_with_params(image: np.ndarray, mask: np.ndarray, spec: TransformSpec,
                        rng: np.random.Generator | None = None,
                        out: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, AugmentParams | None]:
  """Source record -> network input.

  Args:
    image: uint8 [H,W,3]; mask: uint8 [H,W] (0 / 1 / 255).
    spec: the transform settings.
    rng: augmentation generator; used only when `spec.augment` (and then required).
    out: optional float32 [S,S,3] array that receives the image (a batch slot).

  Returns:
    image float32 [S,S,3] normalised (0 on padding), mask uint8 [S,S] (255 on padding), and
    the `AugmentParams` drawn (None without augmentation).
  """
  size = int(spec.image_size)
  image, mask, valid = resize_pair(np.asarray(image), np.asarray(mask), size, spec.resize,
                                   spec.interpolation)
  params = None
  if spec.augment:
    if rng is None:
      raise ValueError("augmentation needs a random generator")
    size_h, size_w = mask.shape
    params = augment_params(rng, size_h, size_w)
    image, mask, valid = _apply_augment(image, mask, valid, params)
  out = normalize(image, spec.normalization, out=out)
  if not valid.all():
    out[~valid] = 0.0
    mask = np.where(valid, mask, np.uint8(IGNORE)).astype(np.uint8)
  return out, mask, params


def pad_original_mask(mask: np.ndarray, max_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads an original-resolution mask with 255 to [max_size, max_size] (top-left placement).

  Returns:
    (mask uint8 [max_size, max_size], size int32 [2] = (h, w)).

  Raises:
    DataError: when the mask is larger than max_size on either side.
  """
  h, w = mask.shape
  if h > max_size or w > max_size:
    raise DataError(f"query of size {h}x{w} does not fit data.max_original_size={max_size}; "
                    f"raise data.max_original_size to at least {max(h, w)}")
  out = np.full((max_size, max_size), IGNORE, np.uint8)
  out[:h, :w] = mask
  return out, np.asarray((h, w), np.int32)


def support_is_empty(mask: np.ndarray, check_size: int) -> bool:
  """Whether a support mask has no foreground left at `check_size` x `check_size`.

  The rule is HSNet's mask resize (juhongm999/hsnet model/hsnet.py `mask_feature`:
  `F.interpolate(mask, feature_size, mode='bilinear', align_corners=True)`; the same
  `fssjax.nn.ops.interpolation_matrix` as the methods): the foreground (value 1; 0 and 255 are
  background) is resized bilinearly with aligned corners and the mask is empty when no value
  is > 0. A 2x2 object in a 64x64 mask is empty at 16x16 when it falls between the sampled
  rows or columns. `check_size` <= 0: no check (False).
  """
  check_size = int(check_size)
  if check_size <= 0:
    return False
  from fssjax.nn.ops import interpolation_matrix  # pylint: disable=import-outside-toplevel
  fg = (np.asarray(mask) == 1).astype(np.float32)
  if not fg.any():
    return True
  wh = interpolation_matrix(fg.shape[0], check_size, True)
  ww = interpolation_matrix(fg.shape[1], check_size, True)
  return not bool(((wh @ fg @ ww.T) > 0).any())
