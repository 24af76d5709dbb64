"""Shared data types: the source protocol every data set implements, episodes, errors.

A *source* is a random-access view of one split of one data set (for example COCO train2014).
It knows its classes, which images contain which class, and how to load an image together with
the binary mask of one class. Episodes (class, query, supports) are sampled from a source by
`fssjax.data.episodes`; grain loads and batches them with `fssjax.data.pipeline`.

Conventions:
  * class ids are 0-based indices into `source.class_names` (for COCO: the 80 categories sorted
    by category id; for PASCAL: the 20 VOC classes, background excluded);
  * images are uint8 [H, W, 3] RGB;
  * masks are uint8 [H, W]: 0 background, 1 the episode's class, 255 ignore.
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
    class_id: 0-based class index in the source's `class_names`.
    query: record index of the query image in the source.
    supports: record indices of the K support images (distinct, none equal to `query`).
  """

  class_id: int
  query: int
  supports: tuple[int, ...]

  def to_json(self) -> list:
    return [int(self.class_id), int(self.query), [int(s) for s in self.supports]]

  @classmethod
  def from_json(cls, item) -> "Episode":
    c, q, s = item
    return cls(int(c), int(q), tuple(int(x) for x in s))


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
