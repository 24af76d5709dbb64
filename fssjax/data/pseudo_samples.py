"""Curriculum pseudo-samples for LLaFS's pretraining stage.

LLaFS (Zhu et al., "LLaFS: When Large Language Models Meet Few-Shot Segmentation", CVPR 2024)
pretrains the LLM on synthetic support-query pairs before few-shot training: a random
foreground region filled with Gaussian noise of one mean, the background split into regions
filled with noise of other means; the task grows harder as the support-query foreground
difference rises, the foreground-background contrast falls, and the instruction gives fewer of
the query polygon's 16 vertices (from 15 given to none). Where the paper gives no numbers, the
choices here (all in `PseudoSampleSpec`):

  * colours are RGB vectors in [0, 1]; "difference" and "contrast" are Euclidean distances
    between mean colours (units of the [0, 1] intensity scale);
  * difficulty d in [0, 1] sets, linearly:
      shift(d)    = support-query foreground mean distance   (spec.shift: 0.0 -> 0.3)
      contrast(d) = distance from the foreground mean to the NEAREST background region mean,
                    in each image (spec.contrast: 0.45 -> 0.1); the other regions lie between
                    contrast and 1.2 x contrast away (random directions)
      given(d)    = round((1 - d) * 15) vertices of the query polygon given in the
                    instruction: its first `given` points in clockwise order from the start
                    point (a prefix, which a left-to-right decoder then continues);
  * foreground: one star-shaped random polygon (spec.fg_vertices corners at sorted random
    angles, radius spec.fg_radius x image side, jittered by +-35%), fully inside the image;
    support and query draw their own shapes and positions;
  * background: a Voronoi partition of the image by spec.bg_regions (2..4) random seeds;
  * noise: i.i.d. Gaussian per pixel and channel, std spec.noise_std (0.06), added to the
    region's mean, clipped to [0, 1], stored as uint8 (x 255, rounded). Means are drawn so
    that mean +- 3 std stays inside [0, 1] (so clipping barely moves the measured means).

Determinism: a sample is a function of (seed, difficulty, spec) only (three streams
`np.random.default_rng([seed, 7919, k])` for geometry, colours and noise, the same across runs
and machines for a numpy version); one seed gives the same shapes, regions, noise and
colour directions at every difficulty, so difficulty alone changes the distances and the
number of given vertices.

  s = make_pseudo_sample(seed=3, difficulty=0.5)
  s.support_image, s.query_image   uint8 [H, W, 3]
  s.support_mask, s.query_mask     uint8 [H, W] in {0, 1}
  s.support_polygons, s.query_polygons   lists of int32 [16, 2] (x, y)
                                   (fssjax.priors.polygons.mask_to_polygons of the masks)
  s.given_vertices, s.given_points int, int32 [given, 2] (= query_polygons[0][:given])
  for s in pseudo_samples(seed=0, num=1000): ...   # difficulty rising linearly 0 -> 1
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from fssjax.priors.polygons import NUM_POINTS, mask_to_polygons

_STREAM = 7919  # rng key suffix: pseudo-samples do not share streams with other generators


@dataclasses.dataclass(frozen=True)
class PseudoSampleSpec:
  """Parameters of the generator (see the module docstring for what each means).

  Attributes:
    size: image side in pixels.
    noise_std: Gaussian noise std, [0, 1] intensity units.
    shift: support-query foreground mean distance at difficulty (0, 1).
    contrast: foreground to nearest background-region mean distance at difficulty (0, 1).
    bg_regions: (min, max) number of background regions, inclusive.
    fg_vertices: (min, max) corners of the foreground polygon, inclusive.
    fg_radius: (min, max) foreground radius as a fraction of the image side.
    max_given: vertices given at difficulty 0 (15 of 16 in LLaFS).

  Ranges: the support foreground mean lies in [0.3, 0.7]^3, the query's in [0.2, 0.8]^3 and
  background means in [3 std, 1 - 3 std]^3 = [0.18, 0.82]^3 by default, whose farthest corner
  is >= 0.55 from any foreground mean: contrast x 1.2 must stay below that (it is 0.54 at
  most by default) for the distances to be exact.
  """

  size: int = 64
  noise_std: float = 0.06
  shift: Tuple[float, float] = (0.0, 0.3)
  contrast: Tuple[float, float] = (0.45, 0.1)
  bg_regions: Tuple[int, int] = (2, 4)
  fg_vertices: Tuple[int, int] = (5, 10)
  fg_radius: Tuple[float, float] = (0.2, 0.32)
  max_given: int = NUM_POINTS - 1

  def at(self, difficulty: float) -> Tuple[float, float, int]:
    """(shift, contrast, given vertices) at `difficulty` in [0, 1].

    Raises:
      ValueError: difficulty outside [0, 1] or not finite.
    """
    d = float(difficulty)
    if not (0.0 <= d <= 1.0):
      raise ValueError(f"difficulty={difficulty!r}; expected a number in [0, 1]")
    lerp = lambda ab: ab[0] + (ab[1] - ab[0]) * d  # noqa: E731
    return lerp(self.shift), lerp(self.contrast), int(round((1.0 - d) * self.max_given))


@dataclasses.dataclass
class PseudoSample:
  """One support-query pair (fields in the module docstring).

  Also: difficulty, target shift and contrast, fg_means (support, query) [2, 3],
  bg_means (support, query): lists of [3] region means, all in [0, 1] units, and labels
  (support, query): int8 [H, W] region maps (0 = foreground, r + 1 = background region r,
  whose mean is bg_means[.][r]; regions are ordered by visible area, and region 0, the
  largest, is the nearest, at exactly `contrast`).
  """

  support_image: np.ndarray
  support_mask: np.ndarray
  query_image: np.ndarray
  query_mask: np.ndarray
  support_polygons: list
  query_polygons: list
  given_vertices: int
  given_points: np.ndarray
  difficulty: float
  shift: float
  contrast: float
  fg_means: np.ndarray
  bg_means: Tuple[list, list]
  labels: Tuple[np.ndarray, np.ndarray]


def _unit(rng: np.random.Generator) -> np.ndarray:
  v = rng.normal(size=3)
  return v / max(np.linalg.norm(v), 1e-12)


def _point_at_distance(rng: np.random.Generator, centre: np.ndarray, dist: float, lo: float,
                       hi: float) -> np.ndarray:
  """A point at `dist` from `centre` inside [lo, hi]^3: a random direction (rejection
  sampling), else the direction to the farthest corner of the box (exact whenever dist is at
  most that corner's distance, always the case for the spec's ranges: see `PseudoSampleSpec`)."""
  for _ in range(200):
    p = centre + dist * _unit(rng)
    if np.all(p >= lo) and np.all(p <= hi):
      return p
  # Fallback: along the direction with the most room (towards the far corner).
  far = np.where(centre < 0.5 * (lo + hi), hi, lo)
  direction = (far - centre) / max(np.linalg.norm(far - centre), 1e-12)
  return np.clip(centre + dist * direction, lo, hi)


def _foreground_mask(rng: np.random.Generator, spec: PseudoSampleSpec) -> np.ndarray:
  size = spec.size
  n = int(rng.integers(spec.fg_vertices[0], spec.fg_vertices[1] + 1))
  radius = rng.uniform(*spec.fg_radius) * size
  margin = 1.35 * radius + 1
  cx, cy = rng.uniform(margin, size - margin, 2)
  angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
  radii = radius * rng.uniform(0.65, 1.35, n)
  pts = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)]
  img = Image.new("L", (size, size), 0)
  ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
  return np.asarray(img, np.uint8)


def _voronoi(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
  seeds = rng.uniform(0, size, (k, 2))
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  d = (xx[None] - seeds[:, 0, None, None]) ** 2 + (yy[None] - seeds[:, 1, None, None]) ** 2
  return np.argmin(d, axis=0)


def _render(rngs, spec: PseudoSampleSpec, fg_mean: np.ndarray, contrast: float):
  geom, colour, noise = rngs
  size = spec.size
  mask = _foreground_mask(geom, spec)
  k = int(geom.integers(spec.bg_regions[0], spec.bg_regions[1] + 1))
  regions = _voronoi(geom, size, k)
  # Relabel the regions by visible area, largest first, dropping any the foreground hides.
  counts = np.bincount(regions[mask == 0], minlength=k)
  order = [int(r) for r in np.argsort(-counts, kind="stable") if counts[r] > 0]
  remap = np.zeros(k, np.int64)
  remap[order] = np.arange(len(order))
  regions, k = remap[regions], len(order)
  lo, hi = 3 * spec.noise_std, 1 - 3 * spec.noise_std
  means = []
  for r in range(k):
    dist = contrast if r == 0 else contrast * colour.uniform(1.0, 1.2)
    means.append(_point_at_distance(colour, fg_mean, dist, lo, hi))
  labels = np.where(mask.astype(bool), 0, regions + 1).astype(np.int8)
  mean_img = np.concatenate([fg_mean[None], np.asarray(means)])[labels]
  img = mean_img + noise.normal(0.0, spec.noise_std, mean_img.shape)
  img = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
  return img, mask, means, labels


def make_pseudo_sample(seed: int, difficulty: float,
                       spec: PseudoSampleSpec = PseudoSampleSpec()) -> PseudoSample:
  """One support-query pseudo-sample at `difficulty` (see the module docstring).

  Raises:
    ValueError: difficulty outside [0, 1].
  """
  shift, contrast, given = spec.at(difficulty)
  # Three streams: geometry (shapes, regions), colours (means) and noise, so that one seed
  # gives the same masks, regions and noise at every difficulty.
  rngs = tuple(np.random.default_rng([int(seed), _STREAM, k]) for k in range(3))
  colour = rngs[1]
  # Foreground means: support in [0.3, 0.7]^3, query `shift` away inside [0.2, 0.8]^3.
  fg_s = colour.uniform(0.3, 0.7, 3)
  direction = _point_at_distance(colour, fg_s, 1e-3, 0.2, 0.8) - fg_s  # drawn at every d
  fg_q = fg_s + shift * direction / np.linalg.norm(direction)
  if not np.all((fg_q >= 0.2) & (fg_q <= 0.8)):
    fg_q = _point_at_distance(colour, fg_s, shift, 0.2, 0.8)
  s_img, s_mask, s_bg, s_lab = _render(rngs, spec, fg_s, contrast)
  q_img, q_mask, q_bg, q_lab = _render(rngs, spec, fg_q, contrast)
  s_polys = mask_to_polygons(s_mask)
  q_polys = mask_to_polygons(q_mask)
  given_points = (q_polys[0][:given] if q_polys else np.zeros((0, 2), np.int32)).astype(np.int32)
  return PseudoSample(
      support_image=s_img, support_mask=s_mask, query_image=q_img, query_mask=q_mask,
      support_polygons=s_polys, query_polygons=q_polys, given_vertices=int(len(given_points)),
      given_points=given_points, difficulty=float(difficulty), shift=shift, contrast=contrast,
      fg_means=np.stack([fg_s, fg_q]), bg_means=(s_bg, q_bg), labels=(s_lab, q_lab))


def curriculum_difficulty(step: int, num_steps: int, *, start: float = 0.0,
                          end: float = 1.0) -> float:
  """Linear curriculum: `start` at step 0 to `end` at step num_steps - 1 (a choice: the paper
  raises difficulty over pretraining without giving the schedule)."""
  if num_steps <= 1:
    return float(end)
  t = min(max(step / (num_steps - 1), 0.0), 1.0)
  return float(start + (end - start) * t)


def pseudo_samples(seed: int, num: int, *, spec: PseudoSampleSpec = PseudoSampleSpec(),
                   start: float = 0.0, end: float = 1.0,
                   difficulty: Optional[float] = None) -> Iterator[PseudoSample]:
  """`num` samples; sample i uses seed (seed, i) and `curriculum_difficulty(i, num, start,
  end)`, or the fixed `difficulty` when given."""
  for i in range(num):
    d = curriculum_difficulty(i, num, start=start, end=end) if difficulty is None else difficulty
    yield make_pseudo_sample(int(seed) * 1_000_003 + i, d, spec)
