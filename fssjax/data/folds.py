"""Benchmark folds: which classes are base (train) and which are novel (test) in each fold.

Class ids are 0-based indices into the source's `class_names` (see `fssjax.data.base`).

Benchmarks (the published protocols):
  * 'coco20i': 4 folds of the 80 COCO categories (sorted by category id), **interleaved**: the
    test classes of fold f are {f + 4v : v = 0..19}; train = the other 60 (HSNet
    `build_class_ids`, PFENet `use_split_coco`). Fold 0 tests person, airplane, boat, ...
  * 'coco20i_contiguous': the contiguous split (fold f tests 20f .. 20f+19), a different
    benchmark (PFENet without `use_split_coco`), offered only under its own name.
  * 'synthetic': the generated COCO-format benchmark; same rule as 'coco20i' over 80 classes.
  * 'pascal5i': 4 folds of the 20 VOC classes, fold f tests 5f .. 5f+4 (HSNet, PFENet).
  * 'fss1000': one fold; classes are numbered as HSNet does: the sorted 520 train names get
    0..519, the sorted 240 val names 520..759, the sorted 240 test names 760..999; split
    'train' / 'val' / 'test' returns those ranges (`fssjax.data.fss1000_splits` has the names).
  * 'lvis92i': 10 folds over the 1203 LVIS v1 categories (sorted by id). Matcher
    (aim-uofa/Matcher, matcher/data/lvis.py) keeps the val classes with more than `shot`
    annotated images, in category order (`eligible`), takes n = len(eligible) // 10 per fold and
    tests `eligible[fold + 10 * v]` for v < n; train = every (train) class not tested. The test
    classes therefore depend on the annotations: pass `eligible` (and, for 'train', the
    `base_pool` of classes present in the train annotations), or use
    `fssjax.data.lvis.lvis92i_fold_classes`, which computes both from the LVIS JSON files.

Cross-domain (`cross_domain_classes`): a model trained on a fold of one benchmark tested on
another (COCO-20i <-> PASCAL-5i) is tested on the target's classes (fold -1: all of them)
minus those its training fold trained on, matched by name (`VOC_TO_COCO_NAME`), as RePRI's
`filter_classes` (mboudiaf/RePRI-for-Few-Shot-Segmentation, src/dataset/classes.py).
"""

from __future__ import annotations

from typing import Sequence

# The 80 COCO categories in category-id order (index = 0-based class id).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)

COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

# The 20 PASCAL VOC classes (label value in SegmentationClassAug = index + 1).
VOC_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")

LVIS_NUM_CLASSES = 1203
LVIS_NUM_FOLDS = 10

_NUM_FOLDS = {
    "coco20i": 4,
    "coco20i_contiguous": 4,
    "synthetic": 4,
    "pascal5i": 4,
    "fss1000": 1,
    "lvis92i": LVIS_NUM_FOLDS,
}
_NUM_CLASSES = {
    "coco20i": 80,
    "coco20i_contiguous": 80,
    "synthetic": 80,
    "pascal5i": 20,
    "fss1000": 1000,
    "lvis92i": LVIS_NUM_CLASSES,
}
BENCHMARKS: tuple[str, ...] = tuple(_NUM_FOLDS)
_SPLITS = ("train", "test")
_FSS_SPLITS = ("train", "val", "test")


def _check_benchmark(benchmark: str) -> None:
  if benchmark not in _NUM_FOLDS:
    raise ValueError(f"Unknown benchmark {benchmark!r}; valid benchmarks: {list(BENCHMARKS)}")


def num_folds(benchmark: str) -> int:
  """Number of folds of `benchmark`."""
  _check_benchmark(benchmark)
  return _NUM_FOLDS[benchmark]


def num_classes(benchmark: str) -> int:
  """Number of classes (base + novel) that class ids of `benchmark` index."""
  _check_benchmark(benchmark)
  return _NUM_CLASSES[benchmark]


def class_names(benchmark: str) -> tuple[str, ...]:
  """Class names indexed by class id, for the benchmarks whose names are fixed by the protocol.

  'lvis92i' and 'synthetic' names come from their annotation files (the source's
  `class_names`); asking for them here raises ValueError.
  """
  _check_benchmark(benchmark)
  if benchmark in ("coco20i", "coco20i_contiguous"):
    return COCO_CLASS_NAMES
  if benchmark == "pascal5i":
    return VOC_CLASS_NAMES
  if benchmark == "fss1000":
    from fssjax.data import fss1000_splits as s  # pylint: disable=import-outside-toplevel
    return tuple(sorted(s.TRAIN_CLASSES)) + tuple(sorted(s.VAL_CLASSES)) + tuple(
        sorted(s.TEST_CLASSES))
  raise ValueError(
      f"Class names of benchmark {benchmark!r} come from its annotation file; use the source's "
      "class_names")


def _check_fold_split(benchmark: str, fold: int, split: str, splits: Sequence[str]) -> None:
  n = num_folds(benchmark)
  if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n:
    raise ValueError(
        f"Invalid fold {fold!r} for benchmark {benchmark!r}; valid folds: {list(range(n))}")
  if split not in splits:
    raise ValueError(
        f"Invalid split {split!r} for benchmark {benchmark!r}; valid splits: {list(splits)}")


def lvis92i_test_classes(eligible: Sequence[int], fold: int,
                         nfolds: int = LVIS_NUM_FOLDS) -> list[int]:
  """The LVIS-92i rule: `eligible[fold + nfolds * v]` for v < len(eligible) // nfolds.

  Args:
    eligible: class ids of the val classes with more than `shot` annotated images, in category
      order (Matcher: `[c for c in val_anno if len(val_anno[c]) > shot]`).
    fold: 0 .. nfolds - 1.
  """
  per_fold = len(eligible) // nfolds
  return [int(eligible[fold + nfolds * v]) for v in range(per_fold)]


def fold_classes(benchmark: str, fold: int, split: str, *,
                 eligible: Sequence[int] | None = None,
                 base_pool: Sequence[int] | None = None) -> list[int]:
  """Sorted class ids of `split` ('train' = base classes, 'test' = novel classes) of a fold.

  Args:
    benchmark: one of `BENCHMARKS`.
    fold: 0 .. num_folds(benchmark) - 1.
    split: 'train' or 'test'; for 'fss1000' also 'val'.
    eligible: 'lvis92i' only (required): the val classes with more than `shot` images, in
      category order; see `lvis92i_test_classes`.
    base_pool: 'lvis92i' 'train' only: the classes present in the train annotations (Matcher's
      `train_cat_ids`); default all 1203 classes. The fold's test classes are removed from it.

  Raises:
    ValueError: unknown benchmark, fold or split (naming the value and the valid ones), or
      'lvis92i' without `eligible`.
  """
  _check_benchmark(benchmark)
  if benchmark == "fss1000":
    _check_fold_split(benchmark, fold, split, _FSS_SPLITS)
    start, stop = {"train": (0, 520), "val": (520, 760), "test": (760, 1000)}[split]
    return list(range(start, stop))
  _check_fold_split(benchmark, fold, split, _SPLITS)
  n = _NUM_CLASSES[benchmark]
  if benchmark in ("coco20i", "synthetic"):
    test = [fold + 4 * v for v in range(n // 4)]
  elif benchmark == "coco20i_contiguous":
    test = list(range(20 * fold, 20 * fold + 20))
  elif benchmark == "pascal5i":
    test = list(range(5 * fold, 5 * fold + 5))
  else:  # lvis92i
    if eligible is None:
      raise ValueError(
          "LVIS-92i folds depend on the LVIS val annotations: pass eligible= (the val classes "
          "with more than `shot` images) or use fssjax.data.lvis.lvis92i_fold_classes(root, fold, "
          "split)")
    bad = [c for c in eligible if not 0 <= int(c) < n]
    if bad:
      raise ValueError(f"eligible LVIS class ids out of range 0..{n - 1}: {bad[:5]}")
    test = lvis92i_test_classes(eligible, fold)
    if split == "train":
      pool = range(n) if base_pool is None else base_pool
      test_set = set(test)
      return sorted({int(c) for c in pool} - test_set)
    return sorted(test)
  if split == "test":
    return sorted(test)
  test_set = set(test)
  return [c for c in range(n) if c not in test_set]


# ----------------------------------------------------------------------------------------
# Cross-domain evaluation: the target benchmark's test classes that a model trained on another
# benchmark's fold has seen are removed.

# The COCO name of each PASCAL VOC class (all 20 VOC classes are COCO categories; 6 are
# spelled differently). RePRI (mboudiaf/RePRI-for-Few-Shot-Segmentation,
# src/dataset/classes.py) matches the two data sets by name after the same renaming.
VOC_TO_COCO_NAME: dict[str, str] = {
    "aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
    "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv",
    **{n: n for n in ("bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                      "dog", "horse", "person", "sheep", "train")}}
CROSS_DOMAIN_BENCHMARKS: tuple[str, ...] = ("coco20i", "coco20i_contiguous", "pascal5i")


def shared_class_name(benchmark: str, class_id: int) -> str:
  """The name of `class_id` of `benchmark` in COCO's spelling (PASCAL's 'aeroplane' ->
  'airplane', ...), the key by which classes of different benchmarks are the same class."""
  name = class_names(benchmark)[int(class_id)]
  return VOC_TO_COCO_NAME[name] if benchmark == "pascal5i" else name


def all_test_classes(benchmark: str, fold: int) -> list[int]:
  """The test classes of `fold`, or with fold -1 every class of the benchmark (RePRI's
  `test_split = -1`, the DSV-LFS code's PASCAL 'fold 4': all 20 classes)."""
  if fold == -1:
    _check_benchmark(benchmark)
    if benchmark not in CROSS_DOMAIN_BENCHMARKS:
      raise ValueError(f"fold -1 (all classes) is defined for {list(CROSS_DOMAIN_BENCHMARKS)}, "
                       f"not {benchmark!r}")
    return list(range(_NUM_CLASSES[benchmark]))
  return fold_classes(benchmark, fold, "test")


def cross_domain_classes(train_benchmark: str, train_fold: int, test_benchmark: str,
                         test_fold: int = -1) -> tuple[list[int], list[int]]:
  """(kept, removed) test class ids of `test_benchmark` for a model trained on fold
  `train_fold` of `train_benchmark`.

  The RePRI cross-domain rule (mboudiaf/RePRI-for-Few-Shot-Segmentation,
  src/dataset/classes.py `filter_classes`; config_files/coco2pascal.yaml: trained on COCO-20i
  fold f, tested on PASCAL with `test_split: -1`, all 20 classes): the candidate classes are
  the test classes of `test_fold` (-1: all classes of `test_benchmark`), and every candidate
  whose name (`shared_class_name`) is among the training (base) classes of `train_fold` of
  `train_benchmark` is removed. Both lists are sorted class ids of `test_benchmark`.

  Raises:
    ValueError: a benchmark without fixed class names (only `CROSS_DOMAIN_BENCHMARKS`), or an
      invalid fold (naming the value and the valid ones).
  """
  for b in (train_benchmark, test_benchmark):
    _check_benchmark(b)
    if b not in CROSS_DOMAIN_BENCHMARKS:
      raise ValueError(f"Cross-domain class removal needs fixed class names: benchmark {b!r} "
                       f"is not one of {list(CROSS_DOMAIN_BENCHMARKS)}")
  seen = {shared_class_name(train_benchmark, c)
          for c in fold_classes(train_benchmark, train_fold, "train")}
  candidates = all_test_classes(test_benchmark, test_fold)
  kept = [c for c in candidates if shared_class_name(test_benchmark, c) not in seen]
  removed = [c for c in candidates if shared_class_name(test_benchmark, c) in seen]
  return kept, removed
