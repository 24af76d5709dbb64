"""PASCAL-5i: VOC2012 images with SegmentationClassAug label masks.

Layout (`root` is the VOC2012 folder, or a folder holding `VOC2012/`, as HSNet's datapath):
  JPEGImages/<name>.jpg
  SegmentationClassAug/<name>.png   palette or greyscale PNG: 0 background, 1..20 the VOC
                                    classes, 255 boundary / don't care
  ImageSets/Segmentation/{train_aug,trainaug,train,val}.txt   (derived lists, see below)

Class ids are 0..19 (label value - 1); the mask for class c is 1 where label == c + 1, 255 where
label == 255 (ignored in training and scoring, HSNet `extract_ignore_idx`), else 0.

Which images list which class:
  * HSNet split files (the published lists): `split_dir/{trn,val}/fold{k}.txt`, one
    `<name>__<class>` line per (image, class) pair with a 1-based class; fold k's file holds the
    pairs of fold k's 5 classes. HSNet trains fold f on the trn files of the other folds and tests
    on val/fold{f}.txt. Pass `split_dir` (HSNet's data/splits/pascal) or place it at
    `<root>/splits/pascal`, where it is found automatically.
  * Otherwise the pairs are derived from an image list: `image_list` if given, else for 'train'
    the first of ImageSets/Segmentation/train_aug.txt, trainaug.txt, train.txt and for 'test'
    ImageSets/Segmentation/val.txt (lines `name` or DeepLab/PFENet style
    `/JPEGImages/name.jpg /SegmentationClassAug/name.png`). Every mask of the list is decoded
    once to count its pixels per label, and the counts are cached (keyed by the list file's path,
    size and mtime_ns); an image lists class c when it has >= max(min_pixels, 1) pixels of
    label c + 1. PFENet's lists use min_pixels = 2048 (2 * 32 * 32).
`classes` restricts the index to some classes (the others list no images); `pascal5i(root,
split, fold)` indexes the fold's base classes for 'train' and its novel classes for 'test', as
HSNet does.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from fssjax.data import folds, imageio
from fssjax.data.base import IGNORE, DataError
from fssjax.data.coco import default_cache_dir
from fssjax.utils import atomic_write_bytes

log = logging.getLogger(__name__)

NUM_CLASSES = 20

PASCAL_LAYOUT = """\
Expected PASCAL-5i layout (root = the VOC2012 folder or its parent):
  {root}/JPEGImages/<name>.jpg
  {root}/SegmentationClassAug/<name>.png
  {root}/ImageSets/Segmentation/train_aug.txt (or trainaug.txt / train.txt) and val.txt,
    or HSNet's split files in {root}/splits/pascal/{{trn,val}}/fold{{0..3}}.txt"""


def _resolve_root(root: str) -> str:
  if root and os.path.isdir(os.path.join(root, "JPEGImages")):
    return root
  if root and os.path.isdir(os.path.join(root, "VOC2012", "JPEGImages")):
    return os.path.join(root, "VOC2012")
  raise DataError(f"PASCAL VOC data not found under root {root!r} (no JPEGImages/).\n" +
                  PASCAL_LAYOUT.format(root=root or "<root>"))


def _split_name(split: str) -> str:
  if split == "train":
    return "trn"
  if split in ("test", "val"):
    return "val"
  raise ValueError(f"PASCAL-5i split {split!r}; valid splits: ['train', 'test'] ('val' = 'test')")


def read_hsnet_split(split_dir: str, split: str) -> list[tuple[str, int]]:
  """(image name, 0-based class) pairs of all 4 fold files of HSNet's `split_dir/{trn,val}`."""
  sub = os.path.join(split_dir, _split_name(split))
  pairs = []
  for k in range(4):
    path = os.path.join(sub, f"fold{k}.txt")
    if not os.path.isfile(path):
      raise DataError(f"Missing PASCAL-5i split file: {path}")
    with open(path, "r", encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        name, sep, cls = line.rpartition("__")
        if not sep or not cls.isdigit() or not 1 <= int(cls) <= NUM_CLASSES:
          raise DataError(f"{path}:{lineno}: expected '<name>__<class 1..20>', got {line!r}")
        pairs.append((name, int(cls) - 1))
  return pairs


def _read_image_list(path: str) -> list[str]:
  names = []
  with open(path, "r", encoding="utf-8") as f:
    for line in f:
      tok = line.split()
      if tok:
        names.append(os.path.splitext(os.path.basename(tok[0]))[0])
  return list(dict.fromkeys(names))  # unique, in file order


class PascalSource:
  """PASCAL VOC2012 + SegmentationClassAug as a `SegmentationSource` (see module docstring).

  Attributes:
    name, class_names: as the protocol; class_names are the 20 VOC classes.
    corrupt_count: records skipped as unreadable in this process (skip_corrupt=True).
    resized_masks: label maps resized to their image's size in this process
      (`imageio.fit_mask`: nearest, logged).
    built_index: True when this construction scanned masks (derived lists), else False.
    rare_classes: indexed class ids with fewer than 2 images.
  """

  def __init__(self, root: str, split: str, *, classes: Iterable[int] | None = None,
               split_dir: str | None = None, image_list: str | None = None,
               min_pixels: int = 0, cache_dir: str | None = None, skip_corrupt: bool = False,
               name: str | None = None):
    self.root = _resolve_root(root)
    self.split = split
    _split_name(split)
    self.name = name or f"pascal-{_split_name(split)}"
    self.class_names = list(folds.VOC_CLASS_NAMES)
    self.image_dir = os.path.join(self.root, "JPEGImages")
    self.mask_dir = os.path.join(self.root, "SegmentationClassAug")
    if not os.path.isdir(self.mask_dir):
      raise DataError(f"Missing mask directory {self.mask_dir}.\n" +
                      PASCAL_LAYOUT.format(root=self.root))
    self.skip_corrupt = bool(skip_corrupt)
    self.corrupt_count = 0
    self.resized_masks = 0
    self._bad: set[int] = set()
    self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    self.built_index = False
    wanted = sorted(set(range(NUM_CLASSES) if classes is None else (int(c) for c in classes)))
    bad = [c for c in wanted if not 0 <= c < NUM_CLASSES]
    if bad:
      raise ValueError(f"PASCAL class ids {bad} outside 0..{NUM_CLASSES - 1}")
    self.classes = wanted

    if split_dir is None:
      for base in (root, self.root):
        if os.path.isdir(os.path.join(base, "splits", "pascal")):
          split_dir = os.path.join(base, "splits", "pascal")
          break
    if split_dir is not None:
      pairs = read_hsnet_split(split_dir, split)
      self.list_source = split_dir
    else:
      pairs = self._derive_pairs(image_list, int(min_pixels))
    wanted_set = set(wanted)
    pairs = [(n, c) for n, c in pairs if c in wanted_set]
    self._names = sorted({n for n, _ in pairs})
    rec = {n: i for i, n in enumerate(self._names)}
    per_class: list[list[int]] = [[] for _ in range(NUM_CLASSES)]
    for n, c in pairs:
      per_class[c].append(rec[n])
    self._per_class = []
    for lst in per_class:
      arr = np.array(sorted(set(lst)), np.int64)
      arr.setflags(write=False)
      self._per_class.append(arr)
    self.rare_classes = [c for c in wanted if len(self._per_class[c]) < 2]
    if self.rare_classes:
      log.info("%s: %d classes have fewer than 2 images: %s", self.name,
                  len(self.rare_classes), [self.class_names[c] for c in self.rare_classes])

  # ---------------------------------------------------------------- derived lists

  def _default_list(self) -> str:
    base = os.path.join(self.root, "ImageSets", "Segmentation")
    cands = (["train_aug.txt", "trainaug.txt", "train.txt"] if self.split == "train" else
             ["val.txt"])
    for c in cands:
      if os.path.isfile(os.path.join(base, c)):
        return os.path.join(base, c)
    raise DataError(f"No PASCAL image list for split {self.split!r}: none of "
                    f"{[os.path.join(base, c) for c in cands]} exists.\n" +
                    PASCAL_LAYOUT.format(root=self.root))

  def _derive_pairs(self, image_list: str | None, min_pixels: int) -> list[tuple[str, int]]:
    list_path = image_list or self._default_list()
    if not os.path.isfile(list_path):
      raise DataError(f"Missing PASCAL image list: {list_path}")
    self.list_source = list_path
    names, counts = self._label_counts(list_path)
    thresh = max(min_pixels, 1)
    pairs = []
    for i, n in enumerate(names):
      for c in np.nonzero(counts[i, 1:NUM_CLASSES + 1] >= thresh)[0]:
        pairs.append((n, int(c)))
    return pairs

  def _label_counts(self, list_path: str) -> tuple[list[str], np.ndarray]:
    """Per image of the list: pixel counts of labels 0..20 (decodes each mask once; cached)."""
    st = os.stat(list_path)
    key = (f"{os.path.abspath(list_path)}|{st.st_size}|{st.st_mtime_ns}|"
           f"{os.path.abspath(self.mask_dir)}|1")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    cache = os.path.join(self.cache_dir, f"pascal-{os.path.basename(list_path)}-{digest}.npz")
    if os.path.isfile(cache):
      try:
        with np.load(cache, allow_pickle=False) as z:
          return [n.decode("utf-8") for n in z["names"]], z["counts"]
      except Exception as e:  # Truncated or foreign file: rebuild.
        log.warning("Unreadable PASCAL index cache %s (%s); rebuilding", cache, e)
    names = _read_image_list(list_path)
    counts = np.zeros((len(names), NUM_CLASSES + 1), np.int64)
    log.info("Scanning %d PASCAL masks listed in %s (once; cached in %s)", len(names),
             list_path, cache)
    for i, n in enumerate(names):
      path = os.path.join(self.mask_dir, n + ".png")
      try:
        label = imageio.read_mask(path)
      except DataError:
        if self.skip_corrupt:
          log.warning("%s: skipping unreadable mask %s while indexing", self.name, path)
          continue
        raise
      counts[i] = np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES + 1]
    buf = io.BytesIO()
    np.savez(buf, names=np.array([n.encode("utf-8") for n in names], np.bytes_), counts=counts)
    atomic_write_bytes(cache, buf.getvalue())
    self.built_index = True
    return names, counts

  # ---------------------------------------------------------------- protocol

  def __len__(self) -> int:
    return len(self._names)

  def images_with_class(self, class_id: int) -> np.ndarray:
    if not 0 <= class_id < NUM_CLASSES:
      raise ValueError(f"{self.name}: class id {class_id} outside 0..{NUM_CLASSES - 1}")
    return self._per_class[class_id]

  def record_key(self, index: int) -> str:
    return self._names[index]

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_dir, self._names[index] + ".jpg")

  def image_key(self, index: int) -> str:
    """The image's name (one record per name)."""
    return self._names[index]

  def mask_path(self, index: int) -> str:
    return os.path.join(self.mask_dir, self._names[index] + ".png")

  def classes_with_fewer_than(self, n: int) -> list[int]:
    return [c for c in self.classes if len(self._per_class[c]) < n]

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    return imageio.read_rgb(self.image_path(index)), imageio.read_mask(self.mask_path(index))

  def _finish(self, index: int, class_id: int, data) -> tuple[np.ndarray, np.ndarray]:
    image, label = data
    label = imageio.fit_mask(label, image.shape, self.image_path(index), self.mask_path(index),
                             self)
    return image, class_mask(label, class_id)

  def load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], mask uint8 [H,W]: 1 = class_id, 255 = VOC boundary, 0 = other)."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: record {index} outside 0..{len(self) - 1}")
    if not 0 <= class_id < NUM_CLASSES:
      raise ValueError(f"{self.name}: class id {class_id} outside 0..{NUM_CLASSES - 1}")
    if not self.skip_corrupt:
      return self._finish(index, class_id, self._read(index))
    return imageio.load_skipping_corrupt(
        self, index, class_id, self._read, lambda r, d: self._finish(r, class_id, d), log)


def class_mask(label: np.ndarray, class_id: int) -> np.ndarray:
  """Binary mask of VOC class `class_id` (0-based) from a label map: 1 / 255 ignore / 0."""
  out = np.zeros(label.shape, np.uint8)
  out[label == class_id + 1] = 1
  out[label == IGNORE] = IGNORE
  return out


def pascal5i(root: str, split: str, fold: int, **kwargs) -> PascalSource:
  """PASCAL-5i fold source: 'train' indexes the fold's 15 base classes, 'test' its 5 novel ones.

  `kwargs` go to `PascalSource` (split_dir, image_list, min_pixels, cache_dir, skip_corrupt).
  """
  fold_split = "train" if _split_name(split) == "trn" else "test"
  classes: Sequence[int] = folds.fold_classes("pascal5i", fold, fold_split)
  kwargs.setdefault("name", f"pascal5i-fold{fold}-{_split_name(split)}")
  return PascalSource(root, split, classes=classes, **kwargs)
