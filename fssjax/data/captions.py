"""Captions written from ground truth, for LLaFS's first training stage (visual-token alignment
on image-caption pairs) on the embedded benchmark, where no human captions exist.

LLaFS (Zhu et al., CVPR 2024) first aligns the Q-Former's visual tokens with the LLM on
image-caption pairs. Offline, the captions are generated from the embedded benchmark's
annotations (`fssjax.data.synthetic.render_image` instances): what each object is, where,
how big and in which colours, so that every word of a caption can be read off the image.
Rules (ours):

  * objects are grouped by category, categories in order of first appearance in the
    instance list (drawing order);
  * position: the instance's mask centroid in a 3 x 3 grid of the image: 'top left', 'top',
    'top right', 'left', 'centre', 'right', 'bottom left', 'bottom', 'bottom right';
  * size: visible area / image area: < 2% 'tiny', < 6% 'small', < 15% 'medium', else 'large';
  * colours: each masked pixel is assigned the nearest of `synthetic.COLOURS` (RGB distance);
    the names that cover at least 20% of the pixels, most frequent first (at most two);
  * one sentence: "An image with <n> object(s): a <size> <colours> <name> at the <pos>, ...".
    Numbers are words up to ten.

  caption = synthetic_caption(image, instances)            # instances: [(class, mask), ...]
  caption = caption_for(seed=0, split='train', index=3)    # renders the image first
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fssjax.data import synthetic

POSITIONS = (("top left", "top", "top right"), ("left", "centre", "right"),
             ("bottom left", "bottom", "bottom right"))
SIZES = ((0.02, "tiny"), (0.06, "small"), (0.15, "medium"), (float("inf"), "large"))
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MIN_COLOUR_SHARE = 0.2


def position_word(mask: np.ndarray) -> str:
  """The 3 x 3 grid cell of the mask's centroid (see the module docstring).

  Raises:
    ValueError: a mask that is not [H, W] or has no foreground pixel (no centroid).
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"position_word: mask has shape {mask.shape}; expected [H, W]")
  ys, xs = np.nonzero(mask)
  if not len(ys):
    raise ValueError(f"position_word: the {mask.shape[0]} x {mask.shape[1]} mask is empty; an "
                     "object without pixels has no position")
  h, w = mask.shape
  row = min(int(3 * (ys.mean() + 0.5) / h), 2)
  col = min(int(3 * (xs.mean() + 0.5) / w), 2)
  return POSITIONS[row][col]


def size_word(mask: np.ndarray) -> str:
  frac = float(np.count_nonzero(mask)) / mask.size
  return next(word for bound, word in SIZES if frac < bound)


def colour_words(image: np.ndarray, mask: np.ndarray, max_colours: int = 2) -> list:
  """Names of the dominant `synthetic.COLOURS` under the mask (see the module docstring)."""
  names = list(synthetic.COLOURS)
  palette = np.asarray([synthetic.COLOURS[n] for n in names], np.float64)
  px = image[mask.astype(bool)].astype(np.float64)
  nearest = np.argmin(((px[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
  counts = np.bincount(nearest, minlength=len(names)) / max(len(px), 1)
  order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= MIN_COLOUR_SHARE]
  return [names[i] for i in order[:max_colours]]


def _number(n: int) -> str:
  return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def synthetic_caption(image: np.ndarray, instances: Sequence) -> str:
  """The caption of one embedded-benchmark image.

  Args:
    image: uint8 [H, W, 3].
    instances: [(0-based class, bool [H, W] visible mask), ...] as `render_image` returns.

  Returns:
    one sentence (see the module docstring).

  Raises:
    ValueError: a mask of another size than the image, or an unknown class.
  """
  cats = synthetic.categories()
  groups: dict[int, list] = {}
  for cls, mask in instances:
    if not 0 <= int(cls) < len(cats):
      raise ValueError(f"synthetic_caption: class {cls} is not one of the {len(cats)} categories")
    if mask.shape != image.shape[:2]:
      raise ValueError(f"synthetic_caption: mask shape {mask.shape} differs from the image's "
                       f"{image.shape[:2]}")
    if np.any(mask):
      groups.setdefault(int(cls), []).append(mask)
  n = sum(len(v) for v in groups.values())
  if n == 0:
    return "An image with no object."
  phrases = []
  for cls, masks in groups.items():
    for mask in masks:
      colours = " and ".join(colour_words(image, mask))
      words = " ".join(w for w in (size_word(mask), colours, cats[cls].name) if w)
      phrases.append(f"a {words} at the {position_word(mask)}")
  plural = "object" if n == 1 else "objects"
  return f"An image with {_number(n)} {plural}: " + ", ".join(phrases) + "."


def caption_for(seed: int, split: str, index: int, size: int = 128) -> str:
  """Renders image `index` of `split` (`synthetic.render_image`) and captions it."""
  image, instances = synthetic.render_image(seed, split, index, size=size)
  return synthetic_caption(image, instances)
