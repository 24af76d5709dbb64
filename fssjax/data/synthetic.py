"""The embedded benchmark: a deterministic synthetic few-shot segmentation data set in COCO format.

No real data set can be downloaded on the machines this project runs on, so the default data set
is generated. It is written to disk in the COCO *instances* layout, so the very code path that
reads real COCO (`fssjax.data.coco`, pycocotools) reads it too:

  DIR/
    images/train/000000.png ...       RGB images (PNG, or JPEG with --format jpg)
    images/val/000000.png ...
    annotations/instances_train.json  COCO instances: images, annotations, categories
    annotations/instances_val.json
    annotations/scenes_{train,val}.json   exact description of every image (objects,
                                      attributes, relations; `fssjax.data.synthetic_truth`)
    annotations_detectron2/{train,val}/000000.png   label maps (uint8: category index = id - 1,
                                      255 = no category), detectron2's semantic layout
    descriptions.json                 the exact description of every category (text + fields)
    STAMP.json                        generator version, seed, sizes, counts; written LAST

Categories: 80 = 10 shapes x 8 textures, ids 1..80 (0-based class index = id - 1). Each
category has a palette of three colours drawn from one shared set of twelve; every colour is in
the palette of many categories, so no category can be told by colour alone: shape and texture
(and, loosely, size) tell them apart. The id order is chosen so that the interleaved COCO-20i
folds (test classes `f + 4v`) each hold every shape twice and every texture two to four times.

Images: a textured, muted background; one to three categories with one to three instances
each, at random position, scale (18-50% of the image side, by category size class), rotation
and colour (from the category's palette); distractor shapes that belong to no category (blobs,
bars, elongated ellipses with solid or speckled fill). Later shapes occlude earlier ones; each
annotation covers the visible part of its instance only; instances that would be mostly hidden
or tiny are not drawn at all (so every painted pixel of a category is annotated).
Annotations are compressed RLE (`pycocotools.mask.encode`, counts as str) with iscrowd=0.
The label map of an image is the union of its annotations (distractors and background: 255);
`render_truth` gives every drawn shape's truth (class, painted colours, whole and visible mask,
depth), from which `fssjax.data.synthetic_truth` writes the label maps and the per-image scene
descriptions in the same pass (sets made before lack them: `synthetic_truth.ensure_dense`).

Determinism: image `i` of split `s` is drawn from `np.random.default_rng([seed, s, i])`
(train s=0, val s=1), so the same seed gives byte-identical annotation JSONs (and images) for
any number of worker processes, for a given numpy version. Masks apply only +, -, *, / and
sqrt to arrays (no vectorised sin/cos/atan, whose SIMD code differs between CPUs), so the
annotations should also match across machines; image pixels may differ by rounding there.
Bump VERSION whenever the output changes: the cache key and STAMP check rely on it. The first
category of image `i` is `perm[i % 80]` for a fixed per-split permutation, so every category
appears in at least `n // 80` images of a split.

Use `ensure()` to get a cached copy (generated on first use, rebuilt when its STAMP does not
match), or the CLI. Generation logs its progress (images done, rate, ETA) through absl logging
every `PROGRESS_SECONDS` and at the end of each split. A run's `data.root` is checked by
`check_data_root` first: only the default cache, an existing set, or an existing empty / cache
directory is accepted, so a mistyped root is an error, never a silent second copy.

  python -m fssjax.data.synthetic --out DIR [--train 4000 --val 1000 --size 128 --seed 0]
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from absl import logging as absl_logging

from fssjax import utils
from fssjax.data.base import DataError

log = logging.getLogger(__name__)

VERSION = 1
GENERATOR = "fssjax.data.synthetic"
SPLITS = {"train": 0, "val": 1}
DEFAULTS = dict(train=4000, val=1000, size=128, seed=0, image_format="png")
IMAGE_FORMATS = ("png", "jpg")

# The shared colour set: every category palette draws three of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "lime": (150, 225, 40),
    "green": (25, 135, 50),
    "cyan": (40, 205, 225),
    "blue": (35, 70, 215),
    "purple": (120, 45, 175),
    "magenta": (225, 40, 185),
    "brown": (120, 70, 30),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}

SHAPES: dict[str, str] = {
    "circle": "a round disc",
    "square": "a square with straight sides and sharp corners",
    "triangle": "an equilateral triangle",
    "star": "a five-pointed star",
    "cross": "a plus-shaped cross with four arms of equal length",
    "ring": "an annulus: a disc with a round hole in the middle (the hole shows what lies behind)",
    "crescent": "a crescent moon: a disc with a circular bite taken out of one side",
    "heart": "a heart with two rounded lobes and one point",
    "arrow": "an arrow: a straight shaft ending in a triangular head",
    "lshape": ("an L shape: a long bar with a slightly shorter bar joined at one end at a "
               "right angle"),
}

TEXTURES: dict[str, tuple[str, str]] = {
    # name: (adjective for the category name, description)
    "solid": ("solid", "filled with a single flat colour"),
    "stripes": ("striped", "painted with parallel straight stripes of two alternating colours"),
    "checker": ("checkered", "painted with a checkerboard of squares in two alternating colours"),
    "dots": ("dotted", "covered with a regular grid of round dots of a second colour"),
    "grid": ("gridded", "covered with a grid of thin crossing lines of a second colour"),
    "zigzag": ("zigzag", "painted with parallel zigzag bands of two alternating colours"),
    "concentric": ("bullseye", "painted with concentric circles of two alternating colours"),
    "gradient": ("gradient", "shaded with a smooth linear gradient from one colour to another"),
}

# Typical size: the diameter of the shape's bounding circle as a fraction of the image side.
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (0.18, 0.30),
    "medium": (0.25, 0.40),
    "large": (0.32, 0.50),
}

NUM_CLASSES = len(SHAPES) * len(TEXTURES)
PALETTE_SIZE = 3
_PALETTE_SEED = 20240601  # fixed: the categories belong to the generator version, not the data seed
_TEXTURE_PERIOD = (0.055, 0.075)  # texture period, fraction of the image side
_MIN_VISIBLE_FRACTION = 0.3  # of the unoccluded in-image area
_MIN_VISIBLE_AREA = 0.003  # of the image area
_SPLIT_PERM_OFFSET = 1000  # rng key of the per-split category permutation
PROGRESS_SECONDS = 10.0  # generation logs progress (rate, ETA) at most this often, and at the end


@dataclasses.dataclass(frozen=True)
class Category:
  """One category of the synthetic benchmark.

  Attributes:
    id: COCO category id, 1..80 (0-based class index = id - 1).
    name: e.g. "striped star".
    shape, texture: keys of SHAPES and TEXTURES.
    colours: the palette, names in COLOURS.
    size: a key of SIZE_CLASSES.
  """

  id: int
  name: str
  shape: str
  texture: str
  colours: tuple[str, ...]
  size: str

  @property
  def size_range(self) -> tuple[float, float]:
    return SIZE_CLASSES[self.size]


@functools.lru_cache(maxsize=None)
def categories() -> tuple[Category, ...]:
  """The 80 categories, sorted by id.

  0-based index c = f + 4v (f = c % 4, v = c // 4): shape = v % 10, texture =
  (shape + 2f + v // 10) % 8. Every (shape, texture) pair occurs once, and each interleaved
  COCO-20i fold (all c with c % 4 == f) holds every shape twice and every texture 2-4 times.
  """
  shape_names, texture_names = list(SHAPES), list(TEXTURES)
  colour_names = list(COLOURS)
  rng = np.random.default_rng(_PALETTE_SEED)
  use = np.zeros(len(colour_names), np.int64)
  out = []
  for c in range(NUM_CLASSES):
    f, v = c % 4, c // 4
    s = v % len(shape_names)
    t = (s + 2 * f + v // len(shape_names)) % len(texture_names)
    # Balanced palettes: pick the least used colours, ties broken at random.
    order = np.lexsort((rng.random(len(colour_names)), use))
    chosen = sorted(int(i) for i in order[:PALETTE_SIZE])
    use[chosen] += 1
    shape, texture = shape_names[s], texture_names[t]
    shape_word = "L-shape" if shape == "lshape" else shape
    size = list(SIZE_CLASSES)[(s + t) % len(SIZE_CLASSES)]
    out.append(Category(id=c + 1, name=f"{TEXTURES[texture][0]} {shape_word}", shape=shape,
                        texture=texture, colours=tuple(colour_names[i] for i in chosen),
                        size=size))
  names = [c.name for c in out]
  assert len(set(names)) == len(names), "category names must be unique"
  assert sorted((c.shape, c.texture) for c in out) == sorted(
      (a, b) for a in shape_names for b in texture_names)
  return tuple(out)


def describe(cat: Category) -> dict[str, Any]:
  """The exact description of one category: a paragraph plus structured fields."""
  lo, hi = cat.size_range
  colours = list(cat.colours)
  if cat.texture == "solid":
    colour_text = f"Its colour is one of {', '.join(colours[:-1])} or {colours[-1]}."
  else:
    colour_text = (f"It uses two different colours from {', '.join(colours[:-1])} and "
                   f"{colours[-1]}.")
  shape_word = "L-shape" if cat.shape == "lshape" else cat.shape
  text = (f"A {cat.name} is {SHAPES[cat.shape]}, {TEXTURES[cat.texture][1]}. {colour_text} "
          f"It is {cat.size}: about {round(lo * 100)}-{round(hi * 100)}% of the image side "
          f"across. It appears at any rotation and position, possibly cut by the image border "
          f"or partly hidden behind other objects. Its texture, not its colour, tells it apart "
          f"from other {shape_word}s, and its outline tells it apart from other "
          f"{TEXTURES[cat.texture][0]} objects.")
  return {
      "id": cat.id,
      "name": cat.name,
      "shape": cat.shape,
      "shape_description": SHAPES[cat.shape],
      "texture": cat.texture,
      "texture_description": TEXTURES[cat.texture][1],
      "colours": colours,
      "colours_rgb": {c: list(COLOURS[c]) for c in colours},
      "size": cat.size,
      "size_fraction": [lo, hi],
      "description": text,
  }


def descriptions() -> dict[str, Any]:
  """The content of descriptions.json."""
  return {
      "generator": GENERATOR,
      "version": VERSION,
      "size_fraction_means": "diameter of the shape's bounding circle / image side",
      "colours": {k: list(v) for k, v in COLOURS.items()},
      "background": ("Muted, low-saturation colour with soft blotches and, in about half of "
                     "the images, faint wide stripes."),
      "distractors": ("Shapes that belong to no category: irregular blobs, long thin bars and "
                      "elongated ellipses, with a solid or speckled fill in the shared colours."),
      "categories": [describe(c) for c in categories()],
  }


# ----------------------------------------------------------------------------------------------
# Paths.


def image_dir(root: str, split: str) -> str:
  """Directory of the images of `split` ('train' or 'val'); COCO file_names are relative to it."""
  _check_split(split)
  return os.path.join(root, "images", split)


def annotation_file(root: str, split: str) -> str:
  """The COCO instances JSON of `split` ('train' or 'val')."""
  _check_split(split)
  return os.path.join(root, "annotations", f"instances_{split}.json")


def descriptions_file(root: str) -> str:
  return os.path.join(root, "descriptions.json")


def stamp_file(root: str) -> str:
  return os.path.join(root, "STAMP.json")


def load_descriptions(root: str) -> dict[int, dict[str, Any]]:
  """Reads descriptions.json; returns {category id: description dict}."""
  path = descriptions_file(root)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return {int(d["id"]): d for d in data["categories"]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: expected a synthetic descriptions.json with a 'categories' list "
                    f"of dicts with 'id' ({type(e).__name__}: {e})") from e


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# The per-image plan and rendering.


@functools.lru_cache(maxsize=16)
def _split_permutation(seed: int, split_id: int) -> np.ndarray:
  return np.random.default_rng([seed, _SPLIT_PERM_OFFSET + split_id]).permutation(NUM_CLASSES)


def _plan_categories(rng: np.random.Generator, seed: int, split_id: int,
                     index: int) -> list[int]:
  """Draws the 0-based classes of one image (the first draws of the image's rng)."""
  first = int(_split_permutation(seed, split_id)[index % NUM_CLASSES])
  n = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.20]))
  others = [c for c in range(NUM_CLASSES) if c != first]
  rest = rng.choice(others, size=n - 1, replace=False) if n > 1 else []
  return [first] + [int(c) for c in rest]


def image_categories(seed: int, split: str, index: int) -> list[int]:
  """The 0-based classes present in image `index` of `split`, without rendering it.

  The rendered image holds exactly these classes (each with at least one annotation).
  """
  _check_split(split)
  split_id = SPLITS[split]
  rng = np.random.default_rng([seed, split_id, index])
  return _plan_categories(rng, seed, split_id, index)


@dataclasses.dataclass
class _Item:
  """One shape to draw. `cls` is the 0-based class, or -1 for a distractor."""
  cls: int
  shape: str
  texture: str
  cx: float
  cy: float
  r: float
  angle: float
  colour_a: np.ndarray
  colour_b: np.ndarray
  period: float
  phase: tuple[float, float]
  extra: Any = None  # shape parameters of distractors
  colour_names: tuple[str, str] = ("", "")  # names in COLOURS of colour_a and colour_b


_STAR = np.array([(math.cos(-math.pi / 2 + k * math.pi / 5) * (1.05 if k % 2 == 0 else 0.45),
                   math.sin(-math.pi / 2 + k * math.pi / 5) * (1.05 if k % 2 == 0 else 0.45))
                  for k in range(10)])
_ARROW = np.array([(-1.0, -0.22), (0.15, -0.22), (0.15, -0.62), (1.0, 0.0), (0.15, 0.62),
                   (0.15, 0.22), (-1.0, 0.22)])
_LSHAPE = np.array([(-0.7, -0.85), (-0.2, -0.85), (-0.2, 0.35), (0.8, 0.35), (0.8, 0.85),
                    (-0.7, 0.85)])
_TRIANGLE = np.array([(math.cos(-math.pi / 2 + k * 2 * math.pi / 3) * 1.1,
                       math.sin(-math.pi / 2 + k * 2 * math.pi / 3) * 1.1 + 0.1)
                      for k in range(3)])


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
  """Even-odd point-in-polygon test, vectorised over points. poly: [N, 2] vertices (u, v)."""
  inside = np.zeros(u.shape, bool)
  n = len(poly)
  for k in range(n):
    u0, v0 = poly[k]
    u1, v1 = poly[(k + 1) % n]
    if v0 == v1:
      continue
    crosses = (v0 > v) != (v1 > v)
    u_at = u0 + (v - v0) * (u1 - u0) / (v1 - v0)
    inside ^= crosses & (u < u_at)
  return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, extra: Any = None) -> np.ndarray:
  """Membership of local unit coordinates (u, v) (radius 1 ~ the bounding circle)."""
  rho2 = u * u + v * v
  if shape == "circle":
    return rho2 <= 1.0
  if shape == "square":
    return (np.abs(u) <= 0.78) & (np.abs(v) <= 0.78)
  if shape == "triangle":
    return _in_polygon(u, v, _TRIANGLE)
  if shape == "star":
    return _in_polygon(u, v, _STAR)
  if shape == "cross":
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
  if shape == "ring":
    return (rho2 <= 1.0) & (rho2 >= 0.5 ** 2)
  if shape == "crescent":
    return (rho2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.78 ** 2)
  if shape == "heart":
    x, y = u * 1.25, -(v * 1.25) + 0.2
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
  if shape == "arrow":
    return _in_polygon(u, v, _ARROW)
  if shape == "lshape":
    return _in_polygon(u, v, _LSHAPE)
  # Distractors.
  if shape == "ellipse":
    return (u * u) + (v * extra) ** 2 <= 1.0
  if shape == "bar":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0 / extra)
  if shape == "blob":
    # A star-convex blob with a smooth random radius; extra = Fourier coefficients.
    # cos(k theta + p) = Re(z^k e^{ip}) with z = (u + iv) / rho: only +, *, / and sqrt, which
    # are correctly rounded everywhere, so the mask is the same bits on every CPU.
    rho = np.sqrt(rho2)
    z = (u + 1j * v) / np.maximum(rho, 1e-6)
    radius = 0.75
    zk = z * z
    for a, (c, s) in extra:
      radius = radius + a * (zk.real * c - zk.imag * s)
      zk = zk * z
    return rho <= radius
  raise ValueError(f"unknown shape {shape!r}")


def _texture_weight(texture: str, pu: np.ndarray, pv: np.ndarray, u: np.ndarray,
                    period: float, phase: tuple[float, float],
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Weight of the second colour in [0, 1]. (pu, pv): rotated pixel offsets; u: unit coords."""
  a = pu / period + phase[0]
  b = pv / period + phase[1]
  if texture == "solid":
    return np.zeros_like(pu)
  if texture == "stripes":
    return (a % 1.0 < 0.5).astype(np.float32)
  if texture == "checker":
    return ((np.floor(a * 1.25) + np.floor(b * 1.25)) % 2).astype(np.float32)
  if texture == "dots":
    du, dv = a % 1.0 - 0.5, b % 1.0 - 0.5
    return (du * du + dv * dv < 0.33 ** 2).astype(np.float32)
  if texture == "grid":
    return ((a % 1.0 < 0.28) | (b % 1.0 < 0.28)).astype(np.float32)
  if texture == "zigzag":
    tri = np.abs((b * 0.5) % 1.0 - 0.5) * 2.0  # triangle wave in [0, 1] along v
    return ((a + 0.9 * tri) % 1.0 < 0.5).astype(np.float32)
  if texture == "concentric":
    return ((np.sqrt(pu * pu + pv * pv) / period + phase[0]) % 1.0 < 0.5).astype(np.float32)
  if texture == "gradient":
    return np.clip((u + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)
  if texture == "speckle":
    blocks = rng.random((pu.shape[0] // 2 + 1, pu.shape[1] // 2 + 1)) < 0.5
    return np.repeat(np.repeat(blocks, 2, 0), 2, 1)[:pu.shape[0], :pu.shape[1]].astype(np.float32)
  raise ValueError(f"unknown texture {texture!r}")


_EXTENT = 1.25  # every shape lies within this many radii of its centre


def _crop(item: _Item, size: int) -> tuple[slice, slice] | None:
  """The pixel window that can hold `item` (None if it lies outside the image)."""
  h = _EXTENT * item.r
  y0, y1 = max(0, int(item.cy - h)), min(size, int(math.ceil(item.cy + h)) + 1)
  x0, x1 = max(0, int(item.cx - h)), min(size, int(math.ceil(item.cx + h)) + 1)
  if y0 >= y1 or x0 >= x1:
    return None
  return slice(y0, y1), slice(x0, x1)


def _local_coords(item: _Item, window: tuple[slice, slice]):
  """Rotated pixel offsets (pu, pv) and unit coordinates (u, v) of the window's pixel centres."""
  ys = np.arange(window[0].start, window[0].stop, dtype=np.float64) + 0.5 - item.cy
  xs = np.arange(window[1].start, window[1].stop, dtype=np.float64) + 0.5 - item.cx
  c, s = math.cos(item.angle), math.sin(item.angle)
  pu = c * xs[None, :] + s * ys[:, None]
  pv = -s * xs[None, :] + c * ys[:, None]
  return pu, pv, pu / item.r, pv / item.r


def _item_mask(item: _Item, size: int) -> np.ndarray:
  """bool [size, size]: the pixels of `item` before occlusion."""
  mask = np.zeros((size, size), bool)
  window = _crop(item, size)
  if window is not None:
    _, _, u, v = _local_coords(item, window)
    mask[window] = _shape_mask(item.shape, u, v, item.extra)
  return mask


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
  """Bilinearly upsampled uniform noise in [-1, 1]: [size, size, channels]."""
  g = rng.uniform(-1.0, 1.0, (channels, grid, grid))
  pos = np.linspace(0.0, grid - 1.0, size)
  lo = np.minimum(np.floor(pos).astype(int), grid - 2)
  t = pos - lo
  interp = np.zeros((size, grid))
  interp[np.arange(size), lo] = 1.0 - t
  interp[np.arange(size), lo + 1] = t
  return np.stack([interp @ g[c] @ interp.T for c in range(channels)], axis=-1)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
  """A muted, textured background: float32 [size, size, 3] in 0..255."""
  hue = rng.random()
  sat = rng.uniform(0.05, 0.25)
  val = rng.uniform(0.35, 0.7)
  base = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0
  img = base + 22.0 * _smooth_noise(rng, size, int(rng.integers(3, 7)), 1)
  img = img + 6.0 * _smooth_noise(rng, size, 5, 3)
  if rng.random() < 0.5:
    ang = rng.uniform(0, math.pi)
    period = size * rng.uniform(0.12, 0.25)
    wave = np.sin((math.cos(ang) * xx + math.sin(ang) * yy) / period * 2 * math.pi)
    img = img + rng.uniform(5.0, 10.0) * wave[..., None]
  return img.astype(np.float32)


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: float = 14.0) -> np.ndarray:
  return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _make_instance(rng: np.random.Generator, cls: int, size: int, bg_mean: np.ndarray) -> _Item:
  cat = categories()[cls]
  lo, hi = cat.size_range
  diameter = rng.uniform(lo, hi) * size
  palette = [np.asarray(COLOURS[c], np.float32) for c in cat.colours]
  order = rng.permutation(len(palette))
  # The main colour must stand out from the background: take the first in random order that
  # is far enough from the background's mean colour (a palette always has one).
  dist = [float(np.linalg.norm(palette[i] - bg_mean)) for i in order]
  main = next((i for i, d in zip(order, dist) if d >= 90.0), order[int(np.argmax(dist))])
  second = next(i for i in order if i != main)
  return _Item(
      cls=cls, shape=cat.shape, texture=cat.texture,
      cx=rng.uniform(0.1, 0.9) * size, cy=rng.uniform(0.1, 0.9) * size,
      r=diameter / 2, angle=rng.uniform(0, 2 * math.pi),
      colour_a=_jitter(rng, palette[main]), colour_b=_jitter(rng, palette[second]),
      period=size * rng.uniform(*_TEXTURE_PERIOD), phase=(rng.random(), rng.random()),
      colour_names=(cat.colours[int(main)], cat.colours[int(second)]))


def _make_distractor(rng: np.random.Generator, size: int) -> _Item:
  kind = ("blob", "bar", "ellipse")[int(rng.integers(3))]
  if kind == "blob":
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
    extra = [(rng.uniform(0.05, 0.15), (math.cos(p), math.sin(p))) for p in phases]
    diameter = rng.uniform(0.12, 0.32)
  elif kind == "bar":
    extra = rng.uniform(4.0, 8.0)
    diameter = rng.uniform(0.3, 0.6)
  else:
    extra = rng.uniform(2.0, 3.0)
    diameter = rng.uniform(0.15, 0.4)
  names = list(COLOURS)
  a, b = rng.choice(len(names), 2, replace=False)
  return _Item(
      cls=-1, shape=kind, texture=("solid", "speckle")[int(rng.integers(2))],
      cx=rng.uniform(0, 1) * size, cy=rng.uniform(0, 1) * size, r=diameter * size / 2,
      angle=rng.uniform(0, 2 * math.pi),
      colour_a=_jitter(rng, COLOURS[names[a]]), colour_b=_jitter(rng, COLOURS[names[b]]),
      period=1.0, phase=(0.0, 0.0), extra=extra, colour_names=(names[a], names[b]))


def _layout(rng: np.random.Generator, classes: list[int], size: int, bg_mean: np.ndarray):
  """Draws a random layout; returns (items in drawing order, their masks, visible masks)."""
  n_cls = len(classes)
  counts = rng.integers(1, 4 if n_cls == 1 else 3, size=n_cls)
  while counts.sum() > 5:
    counts[int(np.argmax(counts))] -= 1
  items = [_make_instance(rng, c, size, bg_mean) for c, k in zip(classes, counts)
           for _ in range(int(k))]
  items += [_make_distractor(rng, size) for _ in range(int(rng.integers(0, 4)))]
  items = [items[i] for i in rng.permutation(len(items))]
  return items, [_item_mask(it, size) for it in items]


def _visible(masks: list[np.ndarray], keep: list[bool]) -> list[np.ndarray]:
  """Visible part of each kept mask: later kept masks occlude earlier ones."""
  covered = np.zeros_like(masks[0])
  out = [None] * len(masks)
  for i in range(len(masks) - 1, -1, -1):
    if not keep[i]:
      continue
    out[i] = masks[i] & ~covered
    covered |= masks[i]
  return out


@dataclasses.dataclass(frozen=True)
class DrawnShape:
  """The generator's ground truth of one drawn shape (`render_truth`).

  Attributes:
    cls: 0-based class, or -1 for a distractor (no category).
    shape: a key of SHAPES (or 'blob' / 'bar' / 'ellipse' for distractors).
    texture: a key of TEXTURES (or 'solid' / 'speckle' for distractors).
    colours: the drawn colours' names in COLOURS, main colour first; one name for the solid
      texture (its second colour is never painted), two otherwise.
    mask: bool [size, size], the whole shape before occlusion (cut by the image border).
    visible: bool [size, size], the part not covered by shapes drawn later.
    depth: drawing order among the image's drawn shapes (0 = drawn first, at the back).
  """

  cls: int
  shape: str
  texture: str
  colours: tuple[str, ...]
  mask: np.ndarray
  visible: np.ndarray
  depth: int


def render_truth(seed: int, split: str, index: int,
                 size: int = 128) -> tuple[np.ndarray, list[DrawnShape]]:
  """Renders image `index` of `split` with the generator's full ground truth.

  The same image as `render_image` (same random draws, same pixels).

  Returns:
    image: uint8 [size, size, 3] RGB.
    shapes: a `DrawnShape` per drawn shape (category instances and distractors), in drawing
      order; the instances of `render_image` are the entries with cls >= 0, in the same order.
  """
  image, items, masks, keep, vis = _render(seed, split, index, size)
  shapes = []
  for i, (it, m, k) in enumerate(zip(items, masks, keep)):
    if k:
      colours = it.colour_names[:1] if it.texture == "solid" else tuple(it.colour_names)
      shapes.append(DrawnShape(cls=int(it.cls), shape=it.shape, texture=it.texture,
                               colours=tuple(colours), mask=m, visible=vis[i],
                               depth=len(shapes)))
  return image, shapes


def render_image(seed: int, split: str, index: int, size: int = 128,
                 with_shapes: bool = False):
  """Renders image `index` of `split`.

  Args:
    seed, split, index: identify the image (its rng is default_rng([seed, split id, index])).
    size: image side in pixels.
    with_shapes: also return every drawn shape (instances and distractors) before occlusion.

  Returns:
    image: uint8 [size, size, 3] RGB.
    instances: list of (0-based class, bool [size, size] visible mask), in drawing order
      (a later instance may occlude an earlier one; masks never overlap).
    shapes (only if `with_shapes`): list of (0-based class or -1 for a distractor, bool
      [size, size] unoccluded mask) of every drawn shape, in drawing order.
  """
  image, items, masks, keep, vis = _render(seed, split, index, size)
  instances = [(it.cls, vis[i]) for i, it in enumerate(items) if keep[i] and it.cls >= 0]
  if with_shapes:
    return image, instances, [(it.cls, m) for it, m, k in zip(items, masks, keep) if k]
  return image, instances


def _render(seed: int, split: str, index: int, size: int):
  """(image, items, their masks, kept flags, visible masks) of image `index` of `split`."""
  _check_split(split)
  split_id = SPLITS[split]
  rng = np.random.default_rng([seed, split_id, index])
  classes = _plan_categories(rng, seed, split_id, index)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  background = _background(rng, size, yy, xx)
  bg_mean = background.reshape(-1, 3).mean(0)
  min_area = max(6, int(round(_MIN_VISIBLE_AREA * size * size)))

  for _ in range(8):
    items, masks = _layout(rng, classes, size, bg_mean)
    keep = [True] * len(items)
    # Drop tiny instances one at a time (earliest first); a drop can only uncover others.
    while True:
      vis = _visible(masks, keep)
      bad = [i for i, it in enumerate(items) if keep[i] and it.cls >= 0 and (
          vis[i].sum() < max(min_area, _MIN_VISIBLE_FRACTION * masks[i].sum()))]
      if not bad:
        break
      keep[bad[0]] = False
    if {it.cls for it, k in zip(items, keep) if k and it.cls >= 0} == set(classes):
      break
  else:
    # Fallback (rare): one instance per class side by side, nothing else; cannot occlude.
    items = []
    for k, c in enumerate(classes):
      it = _make_instance(rng, c, size, bg_mean)
      it.cx, it.cy = size * (k + 0.5) / len(classes), size * 0.5
      it.r = min(it.r, size * 0.45 / len(classes))
      items.append(it)
    masks = [_item_mask(it, size) for it in items]
    keep = [True] * len(items)
    vis = _visible(masks, keep)

  img = background
  for it, m, k in zip(items, masks, keep):
    if not k:
      continue
    window = _crop(it, size)
    if window is None:
      continue
    pu, pv, u, _ = _local_coords(it, window)
    w = _texture_weight(it.texture, pu, pv, u, it.period, it.phase, rng)[..., None]
    colour = it.colour_a * (1.0 - w) + it.colour_b * w
    crop = img[window]
    img[window] = np.where(m[window][..., None], colour, crop)
  image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return image, items, masks, keep, vis


# ----------------------------------------------------------------------------------------------
# Writing the data set.


def _file_name(index: int, image_format: str) -> str:
  return f"{index:06d}.{image_format}"


def _encode_image(image: np.ndarray, image_format: str) -> bytes:
  buf = io.BytesIO()
  if image_format == "png":
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  else:
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)
  return buf.getvalue()


def _work(args) -> list[tuple[int, list[tuple[int, dict, int, list[float]]], dict]]:
  """Renders and writes a chunk of images and their label maps; returns their annotations
  (without ids) and scene records (`synthetic_truth.image_record`)."""
  from fssjax.data import synthetic_truth  # pylint: disable=import-outside-toplevel
  root, split, indices, size, seed, image_format = args
  out_dir, dense_dir = image_dir(root, split), synthetic_truth.label_dir(root, split)
  id_base = SPLITS[split] * 10_000_000
  results = []
  for index in indices:
    image, shapes = render_truth(seed, split, index, size)
    instances = [(s.cls, s.visible) for s in shapes if s.cls >= 0]
    with open(os.path.join(out_dir, _file_name(index, image_format)), "wb") as f:
      f.write(_encode_image(image, image_format))
    png, record = synthetic_truth.image_record(shapes, size, index, id_base + index + 1,
                                               _file_name(index, image_format))
    with open(os.path.join(dense_dir, record["label_file"]), "wb") as f:
      f.write(png)
    anns = []
    for cls, m in instances:
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      rle["counts"] = rle["counts"].decode("ascii")
      area = int(mask_utils.area(rle))
      bbox = [float(x) for x in mask_utils.toBbox(rle)]
      anns.append((cls + 1, {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
                   area, bbox))
    results.append((index, anns, record))
  return results


def _generate_split(root: str, split: str, n: int, size: int, seed: int, image_format: str,
                    workers: int, progress: bool) -> dict[str, Any]:
  """Writes the images, label maps, instances JSON and scenes JSON of one split; returns the
  COCO dict."""
  from fssjax.data import synthetic_truth  # pylint: disable=import-outside-toplevel
  os.makedirs(image_dir(root, split), exist_ok=True)
  os.makedirs(synthetic_truth.label_dir(root, split), exist_ok=True)
  chunk = 50
  jobs = [(root, split, range(i, min(i + chunk, n)), size, seed, image_format)
          for i in range(0, n, chunk)]
  split_id = SPLITS[split]
  id_base = split_id * 10_000_000
  images, annotations, scenes = [], [], []
  t0 = time.time()
  last = [t0]

  def report():
    done, now = len(images), time.time()
    if done < n and now - last[0] < PROGRESS_SECONDS:
      return
    last[0] = now
    rate = done / max(now - t0, 1e-9)
    eta = (n - done) / rate if rate > 0 else float("inf")
    line = (f"synthetic {split}: {done}/{n} images ({100 * done / n:.0f}%), "
            f"{len(annotations)} annotations, {rate:.1f} images/s, "
            f"elapsed {_hms(now - t0)}, ETA {_hms(eta)}")
    absl_logging.info("%s", line)
    if progress:
      print(f"  {line}", flush=True)

  def consume(results):
    for index, anns, record in results:
      scenes.append(record)
      image_id = id_base + index + 1
      images.append({"id": image_id, "file_name": _file_name(index, image_format),
                     "width": size, "height": size})
      for cat_id, rle, area, bbox in anns:
        annotations.append({"id": id_base + len(annotations) + 1, "image_id": image_id,
                            "category_id": cat_id, "segmentation": rle, "area": area,
                            "bbox": bbox, "iscrowd": 0})
    report()

  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      consume(_work(job))
  else:
    # spawn: safe when the parent has threads (JAX, grain); results come back in job order.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for results in pool.imap(_work, jobs):
        consume(results)

  coco = {
      "info": {"description": "fssjax synthetic few-shot segmentation benchmark",
               "version": str(VERSION), "year": 2025, "contributor": GENERATOR,
               "seed": seed, "split": split},
      "licenses": [],
      "images": images,
      "annotations": annotations,
      "categories": [{"id": c.id, "name": c.name, "supercategory": c.shape}
                     for c in categories()],
  }
  utils.atomic_write_json(annotation_file(root, split), coco, separators=(",", ":"))
  synthetic_truth.write_scenes(root, split, seed, size, scenes)
  return coco


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _params(train: int, val: int, size: int, seed: int, image_format: str) -> dict[str, Any]:
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  for key, value, least in (("train", train, 1), ("val", val, 1), ("size", size, 32),
                            ("seed", seed, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
      raise ValueError(f"{key} must be an int >= {least}, got {value!r}")
  return {"generator": GENERATOR, "version": VERSION, "seed": int(seed), "size": int(size),
          "train": int(train), "val": int(val), "image_format": image_format}


def dataset_key(train: int = DEFAULTS["train"], val: int = DEFAULTS["val"],
                size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"],
                image_format: str = DEFAULTS["image_format"]) -> str:
  """Directory name of a setting, e.g. 'synthetic-v1-s0-128-4000x1000'."""
  _params(train, val, size, seed, image_format)
  key = f"synthetic-v{VERSION}-s{seed}-{size}-{train}x{val}"
  return key if image_format == "png" else f"{key}-{image_format}"


def generate(out: str, train: int = DEFAULTS["train"], val: int = DEFAULTS["val"],
             size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"],
             image_format: str = DEFAULTS["image_format"], workers: int = 2,
             progress: bool = False) -> dict[str, Any]:
  """Writes the data set into `out` (absent or empty); STAMP.json last. Returns the stamp.

  This writes in place; `build` and `ensure` wrap it in a temp dir + rename.
  """
  params = _params(train, val, size, seed, image_format)
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(f"{out}: output directory must be absent or empty")
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  utils.atomic_write_json(descriptions_file(out), descriptions(), indent=1)
  counts = {}
  for split, n in (("train", train), ("val", val)):
    coco = _generate_split(out, split, n, size, seed, image_format, workers, progress)
    per_class = np.bincount([a["category_id"] - 1 for a in coco["annotations"]],
                            minlength=NUM_CLASSES)
    img_per_class = np.zeros(NUM_CLASSES, np.int64)
    by_image = {}
    for a in coco["annotations"]:
      by_image.setdefault(a["image_id"], set()).add(a["category_id"] - 1)
    for cs in by_image.values():
      img_per_class[list(cs)] += 1
    counts[split] = {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
                     "min_images_per_class": int(img_per_class.min()),
                     "min_annotations_per_class": int(per_class.min())}
  stamp = dict(params, counts=counts, categories=NUM_CLASSES,
               seconds=round(time.time() - t0, 2), bytes=_dir_bytes(out))
  utils.atomic_write_json(stamp_file(out), stamp, indent=1)
  return stamp


def _dir_bytes(path: str) -> int:
  total = 0
  for dirpath, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(dirpath, f))
  return total


def read_stamp(root: str) -> dict[str, Any] | None:
  """The STAMP.json of a data set directory, or None if it is absent or unreadable."""
  try:
    with open(stamp_file(root), encoding="utf-8") as f:
      stamp = json.load(f)
    return stamp if isinstance(stamp, dict) else None
  except (OSError, ValueError):
    return None


def stamp_matches(stamp: dict[str, Any] | None, params: dict[str, Any]) -> bool:
  return stamp is not None and all(stamp.get(k) == v for k, v in params.items())


def build(out: str, *, force: bool = False, workers: int = 2, progress: bool = False,
          **kwargs) -> tuple[str, bool]:
  """Makes `out` a complete data set for `kwargs` (train, val, size, seed, image_format).

  Reuses `out` if its STAMP matches (unless `force`); otherwise generates into a temp dir next
  to it and renames that into place, so a killed run never leaves a set that looks complete.
  An existing `out` is replaced only if it is empty or a synthetic set (has a STAMP.json from
  this generator, or none at all but only this layout's entries).

  Returns:
    (out, generated): whether a new set was generated.
  """
  _check_options(kwargs)
  params = _params(**{**DEFAULTS, **kwargs})
  out = os.path.abspath(out)
  stamp = read_stamp(out)
  if not force and stamp_matches(stamp, params):
    log.info("synthetic data set %s is up to date; reusing it", out)
    return out, False
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise ValueError(f"{out}: exists and is not a directory")
    entries = set(os.listdir(out))
    ours = {"images", "annotations", "annotations_detectron2", "descriptions.json", "STAMP.json"}
    if entries - ours or (stamp is not None and stamp.get("generator") != GENERATOR):
      raise ValueError(f"{out}: exists and is not a synthetic data set (entries "
                       f"{sorted(entries)[:8]}); refusing to replace it")
    if stamp is None:
      reason = "it has no readable STAMP.json (incomplete)" if entries else "it is empty"
    else:
      diff = {k: (stamp.get(k), v) for k, v in params.items() if stamp.get(k) != v}
      reason = f"its STAMP differs (stamp, wanted): {diff}" if diff else "force=True"
    log.warning("rebuilding synthetic data set %s: %s", out, reason)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
  absl_logging.info("Generating the synthetic benchmark (%d train + %d val images of %d px, "
                    "seed %d) into %s with %d worker(s); progress follows", params["train"],
                    params["val"], params["size"], params["seed"], out, workers)
  try:
    generate(tmp, workers=workers, progress=progress, **params_to_kwargs(params))
    if os.path.exists(out):
      trash = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
      os.rename(out, os.path.join(trash, "old"))
      shutil.rmtree(trash, ignore_errors=True)
    try:
      os.rename(tmp, out)
    except OSError:
      # Someone else finished the same set first: keep theirs if it matches.
      if stamp_matches(read_stamp(out), params):
        shutil.rmtree(tmp, ignore_errors=True)
        return out, False
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out, True


def _check_options(kwargs: dict[str, Any]) -> None:
  unknown = set(kwargs) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown synthetic data set options {sorted(unknown)}; "
                     f"known: {sorted(DEFAULTS)}")


def params_to_kwargs(params: dict[str, Any]) -> dict[str, Any]:
  return {k: params[k] for k in ("train", "val", "size", "seed", "image_format")}


def default_root() -> str:
  """$FSSJAX_DATA/synthetic if FSSJAX_DATA is set, else ~/.cache/fssjax/synthetic."""
  base = os.environ.get("FSSJAX_DATA")
  if base:
    return os.path.join(base, "synthetic")
  return os.path.join(os.path.expanduser("~"), ".cache", "fssjax", "synthetic")


def ensure(root: str | None = None, *, workers: int = 2, progress: bool = False,
           **kwargs) -> str:
  """Returns the directory of the synthetic set for `kwargs`, generating it if needed.

  Args:
    root: parent directory of the cached sets (None or '': `default_root()`); the set lives in
      `root/dataset_key(...)`, e.g. ~/.cache/fssjax/synthetic/synthetic-v1-s0-128-4000x1000.
    workers: processes used when generating.
    progress: also print the progress lines (always logged through absl logging).
    **kwargs: train, val, size, seed, image_format (defaults in DEFAULTS).

  A matching cache (same STAMP version, seed, sizes, format) is reused; a missing, incomplete
  or mismatching one is regenerated (logged).
  """
  _check_options(kwargs)
  params = {**DEFAULTS, **kwargs}
  target = os.path.join(root or default_root(), dataset_key(**params))
  out, generated = build(target, workers=workers, progress=progress, **params)
  if generated:
    log.info("generated synthetic data set %s", out)
  return out


def is_dataset_dir(path: str) -> bool:
  """Whether `path` holds a generated set (its train annotation file exists)."""
  return bool(path) and os.path.isfile(annotation_file(path, "train"))


def check_data_root(root: str) -> str | None:
  """Why `root` cannot be the `data.root` of the synthetic benchmark, or None if it can.

  `data.root` of `data.dataset='synthetic'` is one of:
    * '' : the default cache directory (`default_root()`), where sets are generated on first
      use;
    * a generated set's own directory (it has annotations/instances_train.json);
    * a cache directory of sets: an existing directory that is empty or already holds
      generated sets (`synthetic-v*` folders), where the set of the settings is generated on
      first use.
  Anything else is refused, so a mistyped path never generates a second copy somewhere else:
  a path that does not exist (create it first to generate there), or an existing, non-empty
  directory without sets (another data set, a typo of a parent directory).
  """
  if not root or is_dataset_dir(root):
    return None
  hint = (f"Use data.root='' for the default cache ({default_root()}), the directory of a "
          "generated set (it holds annotations/instances_train.json), or an existing empty "
          "directory (or one holding synthetic-v* sets) to generate the set there; generate a "
          "set explicitly with `python -m fssjax.data.synthetic --out DIR`.")
  if not os.path.exists(root):
    return (f"data.root={root!r} does not exist ({os.path.abspath(root)}), so it is neither a "
            f"synthetic set nor a cache directory of sets; nothing was generated. {hint}")
  if not os.path.isdir(root):
    return f"data.root={root!r} is not a directory. {hint}"
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  if entries and not any(e.startswith("synthetic-v") for e in entries):
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
    return (f"data.root={root!r} ({os.path.abspath(root)}) is neither a synthetic set nor a "
            f"cache directory of sets (it holds: {shown}); nothing was generated. {hint}")
  return None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fssjax.data.synthetic",
      description="Generate the synthetic few-shot segmentation benchmark (COCO format).")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--train", type=int, default=DEFAULTS["train"])
  parser.add_argument("--val", type=int, default=DEFAULTS["val"])
  parser.add_argument("--size", type=int, default=DEFAULTS["size"])
  parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
  parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS,
                      default=DEFAULTS["image_format"])
  parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  kwargs = dict(train=args.train, val=args.val, size=args.size, seed=args.seed,
                image_format=args.image_format)
  print(f"synthetic v{VERSION}: {kwargs} -> {args.out} ({args.workers} workers)", flush=True)
  t0 = time.time()
  out, generated = build(args.out, force=args.force, workers=args.workers, progress=True,
                         **kwargs)
  stamp = read_stamp(out)
  if not generated:
    print(f"{out} is up to date (STAMP matches); nothing to do. Use --force to regenerate.")
  else:
    print(f"done in {time.time() - t0:.1f}s: {out}, {stamp['bytes'] / 2**20:.1f} MiB, "
          f"counts {json.dumps(stamp['counts'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
