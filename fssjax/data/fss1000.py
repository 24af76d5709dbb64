"""FSS-1000: 1000 classes x 10 images, one class per image.

Layout (`root` is the FSS-1000 folder, or a folder holding `FSS-1000/`, as HSNet's datapath):
  <class>/<n>.jpg   the image
  <n>.png           its mask (foreground where the grey value >= 128, HSNet `read_mask`); a
                    mask whose size differs from its image (several test classes ship such
                    masks) is resized nearest to the image (`imageio.fit_mask`, counted in
                    `resized_masks` and logged)

Class split: the published 520 / 240 / 240 train / val / test class names
(`fssjax.data.fss1000_splits`, from HSNet's data/splits/fss). Class ids follow HSNet: the sorted
train names are 0..519, the sorted val names 520..759, the sorted test names 760..999, so
`fssjax.data.folds.fold_classes('fss1000', 0, split)` gives a split's classes. A source of one
split lists the images of that split's classes only, in HSNet's order (class, then sorted file
path); each test image is a query once (2400 test episodes).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from fssjax.data import folds, imageio
from fssjax.data import fss1000_splits as splits
from fssjax.data.base import DataError

log = logging.getLogger(__name__)

FSS_LAYOUT = """\
Expected FSS-1000 layout (root = the FSS-1000 folder or its parent):
  {root}/<class name>/<n>.jpg and <n>.png, for the 1000 class folders (e.g. {root}/bus/1.jpg)"""

_SPLIT_CLASSES = {"train": splits.TRAIN_CLASSES, "val": splits.VAL_CLASSES,
                  "test": splits.TEST_CLASSES}
_OFFSET = {"train": 0, "val": 520, "test": 760}


def _canonical_split(split: str) -> str:
  s = {"trn": "train"}.get(split, split)
  if s not in _SPLIT_CLASSES:
    raise ValueError(f"FSS-1000 split {split!r}; valid splits: ['train', 'val', 'test']")
  return s


def _resolve_root(root: str) -> str:
  if root and os.path.isdir(root):
    if os.path.isdir(os.path.join(root, "FSS-1000")) and not os.path.isdir(
        os.path.join(root, splits.TEST_CLASSES[0])):
      return os.path.join(root, "FSS-1000")
    return root
  raise DataError(f"FSS-1000 root {root!r} does not exist.\n" +
                  FSS_LAYOUT.format(root=root or "<root>"))


class Fss1000Source:
  """One split of FSS-1000 as a `SegmentationSource` (see module docstring).

  Attributes:
    name: source name.
    class_names: all 1000 class names in HSNet's id order.
    split_classes: the class ids of this split.
    corrupt_count: records skipped as unreadable in this process (skip_corrupt=True).
    resized_masks: masks resized to their image's size in this process.
  """

  def __init__(self, root: str, split: str, *, skip_corrupt: bool = False,
               name: str | None = None):
    self.split = _canonical_split(split)
    self.root = _resolve_root(root)
    self.name = name or f"fss1000-{self.split}"
    self.class_names = list(folds.class_names("fss1000"))
    self.split_classes = folds.fold_classes("fss1000", 0, self.split)
    self.skip_corrupt = bool(skip_corrupt)
    self.corrupt_count = 0
    self.resized_masks = 0
    self._bad: set[int] = set()

    missing = [self.class_names[c] for c in self.split_classes
               if not os.path.isdir(os.path.join(self.root, self.class_names[c]))]
    if missing:
      raise DataError(
          f"FSS-1000 {self.split} split: {len(missing)} of {len(self.split_classes)} class "
          f"folders missing under {self.root} (first: {missing[:5]}).\n" +
          FSS_LAYOUT.format(root=self.root))
    paths, labels = [], []
    for c in self.split_classes:
      folder = os.path.join(self.root, self.class_names[c])
      jpgs = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                    if f.lower().endswith(".jpg"))
      for p in jpgs:
        m = os.path.splitext(p)[0] + ".png"
        if not os.path.isfile(m):
          raise DataError(f"Missing FSS-1000 mask {m} for image {p}")
        paths.append(os.path.relpath(p, self.root))
        labels.append(c)
    self._paths = paths
    self._labels = np.array(labels, np.int64)
    self._per_class = {}
    for c in self.split_classes:
      arr = np.nonzero(self._labels == c)[0].astype(np.int64)
      arr.setflags(write=False)
      self._per_class[c] = arr
    self._empty = np.zeros(0, np.int64)
    self._empty.setflags(write=False)
    self.rare_classes = [c for c in self.split_classes if len(self._per_class[c]) < 2]
    if self.rare_classes:
      log.info("%s: %d classes have fewer than 2 images: %s", self.name,
                  len(self.rare_classes), [self.class_names[c] for c in self.rare_classes[:20]])

  def __len__(self) -> int:
    return len(self._paths)

  def images_with_class(self, class_id: int) -> np.ndarray:
    if not 0 <= class_id < len(self.class_names):
      raise ValueError(f"{self.name}: class id {class_id} outside 0..999")
    return self._per_class.get(class_id, self._empty)

  def record_key(self, index: int) -> str:
    return self._paths[index]

  def image_path(self, index: int) -> str:
    return os.path.join(self.root, self._paths[index])

  def image_key(self, index: int) -> str:
    """The image file, relative to the root."""
    return os.path.normpath(self._paths[index])

  def mask_path(self, index: int) -> str:
    return os.path.splitext(self.image_path(index))[0] + ".png"

  def class_of(self, index: int) -> int:
    """The class id of record `index` (one class per image)."""
    return int(self._labels[index])

  def classes_with_fewer_than(self, n: int) -> list[int]:
    return [c for c in self.split_classes if len(self._per_class[c]) < n]

  def _read(self, index: int):
    return (imageio.read_rgb(self.image_path(index)),
            imageio.read_mask(self.mask_path(index), gray=True))

  def _finish(self, index: int, class_id: int, data):
    image, gray = data
    gray = imageio.fit_mask(gray, image.shape, self.image_path(index), self.mask_path(index),
                            self)
    if class_id != self._labels[index]:
      return image, np.zeros(gray.shape, np.uint8)  # one class per image: absent here
    return image, (gray >= 128).astype(np.uint8)

  def load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], mask uint8 [H,W] 0/1); the mask is empty for another class."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: record {index} outside 0..{len(self) - 1}")
    if not self.skip_corrupt:
      return self._finish(index, class_id, self._read(index))
    return imageio.load_skipping_corrupt(
        self, index, class_id, self._read, lambda r, d: self._finish(r, class_id, d), log)


def fss1000(root: str, split: str, **kwargs) -> Fss1000Source:
  """FSS-1000 source of split 'train', 'val' or 'test' (the published class split)."""
  return Fss1000Source(root, split, **kwargs)
