"""The embedded benchmark as a dense (semantic segmentation) source, with its open-vocabulary
split: `evals.x = dict(type='dense', data=dict(dataset='synthetic_dense', ...))`.

The label maps and exact scene descriptions are written by the generator
(`fssjax.data.synthetic`, through `fssjax.data.synthetic_truth`: label value = category index,
255 = no category); this module serves them as a `fssjax.evaluators.DenseSource` and registers
it under the name 'synthetic_dense' when imported.

Data keys (the dense evaluator's `data` block):
  dataset      'synthetic_dense'
  root         as the few-shot `data.root` of `data.dataset='synthetic'`: '' (the default
               cache, generated on first use), a generated set's directory, or a cache
               directory of sets (`fssjax.data.synthetic.check_data_root`); a set made before
               the dense files existed gets them on first use (`synthetic_truth.ensure_dense`)
  split        'train' | 'val' | 'test' (= 'val'; default 'test')
  classes      'all' (80 names) | 'seen' (60) | 'unseen' (20): the candidate class names, in
               category-id order (`synthetic_truth.SEEN` / `UNSEEN`); pixels of categories
               outside the list are ignored (255), so a 'seen' training split never shows an
               unseen name and an 'unseen' evaluation scores the held-out names only
  background   False (default): pixels of no category (background, distractor shapes) are
               ignored, as PASCAL VOC-20's background in the open-vocabulary protocol; True:
               they are class 0, 'background', before the names
  max_images   > 0: the first images only
  generator    dict(train=, val=, size=, seed=) of the set to generate under a cache `root`
               (default `synthetic.DEFAULTS`)

Generalised zero-shot scores: evaluate with classes='all' and split the per-class IoU with
`seen_unseen_miou(results)` (mean IoU over the seen names, over the unseen names, and their
harmonic mean), the usual report of zero-shot segmentation (Bucher et al., ZS3Net, 2019).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from fssjax.data import imageio
from fssjax.data import synthetic
from fssjax.data import synthetic_truth as truth
from fssjax.data.base import DataError

DATASET = "synthetic_dense"
CLASS_SPLITS = ("all", "seen", "unseen")
SEEN, UNSEEN = truth.SEEN, truth.UNSEEN
_KEYS = ("dataset", "root", "split", "classes", "background", "max_images", "generator",
         "image_size", "max_original_size", "ignore_label")


class SyntheticDenseSource:
  """One split of the embedded benchmark as semantic segmentation (a `DenseSource`).

  Args:
    root: a generated set's directory (with its dense files).
    split: 'train', or 'val' / 'test'.
    classes: 'all' | 'seen' | 'unseen' (module docstring).
    background: pixels of no category are class 0 'background' (else ignored).
    max_images: > 0: the first images only.

  Attributes:
    name, class_names, ignore_label (255): the `DenseSource` protocol.
    class_ids: the 0-based category index of each non-background class name.

  Raises:
    DataError: missing files (the message names them and the generator command).
    ValueError: a bad split or class split.
  """

  def __init__(self, root: str, split: str = "test", classes: str = "all", *,
               background: bool = False, max_images: int = 0):
    if split not in ("train", "val", "test"):
      raise ValueError(f"{DATASET}: data.split={split!r}; expected 'train', 'val' or 'test'")
    if classes not in CLASS_SPLITS:
      raise ValueError(f"{DATASET}: data.classes={classes!r}; expected one of {CLASS_SPLITS}")
    self.root = root
    self.split = "train" if split == "train" else "val"
    self.classes = classes
    self.background = bool(background)
    self.class_ids = truth.class_split(classes)
    cats = synthetic.categories()
    names = tuple(cats[c].name for c in self.class_ids)
    self.class_names = (("background",) + names) if self.background else names
    self.ignore_label = truth.IGNORE
    self.name = f"{DATASET}-{self.split}-{classes}"
    shift = 1 if self.background else 0
    lut = np.full(256, truth.IGNORE, np.int32)
    lut[list(self.class_ids)] = np.arange(len(self.class_ids)) + shift
    if self.background:
      lut[truth.IGNORE] = 0
    self._lut = lut
    stamp = synthetic.read_stamp(root)
    problems = [p for p in (synthetic.image_dir(root, self.split),
                            truth.label_dir(root, self.split), truth.scenes_file(root, self.split))
                if not os.path.exists(p)]
    if stamp is None or problems:
      raise DataError(f"{DATASET}: {root!r} is not a generated embedded benchmark with dense "
                      f"labels (missing: {problems or [synthetic.stamp_file(root)]}); generate "
                      "one with `python -m fssjax.data.synthetic --out DIR` (or add the dense "
                      "files to an older set with `python -m fssjax.data.synthetic_truth --root "
                      "DIR`)")
    self._format = stamp.get("image_format", "png")
    n = int(stamp.get(self.split, 0))
    self._n = min(n, int(max_images)) if max_images and int(max_images) > 0 else n
    self._scenes: Optional[list] = None

  def __len__(self) -> int:
    return self._n

  def _check(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"{self.name}: image {index} outside 0..{self._n - 1}")
    return index

  def image_path(self, index: int) -> str:
    return os.path.join(synthetic.image_dir(self.root, self.split),
                        f"{self._check(index):06d}.{self._format}")

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], label map int32 [H, W]: an index into `class_names` or 255)."""
    index = self._check(index)
    image = imageio.read_rgb(self.image_path(index))
    raw = truth.load_label(self.root, self.split, index)
    if raw.shape != image.shape[:2]:
      raise DataError(f"{truth.label_file(self.root, self.split, index)}: label map "
                      f"{list(raw.shape)} differs from its image {list(image.shape[:2])}")
    return image, self._lut[raw]

  def scene(self, index: int) -> dict[str, Any]:
    """The exact scene record of image `index` (`fssjax.data.synthetic_truth`)."""
    if self._scenes is None:
      self._scenes = truth.load_scenes(self.root, self.split)
    return self._scenes[self._check(index)]

  def description(self, index: int) -> str:
    """The exact description text of image `index`."""
    return self.scene(index)["description"]

  def priors(self, index: int):
    """The exact priors of image `index` (`fssjax.priors.scene_graph.ScenePriors`)."""
    from fssjax.priors.scene_graph import ScenePriors  # pylint: disable=import-outside-toplevel
    return ScenePriors.from_json(self.scene(index)["priors"])


def _get(data, key, default):
  try:
    value = data[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def resolve_root(root: str, generator: Optional[Mapping[str, Any]] = None,
                 splits=("train", "val")) -> str:
  """A generated set's directory for `root` (as the few-shot synthetic data.root), generated
  when `root` is a cache directory, with its dense files (added to older sets).

  Raises:
    DataError: a root that `synthetic.check_data_root` refuses (message names it).
  """
  problem = synthetic.check_data_root(root)
  if problem:
    raise DataError(problem.replace("data.root", f"{DATASET} data.root"))
  if not synthetic.is_dataset_dir(root):
    root = synthetic.ensure(root or None, **dict(generator or {}))
  truth.ensure_dense(root, splits)
  return root


def source_from_config(data) -> SyntheticDenseSource:
  """The source of a dense evaluator's data block (module docstring).

  Raises:
    ValueError: unknown keys or values. DataError: a bad root.
  """
  keys = data.keys() if hasattr(data, "keys") else ()
  unknown = sorted(set(keys) - set(_KEYS))
  if unknown:
    raise ValueError(f"{DATASET}: unknown data keys {unknown}; expected some of {list(_KEYS)}")
  split = str(_get(data, "split", "test"))
  generator = _get(data, "generator", None)
  if generator is not None and hasattr(generator, "to_dict"):
    generator = generator.to_dict()
  sub = "train" if split == "train" else "val"
  root = resolve_root(str(_get(data, "root", "")), generator, splits=(sub,))
  return SyntheticDenseSource(root, split, str(_get(data, "classes", "all")),
                              background=bool(_get(data, "background", False)),
                              max_images=int(_get(data, "max_images", 0)))


def seen_unseen_miou(results: Mapping[str, Any]) -> dict[str, float]:
  """mIoU over the seen names, over the unseen names, and their harmonic mean.

  Args:
    results: a dense evaluator's results (`per_class_iou` {index: IoU x 100, nan when absent
      from the truth} and `class_names` {index: name}), or any dict with per_class_iou keyed
      by class name.

  Returns:
    {'miou_seen', 'miou_unseen', 'hiou', 'n_seen', 'n_unseen'}: means over the classes present
    in the truth (detectron2's rule); nan for a side with none ('hiou' then nan too).
  """
  names = results.get("class_names") or {}
  seen, unseen = set(SEEN), set(UNSEEN)
  s_vals, u_vals = [], []
  for key, iou in results["per_class_iou"].items():
    name = names.get(key, names.get(str(key), key)) if names else key
    if iou is None or (isinstance(iou, float) and math.isnan(iou)):
      continue
    if name in seen:
      s_vals.append(float(iou))
    elif name in unseen:
      u_vals.append(float(iou))
  ms = float(np.mean(s_vals)) if s_vals else float("nan")
  mu = float(np.mean(u_vals)) if u_vals else float("nan")
  h = 2 * ms * mu / (ms + mu) if s_vals and u_vals and ms + mu > 0 else (
      0.0 if s_vals and u_vals else float("nan"))
  return {"miou_seen": ms, "miou_unseen": mu, "hiou": h, "n_seen": len(s_vals),
          "n_unseen": len(u_vals)}


def register() -> None:
  """Registers 'synthetic_dense' with `fssjax.evaluators.register_dense_source` (done on
  import; calling again is harmless)."""
  from fssjax import evaluators  # pylint: disable=import-outside-toplevel
  evaluators.register_dense_source(DATASET, source_from_config)


register()
