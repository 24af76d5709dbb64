"""Masks as text: per-object 16-point clockwise polygons, their text form, a robust parser of a
language model's answer, and a rasteriser.

LLaFS (Zhu et al., "LLaFS: When Large Language Models Meet Few-Shot Segmentation", CVPR 2024)
has the LLM write the query mask as one 16-point polygon per object, points clockwise, within
the image size, as a tuple of objects of `((x1,y1),...,(x16,y16))`. The paper does not say how
ground-truth polygons are made, nor how a malformed answer is treated; the choices here:

mask -> polygons (`mask_to_polygons`):
  * objects are the 8-connected components of the mask; each becomes the outer contour of the
    component (OpenCV `cv2.findContours`, RETR_CCOMP top level, CHAIN_APPROX_NONE: every boundary
    pixel centre). Holes are not represented (a ring becomes its disc): one simple polygon per
    object is what the answer format allows.
  * components with fewer than `min_area` pixels (default 4) are dropped; objects are ordered
    largest first (so a truncated answer loses the smallest ones), ties by start point (y, x).
  * the contour is resampled to `num_points` (16) points evenly spaced along its perimeter
    (arc length of the closed contour, linear interpolation), starting at the contour's
    topmost pixel (smallest y; ties: smallest x), in clockwise order on screen (image
    coordinates, x right, y down: positive shoelace area), rounded to integers and clipped to
    [0, W-1] x [0, H-1].

polygons -> text (`format_polygons`): objects `((x1,y1),...,(x16,y16))` joined by `,` inside one
  outer pair of parentheses, no spaces: `(((3,4),...,(9,2)),((...)))`; no object: `()`.

text -> polygons (`parse_polygons`), never raises on any string:
  * every innermost parenthesised group `( ... )` is a candidate point; a group holding exactly
    two numbers is a point (decimals are rounded; a third number is dropped: repaired); a
    group without two numbers is dropped (repaired). A `)` between two points closes the
    object (so `),(` separates objects); text outside the groups is ignored.
  * truncation (unbalanced parentheses, or an unfinished last group) keeps the complete points
    written so far (repaired).
  * an object with 3..num_points-1 or more than num_points points is resampled to num_points
    along its perimeter (repaired); an object with fewer than 3 points is dropped (repaired).
  * coordinates outside the image are clipped to it (repaired).
  * status: 'ok' (nothing needed repair), 'repaired' (at least one polygon recovered, something
    fixed), 'failed' (no polygon recovered: the answer is scored as an empty mask). The exact
    empty answer `()` (or `[]`, or nothing but whitespace inside parentheses) is 'ok' with no
    polygon.
  `ParseStats` counts ok / repaired / failed over many answers for the results file.

polygons -> mask (`polygons_to_mask`): PIL `ImageDraw.polygon` fill (pixels whose centres lie
  inside, plus the outline), union over objects, uint8 {0, 1} [H, W].

Coordinates are integer pixel indices: x = column in [0, W-1], y = row in [0, H-1].
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

NUM_POINTS = 16
STATUSES = ("ok", "repaired", "failed")

_GROUP = re.compile(r"\(([^()]*)\)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


# ----------------------------------------------------------------------------------------------
# Geometry.


VERTICES = ("arc", "extreme")


def signed_area(points: np.ndarray) -> float:
  """Shoelace area of a closed polygon in image coordinates (x right, y down).

  Positive for a clockwise polygon as seen on screen. points: [N, 2] (x, y).
  """
  p = np.asarray(points, np.float64)
  x, y = p[:, 0], p[:, 1]
  return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def resample_closed(points: np.ndarray, num_points: int = NUM_POINTS) -> np.ndarray:
  """`num_points` points evenly spaced along the perimeter of a closed polygon.

  The first output point is points[0]; the k-th lies at arc length k * L / num_points, by
  linear interpolation along the edges (the closing edge included). A polygon of zero length
  gives num_points copies of points[0].

  Args:
    points: [N, 2] float or int (x, y), N >= 1.
  Returns:
    [num_points, 2] float64.
  """
  p = np.asarray(points, np.float64).reshape(-1, 2)
  closed = np.concatenate([p, p[:1]], axis=0)
  seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
  total = float(seg.sum())
  if total <= 0.0:
    return np.repeat(p[:1], num_points, axis=0)
  cum = np.concatenate([[0.0], np.cumsum(seg)])
  targets = np.arange(num_points) * (total / num_points)
  xs = np.interp(targets, cum, closed[:, 0])
  ys = np.interp(targets, cum, closed[:, 1])
  return np.stack([xs, ys], axis=1)


def _start_at_top_left(points: np.ndarray) -> np.ndarray:
  """Rotates a closed point list to start at its smallest y (ties: smallest x)."""
  i = int(np.lexsort((points[:, 0], points[:, 1]))[0])
  return np.roll(points, -i, axis=0)


def _finalise(points: np.ndarray, height: int, width: int) -> np.ndarray:
  out = np.rint(points).astype(np.int64)
  out[:, 0] = np.clip(out[:, 0], 0, width - 1)
  out[:, 1] = np.clip(out[:, 1], 0, height - 1)
  return out.astype(np.int32)


def extreme_points(points: np.ndarray, num_points: int) -> np.ndarray:
  """The outline's extreme points in `num_points` directions, clockwise from straight up.

  Direction k is (sin a, -cos a) with a = 2 pi k / num_points (screen axes, y down: up,
  then clockwise). The point for a direction is the mean of the outline points whose
  projection is within 0.5 px of the largest (the middle of a flat side). For a convex
  outline the points are the vertices of a circumscribed-like polygon (for an axis-aligned
  rectangle and 8 directions: its corners and side midpoints).
  """
  pts = np.asarray(points, np.float64)
  a = 2 * np.pi * np.arange(num_points) / num_points
  dirs = np.stack([np.sin(a), -np.cos(a)], 1)  # [P, 2]
  proj = pts @ dirs.T  # [N, P]
  top = proj >= proj.max(0, keepdims=True) - 0.5
  return (top.T.astype(np.float64) @ pts) / top.sum(0)[:, None]


def mask_to_polygons(mask: np.ndarray, num_points: int = NUM_POINTS, *, min_area: int = 4,
                     max_objects: Optional[int] = None, vertices: str = "arc"
                     ) -> list[np.ndarray]:
  """Per-object clockwise polygons of a binary mask (rules in the module docstring).

  Args:
    mask: [H, W] bool or integer (non-zero = foreground; 255 is NOT special here: pass the
      mask without ignore pixels).
    num_points: points per polygon (16 in LLaFS).
    min_area: components with fewer pixels are dropped.
    max_objects: keep at most this many (the largest); None: all.
    vertices: 'arc' (points evenly spaced by arc length from the topmost point) or
      'extreme' (`extreme_points`: the outline's extreme points in num_points directions,
      clockwise from straight up; each vertex is then a fixed function of the mask, which
      attention over the image can find).

  Returns:
    list of int32 [num_points, 2] (x, y) arrays, largest object first.

  Raises:
    ValueError: mask not 2-D, num_points < 3, or an unknown `vertices`.
  """
  if vertices not in VERTICES:
    raise ValueError(f"vertices={vertices!r}; expected one of {list(VERTICES)}")
  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f"mask has shape {m.shape}; expected [H, W]")
  if num_points < 3:
    raise ValueError(f"num_points={num_points}; a polygon needs at least 3")
  h, w = m.shape
  binary = (m != 0).astype(np.uint8)
  # RETR_CCOMP: top level = outer boundaries of components (also those inside another's hole),
  # second level = holes (skipped).
  contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
  n_labels, labels = cv2.connectedComponents(binary, connectivity=8)
  areas = np.bincount(labels.ravel(), minlength=n_labels)
  objects = []
  for c, link in zip(contours, hierarchy[0] if hierarchy is not None else []):
    if link[3] != -1:  # a hole
      continue
    pts = c.reshape(-1, 2).astype(np.float64)  # (x, y)
    label = int(labels[int(pts[0, 1]), int(pts[0, 0])])
    area = int(areas[label])
    if area < min_area:
      continue
    if len(pts) >= 3 and signed_area(pts) < 0:
      pts = pts[::-1]
    if vertices == "extreme":
      poly = _finalise(extreme_points(pts, num_points), h, w)
    else:
      poly = _finalise(resample_closed(_start_at_top_left(pts), num_points), h, w)
    objects.append((-area, int(poly[0, 1]), int(poly[0, 0]), poly))
  objects.sort(key=lambda o: o[:3])
  polys = [o[3] for o in objects]
  return polys if max_objects is None else polys[:max_objects]


def polygons_to_mask(polygons: Iterable[np.ndarray], height: int, width: int) -> np.ndarray:
  """Rasterises polygons (union) with PIL: uint8 {0, 1} [height, width].

  Each polygon is [N, 2] (x, y), N >= 1 (a point or segment paints its pixels).

  Raises:
    ValueError: a polygon that is not [N, 2] (e.g. one [N, 2] array passed instead of a list
      of them, whose rows would otherwise be drawn as single points).
  """
  img = Image.new("L", (int(width), int(height)), 0)
  draw = ImageDraw.Draw(img)
  if isinstance(polygons, np.ndarray) and polygons.ndim == 2:
    raise ValueError(f"polygons_to_mask: got one array of shape {polygons.shape}; expected a "
                     "list of [N, 2] (x, y) polygons (wrap a single polygon in a list)")
  for k, poly in enumerate(polygons):
    arr = np.asarray(poly)
    if arr.ndim != 2 or arr.shape[1] != 2:
      raise ValueError(f"polygons_to_mask: polygon {k} has shape {arr.shape}; expected [N, 2] "
                       "(x, y) points")
    pts = [(float(x), float(y)) for x, y in arr]
    if len(pts) == 1:
      draw.point(pts, fill=1)
    elif len(pts) == 2:
      draw.line(pts, fill=1)
    elif pts:
      draw.polygon(pts, fill=1, outline=1)
  return np.asarray(img, np.uint8)


# ----------------------------------------------------------------------------------------------
# Text.


def format_polygon(polygon: np.ndarray) -> str:
  """`((x1,y1),...,(xN,yN))` for one [N, 2] integer polygon."""
  return "(" + ",".join(f"({int(x)},{int(y)})" for x, y in np.asarray(polygon)) + ")"


def format_polygons(polygons: Sequence[np.ndarray]) -> str:
  """The answer text: `(` + objects joined by `,` + `)`; `()` for no object."""
  return "(" + ",".join(format_polygon(p) for p in polygons) + ")"


@dataclasses.dataclass
class ParseResult:
  """What `parse_polygons` recovered from one answer.

  Attributes:
    polygons: int32 [num_points, 2] (x, y) arrays within the image.
    status: 'ok', 'repaired' or 'failed' (see the module docstring).
    issues: short notes on what was repaired or why it failed, in order.
  """

  polygons: list
  status: str
  issues: list


def parse_polygons(text: object, height: int, width: int,
                   num_points: int = NUM_POINTS) -> ParseResult:
  """Parses an LLM answer into polygons, repairing what it can; never raises on the text.

  Args:
    text: the answer (anything; a non-string fails with issue 'not a string').
    height, width: image size; points are clipped to [0, width-1] x [0, height-1].
    num_points: the points each returned polygon has.

  Returns:
    ParseResult (rules in the module docstring).

  Raises:
    ValueError: height or width < 1, or num_points < 3 (caller errors, not answer errors).
  """
  if int(height) < 1 or int(width) < 1 or int(num_points) < 3:
    raise ValueError(f"parse_polygons: height={height}, width={width}, num_points={num_points}; "
                     "expected an image of at least 1 x 1 pixel and num_points >= 3")
  issues: list[str] = []
  if not isinstance(text, str):
    return ParseResult([], "failed", ["not a string"])
  stripped = re.sub(r"\s+", "", text)
  if stripped in ("()", "[]", "(())"):
    return ParseResult([], "ok", [])
  objects: list[list[tuple[float, float]]] = []
  current: list[tuple[float, float]] = []
  prev_end = None
  for m in _GROUP.finditer(text):
    if prev_end is not None and ")" in text[prev_end:m.start()] and current:
      objects.append(current)
      current = []
    prev_end = m.end()
    nums = _NUMBER.findall(m.group(1))
    rest = _NUMBER.sub("", m.group(1)).replace(",", "").strip()
    if len(nums) < 2 or rest:
      issues.append(f"dropped non-point group ({m.group(1)[:20]})")
      continue
    if len(nums) > 2:
      issues.append(f"dropped extra numbers in ({m.group(1)[:20]})")
    try:
      x, y = float(nums[0]), float(nums[1])
    except ValueError:  # pragma: no cover - the regex only yields floats
      issues.append(f"dropped non-point group ({m.group(1)[:20]})")
      continue
    if not (np.isfinite(x) and np.isfinite(y)):
      issues.append(f"dropped non-finite point ({m.group(1)[:20]})")
      continue
    if x != round(x) or y != round(y):
      issues.append("rounded non-integer coordinates")
    current.append((x, y))
  if current:
    objects.append(current)
  if text.count("(") != text.count(")") or (prev_end is not None and "(" in text[prev_end:]):
    issues.append("truncated or unbalanced parentheses")

  polygons = []
  for k, obj in enumerate(objects):
    pts = np.asarray(obj, np.float64)
    if len(pts) < 3:
      issues.append(f"object {k}: dropped, {len(pts)} point(s)")
      continue
    if len(pts) != num_points:
      issues.append(f"object {k}: {len(pts)} points resampled to {num_points}")
      pts = resample_closed(pts, num_points)
    r = np.rint(pts)
    if (r[:, 0] < 0).any() or (r[:, 0] > width - 1).any() or (r[:, 1] < 0).any() or (
        r[:, 1] > height - 1).any():
      issues.append(f"object {k}: clipped to the image")
    polygons.append(_finalise(pts, height, width))
  # Deduplicate issue notes, keeping order.
  issues = list(dict.fromkeys(issues))
  if not polygons:
    return ParseResult([], "failed", issues or ["no polygon found"])
  return ParseResult(polygons, "repaired" if issues else "ok", issues)


@dataclasses.dataclass
class ParseStats:
  """Counts of parse outcomes over many answers (for the results file)."""

  ok: int = 0
  repaired: int = 0
  failed: int = 0

  def add(self, result: ParseResult) -> ParseResult:
    """Counts `result` and returns it."""
    setattr(self, result.status, getattr(self, result.status) + 1)
    return result

  @property
  def total(self) -> int:
    return self.ok + self.repaired + self.failed

  def as_dict(self) -> dict:
    """{'ok', 'repaired', 'failed', 'total', 'failed_rate', 'repaired_rate'} (rates 0 when
    nothing was counted)."""
    t = self.total
    return {"ok": self.ok, "repaired": self.repaired, "failed": self.failed, "total": t,
            "failed_rate": self.failed / t if t else 0.0,
            "repaired_rate": self.repaired / t if t else 0.0}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two binary masks (1.0 when both are empty)."""
  a, b = np.asarray(a) != 0, np.asarray(b) != 0
  union = int((a | b).sum())
  return 1.0 if union == 0 else int((a & b).sum()) / union
