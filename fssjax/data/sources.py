"""Build the data source of a config: `build_source(config.data, split)`.

`data.dataset` picks the benchmark:
  synthetic           the generated COCO-format benchmark (fssjax.data.synthetic): data.root is
                      '' (the default cache directory; the set is generated on first use), a
                      generated set's own directory, or an existing directory that is empty or
                      holds generated sets (a cache directory). Any other root (one that does
                      not exist, or a non-empty directory without sets) is a DataError naming
                      it: a mistyped root never generates a second copy elsewhere
                      (`synthetic.check_data_root`)
  coco20i             COCO 2014 under data.root, interleaved folds
  coco20i_contiguous  the same source, contiguous folds
  pascal5i            VOC2012 + SegmentationClassAug under data.root, fold data.fold
  fss1000             FSS-1000 under data.root, the published class split
  lvis92i             LVIS v1 + COCO 2017 images under data.root
Splits: 'train' and 'test' everywhere ('val' is the test split for COCO, PASCAL and LVIS, which
have no separate validation split); FSS-1000 has its own 'val' classes.
`fold_classes_for(data, split)` gives the class ids that episodes of `split` draw from.

Cross-domain evaluation (a model trained on one benchmark tested on another): `data.fold = -1`
tests every class of the benchmark (coco20i, coco20i_contiguous, pascal5i; RePRI's
`test_split: -1`), and `data.cross_domain_from = '<benchmark>:<fold>'` (the benchmark and fold
the model trained on) removes the test classes that fold trained on, matched by name through
the COCO <-> PASCAL name map (`fssjax.data.folds.cross_domain_classes`, RePRI's
`filter_classes`). `cross_domain_protocol(data)` lists the removed classes for results files.
`missing_inputs(data, splits)` is a cheap check (paths only) run before a job starts.
"""

from __future__ import annotations

import os

from fssjax.data import folds
from fssjax.data.base import DataError, SegmentationSource

DATASETS = ("synthetic", "coco20i", "coco20i_contiguous", "pascal5i", "fss1000", "lvis92i")


def benchmark_of(data) -> str:
  """The `fssjax.data.folds` benchmark name of a data config (synthetic -> 'synthetic')."""
  ds = data.dataset
  if ds not in DATASETS:
    raise ValueError(f"Unknown data.dataset {ds!r}; valid datasets: {list(DATASETS)}")
  return ds


def _get(data, key, default):
  try:
    value = data[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def build_source(data, split: str, cache_dir: str | None = None) -> SegmentationSource:
  """The source of `split` ('train' | 'test' | 'val') for `data` (a config's `data` block).

  Uses data.dataset, data.root, data.fold and data.skip_corrupt. Index caches go to
  `cache_dir` (default: $FSSJAX_CACHE_DIR/index or ~/.cache/fssjax/index).

  Raises:
    ValueError: unknown dataset or split. DataError: missing or bad data files.
  """
  ds = benchmark_of(data)
  valid = ("train", "val", "test")
  if split not in valid:
    raise ValueError(f"Unknown split {split!r}; valid splits: {list(valid)}")
  root = _get(data, "root", "")
  skip = bool(_get(data, "skip_corrupt", False))
  fold = int(_get(data, "fold", 0))
  if ds == "synthetic":
    from fssjax.data import coco, synthetic  # pylint: disable=import-outside-toplevel
    problem = synthetic.check_data_root(root)
    if problem:
      raise DataError(problem)
    if not synthetic.is_dataset_dir(root):
      # data.root is the cache directory holding generated sets ('' = the default one).
      root = synthetic.ensure(root or None)
    return coco.synthetic(root, split, cache_dir=cache_dir, skip_corrupt=skip)
  if ds in ("coco20i", "coco20i_contiguous"):
    from fssjax.data import coco  # pylint: disable=import-outside-toplevel
    return coco.coco20i(root, split, cache_dir=cache_dir, skip_corrupt=skip)
  if ds == "pascal5i":
    from fssjax.data import pascal  # pylint: disable=import-outside-toplevel
    if fold == -1 or _cross_domain_from(data):
      # All classes (fold -1) and / or cross-domain removal: the index holds the test classes.
      if split == "train":
        raise ValueError("data.fold = -1 / data.cross_domain_from are for the test split "
                         "(cross-domain evaluation), not for training")
      classes = fold_classes_for(data, split)
      tag = "all" if fold == -1 else f"fold{fold}"
      return pascal.PascalSource(root, split, classes=classes, cache_dir=cache_dir,
                                 skip_corrupt=skip, name=f"pascal5i-{tag}-val")
    folds.fold_classes("pascal5i", fold, "test")  # validates the fold
    return pascal.pascal5i(root, split, fold, cache_dir=cache_dir, skip_corrupt=skip)
  if ds == "fss1000":
    from fssjax.data import fss1000  # pylint: disable=import-outside-toplevel
    return fss1000.fss1000(root, split, skip_corrupt=skip)
  from fssjax.data import lvis  # pylint: disable=import-outside-toplevel
  return lvis.lvis92i(root, split, cache_dir=cache_dir, skip_corrupt=skip)


def missing_inputs(data, splits=("train", "test")) -> list[str]:
  """Human-readable lines naming each missing data input of `splits` (empty: nothing missing).

  Only checks that paths exist (no index is built); the sources check contents when built.
  The synthetic benchmark is generated on demand; only a root that `build_source` would refuse
  (`synthetic.check_data_root`) is reported.
  """
  ds = benchmark_of(data)
  root = _get(data, "root", "")
  if ds == "synthetic":
    from fssjax.data import synthetic  # pylint: disable=import-outside-toplevel
    problem = synthetic.check_data_root(root)
    return [problem] if problem else []
  if ds in ("coco20i", "coco20i_contiguous"):
    from fssjax.data import coco  # pylint: disable=import-outside-toplevel
    missing = []
    for split in splits:
      for path in coco.coco20i_paths(root, split)[3]:
        if path not in missing:
          missing.append(path)
    if not missing:
      return []
    return [f"data.root = {root!r}: COCO 2014 not found (missing: {', '.join(missing)}).\n"
            + coco.COCO20I_LAYOUT.format(root=root or "<root>")]
  if not root or not os.path.isdir(root):
    where = os.path.abspath(root) if root else "<data.root is empty>"
    return [f"data.root = {root!r}: the {ds} data directory does not exist ({where})"]
  return []


def fold_classes_for(data, split: str, source: SegmentationSource | None = None,
                     cache_dir: str | None = None) -> list[int]:
  """Class ids that episodes of `split` draw from for `data` (fold data.fold).

  'train' gives the fold's base classes, 'test' (and 'val' outside FSS-1000) its novel classes;
  FSS-1000 'val' gives the 240 val classes. Cross-domain (test splits only): data.fold -1 gives
  all classes, and data.cross_domain_from removes the classes its fold trained on (see the
  module docstring). LVIS-92i needs the annotation counts: `source` (the
  split's LvisSource) is used when given, the other split is read from data.root.
  """
  bench = benchmark_of(data)
  fold = int(_get(data, "fold", 0))
  cross = _cross_domain_from(data)
  if cross or fold == -1:
    if split == "train":
      raise ValueError("data.fold = -1 / data.cross_domain_from are for the test split "
                       "(cross-domain evaluation), not for training")
    if not cross:
      return folds.all_test_classes(bench, fold)
    return folds.cross_domain_classes(cross[0], cross[1], bench, fold)[0]
  if bench == "fss1000":
    return folds.fold_classes(bench, 0, {"trn": "train"}.get(split, split))
  fold_split = "train" if split == "train" else "test"
  if split not in ("train", "val", "test"):
    raise ValueError(f"Unknown split {split!r}; valid splits: ['train', 'val', 'test']")
  if bench != "lvis92i":
    return folds.fold_classes(bench, fold, fold_split)
  from fssjax.data import lvis  # pylint: disable=import-outside-toplevel
  shot = int(_get(data, "shot", 1))
  kw = {"val_source": source} if fold_split == "test" else {"train_source": source}
  return lvis.lvis92i_fold_classes(_get(data, "root", ""), fold, fold_split, shot=shot,
                                   cache_dir=cache_dir, **kw)


def _cross_domain_from(data) -> tuple[str, int] | None:
  """(benchmark, fold) of `data.cross_domain_from` ('<benchmark>:<fold>'), None when ''."""
  spec = str(_get(data, "cross_domain_from", "") or "")
  if not spec:
    return None
  bench, sep, fold = spec.rpartition(":")
  if not sep or bench not in folds.CROSS_DOMAIN_BENCHMARKS or not fold.lstrip("-").isdigit():
    raise ValueError(f"data.cross_domain_from = {spec!r}: expected '<benchmark>:<fold>' naming "
                     f"the benchmark and fold the model trained on, with the benchmark one of "
                     f"{list(folds.CROSS_DOMAIN_BENCHMARKS)} (e.g. 'coco20i:0')")
  folds.fold_classes(bench, int(fold), "train")  # validates the fold
  return bench, int(fold)


def cross_domain_protocol(data) -> dict:
  """{} without `data.cross_domain_from`; else {'cross_domain': {...}} for results files: the
  training benchmark and fold, the target fold (-1: all classes), the rule, and the removed
  and kept class ids and names of the target benchmark."""
  cross = _cross_domain_from(data)
  if not cross:
    return {}
  bench = benchmark_of(data)
  fold = int(_get(data, "fold", 0))
  kept, removed = folds.cross_domain_classes(cross[0], cross[1], bench, fold)
  names = folds.class_names(bench)
  return {"cross_domain": dict(
      trained_on=cross[0], trained_fold=cross[1], tested_on=bench, tested_fold=fold,
      rule=("RePRI filter_classes: the target's test classes (fold -1: all) minus those the "
            "training fold trained on, matched by name (COCO <-> PASCAL names)"),
      removed_class_ids=removed, removed_class_names=[names[c] for c in removed],
      kept_class_ids=kept, kept_class_names=[names[c] for c in kept])}
