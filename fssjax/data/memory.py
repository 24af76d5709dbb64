"""An in-memory segmentation source over numpy arrays.

`InMemorySource` is a complete `fssjax.data.base.SegmentationSource`: use it for your own data
when it fits in memory (a few hundred images), for notebooks, and in tests. Give it RGB images
and one label map per image in which pixel value `c + 1` marks class `c` (0 background,
255 ignore):

  src = InMemorySource(images, label_maps, ["cat", "dog"], name="pets")
  image, mask = src.load(index, class_id=1)   # mask: 1 dog, 0 everything else, 255 ignore

The source is picklable (plain numpy arrays), so grain worker processes can use it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from fssjax.data import imageio
from fssjax.data.base import IGNORE, DataError


class InMemorySource:
  """A `SegmentationSource` over in-memory images and per-image label maps.

  Attributes:
    name: source name (used in record keys and manifests).
    class_names: the class names; class id `c` is `class_names[c]`.
  """

  def __init__(self, images: Sequence[np.ndarray], class_masks: Sequence[np.ndarray],
               class_names: Sequence[str], name: str = "memory"):
    """Validates the arrays and builds the class -> images index.

    Args:
      images: N uint8 RGB images [H_i, W_i, 3].
      class_masks: N uint8 label maps [H_i, W_i]: 0 background, c + 1 for class c, 255 ignore.
        A label map of another size than its image is resized nearest to it (the rule of every
        source, `fssjax.data.imageio.fit_mask`; counted in `resized_masks`, logged).
      class_names: the C class names.
      name: the source name.

    Raises:
      DataError: on a length mismatch, a wrong dtype or shape, or a label value outside
        {0, 1..C, 255}; the message names the offending record.
    """
    self.name = str(name)
    self.class_names = tuple(str(c) for c in class_names)
    n_classes = len(self.class_names)
    if not n_classes:
      raise DataError(f"InMemorySource {self.name!r}: class_names is empty")
    if n_classes >= IGNORE:
      raise DataError(f"InMemorySource {self.name!r}: {n_classes} classes do not fit the uint8 "
                      f"label maps (at most {IGNORE - 1})")
    if len(images) != len(class_masks):
      raise DataError(f"InMemorySource {self.name!r}: {len(images)} images but "
                      f"{len(class_masks)} label maps")
    self.resized_masks = 0
    self._images: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self._image_keys: list[str] = []
    members: list[list[int]] = [[] for _ in range(n_classes)]
    for i, (image, label) in enumerate(zip(images, class_masks)):
      image = np.asarray(image)
      label = np.asarray(label)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"InMemorySource {self.name!r} image {i}: expected uint8 [H,W,3], got "
                        f"{image.dtype} {list(image.shape)}")
      if label.dtype != np.uint8 or label.ndim != 2:
        raise DataError(f"InMemorySource {self.name!r} label map {i}: expected uint8 "
                        f"[H, W] ({list(image.shape[:2])}, the image size), got {label.dtype} "
                        f"{list(label.shape)}")
      label = imageio.fit_mask(label, image.shape, f"{self.name} image {i}",
                               f"{self.name} label map {i}", self)
      values = np.unique(label)
      bad = values[(values > n_classes) & (values != IGNORE)]
      if bad.size:
        raise DataError(f"InMemorySource {self.name!r} label map {i}: values {bad.tolist()} are "
                        f"not 0, 1..{n_classes} (class index + 1) or {IGNORE} (ignore)")
      for v in values:
        if 0 < v <= n_classes:
          members[int(v) - 1].append(i)
      self._images.append(np.ascontiguousarray(image))
      self._image_keys.append(hashlib.sha256(
          np.asarray(image.shape, np.int64).tobytes() + self._images[-1].tobytes()).hexdigest())
      self._labels.append(np.ascontiguousarray(label))
    self._members = [np.asarray(m, np.int64) for m in members]

  def __len__(self) -> int:
    return len(self._images)

  def __repr__(self) -> str:
    return (f"InMemorySource(name={self.name!r}, images={len(self)}, "
            f"classes={len(self.class_names)}, digest={self.digest()[:12]})")

  def digest(self) -> str:
    """A sha256 over the class names and the label maps' contents (a cheap identity check)."""
    h = hashlib.sha256()
    h.update("\n".join(self.class_names).encode())
    for label in self._labels:
      h.update(np.asarray(label.shape, np.int64).tobytes())
      h.update(label.tobytes())
    return h.hexdigest()

  def _check(self, index: int, class_id: int | None = None) -> None:
    if not 0 <= index < len(self._images):
      raise IndexError(f"InMemorySource {self.name!r}: record {index} out of range "
                       f"[0, {len(self._images)})")
    if class_id is not None and not 0 <= class_id < len(self.class_names):
      raise DataError(f"InMemorySource {self.name!r}: class id {class_id} out of range "
                      f"[0, {len(self.class_names)})")

  def images_with_class(self, class_id: int) -> np.ndarray:
    """Sorted int64 record indices of the images that contain `class_id`."""
    if not 0 <= class_id < len(self.class_names):
      raise DataError(f"InMemorySource {self.name!r}: class id {class_id} out of range "
                      f"[0, {len(self.class_names)})")
    return self._members[class_id].copy()

  def load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 [H,W,3], mask uint8 [H,W]): 1 = `class_id`, 255 ignore, else 0."""
    self._check(index, class_id)
    label = self._labels[index]
    mask = np.where(label == class_id + 1, np.uint8(1), np.uint8(0))
    mask[label == IGNORE] = IGNORE
    return self._images[index].copy(), mask

  def record_key(self, index: int) -> str:
    self._check(index)
    return f"{self.name}/{index:06d}"

  def image_key(self, index: int) -> str:
    """sha256 of the image's shape and pixels: equal images are one image for the samplers."""
    self._check(index)
    return self._image_keys[index]
