"""Shared data types: the source protocol every data set implements, episodes, errors.

A *source* is a random-access view of one split of one data set (for example COCO train2014).
It knows its classes, which images contain which class, and how to load an image together with
the binary mask of one class. Episodes (class, query, supports) are sampled from a source by
`fssjax.data.episodes`; grain loads and batches them with `fssjax.data.pipeline`.

Conventions:
  * class ids are 0-based indices into `source.class_names` (for COCO: the 80 categories sorted
    by category id; for PASCAL: the 20 VOC classes, background excluded);
  * images are uint8 [H, W, 3] RGB;
  * masks are uint8 [H, W]: 0 background, 1 the episode's class, 255 ignore; a mask stored at
    another size than its image is resized nearest to it (`fssjax.data.imageio.fit_mask`,
    the one rule of every source);
  * optional attributes: `image_key(index)` (the underlying image's identity, see below),
    `class_descriptions` (one string per class id, for text fields; the synthetic benchmark
    has them), `resized_masks` and `corrupt_count` (per-process counters).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

IGNORE = 255


class DataError(ValueError):
  """Bad or missing input data; the message names the file or key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Episode:
  """One few-shot episode: a query image and K support images, all of one class.

  Attributes:
    class_id: 0-based class index in the source's `class_names` (the query's class).
    query: record index of the query image in the source.
    supports: record indices of the K support images (distinct images, none of them the
      query's image: see `image_key`).
    support_classes: None (every support's mask is of `class_id`, the published episode), or
      one class id per support: the class of that support's mask (a `ranked` support policy
      may show related classes). `to_json` and the manifest hash are unchanged when None.
  """

  class_id: int
  query: int
  supports: tuple[int, ...]
  support_classes: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.support_classes is not None and len(self.support_classes) != len(self.supports):
      raise ValueError(f"episode with {len(self.supports)} supports has "
                       f"{len(self.support_classes)} support classes")

  def support_class(self, j: int) -> int:
    """The class of support j's mask."""
    return int(self.class_id if self.support_classes is None else self.support_classes[j])

  def to_json(self) -> list:
    item = [int(self.class_id), int(self.query), [int(s) for s in self.supports]]
    if self.support_classes is not None:
      item.append([int(c) for c in self.support_classes])
    return item

  @classmethod
  def from_json(cls, item) -> "Episode":
    c, q, s = item[:3]
    sc = tuple(int(x) for x in item[3]) if len(item) > 3 and item[3] is not None else None
    return cls(int(c), int(q), tuple(int(x) for x in s), sc)


@runtime_checkable
class SegmentationSource(Protocol):
  """A random-access segmentation data source (one split of one data set).

  Implementations build their class -> images index from annotation files without decoding
  images, cache it, and raise `DataError` with the offending file/key on bad input.
  """

  name: str
  class_names: Sequence[str]

  def __len__(self) -> int:
    """Number of images (records) in this split."""

  def images_with_class(self, class_id: int) -> np.ndarray:
    """Sorted int64 record indices of the images in which `class_id` is present."""

  def load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 [H,W,3], mask uint8 [H,W]) with mask 1 = `class_id`, 255 = ignore."""

  def record_key(self, index: int) -> str:
    """A stable, human-readable key of a record (file name or image id) for manifests."""

  # Optional: `image_key(index) -> str`, the identity of the record's underlying image (its
  # file, or a content hash). Two records with one image key are one image: an episode never
  # uses the query's image as a support, nor one image twice. Without it, `record_key` is the
  # identity (`image_key` below).


def image_key(source, index: int) -> str:
  """The identity of record `index`'s image: `source.image_key(index)` when the source has it,
  else `source.record_key(index)`."""
  fn = getattr(source, "image_key", None)
  return str(fn(index) if fn is not None else source.record_key(index))
