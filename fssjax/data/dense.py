"""Dense (semantic segmentation) sources of the open-vocabulary benchmarks, and the published
whole-image evaluation preprocessing.

Each source reads one split of one benchmark in the layout that the detectron2-style
preparation scripts write (FC-CLIP's `datasets/prepare_*.py`, from MaskFormer / SAN;
registered there by `fcclip/data/datasets/register_*.py`): one JPEG per image and one label
map per image with the same file stem, label value k = class k of `fssjax.data.class_names`,
and an ignore value (255 in 8-bit PNGs; 65535 in the 16-bit TIFFs of ADE20K-847 and
PASCAL-Context-459). `data.root` is the benchmark's own folder (first column) or the folder
holding it (`$DETECTRON2_DATASETS`):

  benchmark            folder                   images / labels (split = training | validation)
  coco_stuff_171       coco/                    {train2017,val2017}/*.jpg
                                                stuffthingmaps_detectron2/{train2017,val2017}/*.png
  ade20k_150           ADEChallengeData2016/    images/<split>/*.jpg
                                                annotations_detectron2/<split>/*.png
  ade20k_847           ADE20K_2021_17_01/       images_detectron2/<split>/*.jpg
                       (or ade/ADE20K_2021_17_01/)  annotations_detectron2/<split>/*.tif (16-bit)
  pascal_context_59    pascal_ctx_d2/           images/<split>/*.jpg
                                                annotations_ctx59/<split>/*.png
  pascal_context_459   pascal_ctx_d2/           images/<split>/*.jpg
                                                annotations_ctx459/<split>/*.tif (16-bit)
  pascal_voc_20        pascal_voc_d2/           images/<split>/*.jpg
                                                annotations_pascal20/<split>/*.png

Splits: 'train' (training / train2017) and 'val' or 'test' (validation / val2017). Images are
listed from the label folder (detectron2's `load_sem_seg` pairs files by stem): a label without
its image is a `DataError` naming both paths; a missing root or folder is a `DataError` that
names the expected layout. Each label map is checked on load: values must be < C or the ignore
value (else a `DataError` naming the file and the bad values).

`DetectronSemSegSource` is a `fssjax.evaluators.DenseSource` (name, class_names,
ignore_label, __len__, load) and also gives `class_synonyms` (every name of each class).
Importing this module registers the six benchmarks with `evaluators.register_dense_source`,
so `evals.ade150 = dict(type='dense', data=dict(dataset='ade20k_150', root=R))` works
(`data.split` default 'test', `data.max_images` > 0 keeps the first images).

Evaluation preprocessing (the protocol of the open-vocabulary papers, detectron2's
`ResizeShortestEdge` at test time): the whole image resized so that its shorter side is 640
(`shortest_edge_size`, configurable; the longer side capped by `max_size`, 2560 in CAT-Seg /
FC-CLIP configs), bilinear; the prediction's logits resized back to the label map's size
bilinearly with half-pixel centres (detectron2's `sem_seg_postprocess`, PyTorch
`F.interpolate(mode='bilinear', align_corners=False)`), then argmax. See `resize_for_eval` and
`logits_to_label_size`.

Training targets for mask classification (Mask2Former's criterion): `semantic_targets`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from fssjax.data import class_names as cn
from fssjax.data import imageio
from fssjax.data.base import DataError


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one benchmark's files are (paths relative to its folder; `{split}` is replaced)."""

  folders: tuple[str, ...]  # the benchmark's folder under $DETECTRON2_DATASETS (alternatives)
  images: str
  labels: str
  label_ext: str
  ignore_label: int
  splits: tuple[str, str]  # folder names of ('train', 'val')


LAYOUTS = {
    "coco_stuff_171": Layout(("coco",), "{split}", "stuffthingmaps_detectron2/{split}", ".png",
                             255, ("train2017", "val2017")),
    "ade20k_150": Layout(("ADEChallengeData2016",), "images/{split}",
                         "annotations_detectron2/{split}", ".png", 255,
                         ("training", "validation")),
    "ade20k_847": Layout(("ADE20K_2021_17_01", "ade/ADE20K_2021_17_01"),
                         "images_detectron2/{split}", "annotations_detectron2/{split}", ".tif",
                         65535, ("training", "validation")),
    "pascal_context_59": Layout(("pascal_ctx_d2",), "images/{split}", "annotations_ctx59/{split}",
                                ".png", 255, ("training", "validation")),
    "pascal_context_459": Layout(("pascal_ctx_d2",), "images/{split}",
                                 "annotations_ctx459/{split}", ".tif", 65535,
                                 ("training", "validation")),
    "pascal_voc_20": Layout(("pascal_voc_d2",), "images/{split}", "annotations_pascal20/{split}",
                            ".png", 255, ("training", "validation")),
}
BENCHMARKS = tuple(LAYOUTS)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def layout_text(benchmark: str, root: str = "<root>") -> str:
  """The expected layout of `benchmark` under `root`, as lines for error messages."""
  lay = LAYOUTS[benchmark]
  tr, va = lay.splits
  folder = lay.folders[0]
  lines = [f"Expected {benchmark} layout (detectron2 preparation scripts; root = the "
           f"{folder}/ folder or the folder holding it):"]
  for split in (tr, va):
    lines.append(f"  {root}/{folder}/{lay.images.format(split=split)}/<stem>.jpg")
    lines.append(f"  {root}/{folder}/{lay.labels.format(split=split)}/<stem>{lay.label_ext}"
                 + ("   (16-bit, 65535 = ignore)" if lay.ignore_label == 65535 else
                    "   (8-bit, 255 = ignore)"))
  return "\n".join(lines)


def _split_dir(benchmark: str, split: str) -> str:
  lay = LAYOUTS[benchmark]
  if split == "train":
    return lay.splits[0]
  if split in ("val", "test"):
    return lay.splits[1]
  raise ValueError(f"{benchmark}: unknown split {split!r}; valid splits: ['train', 'val', "
                   "'test'] ('test' = 'val')")


def resolve_root(benchmark: str, root: str) -> str:
  """The benchmark's own folder: `root` itself when it holds the label folders, else
  `root/<folder>` for the folder names of `LAYOUTS` ('' = $DETECTRON2_DATASETS).

  Raises:
    DataError: nothing found; the message names what was tried and the expected layout.
  """
  if benchmark not in LAYOUTS:
    raise ValueError(f"Unknown dense benchmark {benchmark!r}; valid: {list(BENCHMARKS)}")
  lay = LAYOUTS[benchmark]
  base = root or os.environ.get("DETECTRON2_DATASETS", "")
  label_top = lay.labels.split("/")[0]
  tried = []
  for cand in ([base] + [os.path.join(base, f) for f in lay.folders]) if base else []:
    tried.append(cand)
    if os.path.isdir(os.path.join(cand, label_top)):
      return cand
  where = ", ".join(os.path.abspath(t) for t in tried) if tried else (
      "<data.root is empty and $DETECTRON2_DATASETS is not set>")
  raise DataError(f"{benchmark}: data not found under root {root!r} (looked for {label_top}/ "
                  f"in: {where}).\n" + layout_text(benchmark, root or "<root>"))


def read_label(path: str, ignore_label: int) -> np.ndarray:
  """A label map as int32 [H, W]: 8-bit PNG values (palette indices or grey) or 16-bit TIFF /
  PNG values (Pillow modes 'I;16*' and 'I').

  Raises:
    DataError: missing / corrupt file, a colour image, or 16-bit values in an 8-bit benchmark
      (ignore_label 255) that exceed 255.
  """
  if ignore_label <= 255:
    return imageio.read_mask(path).astype(np.int32)
  if not os.path.isfile(path):
    raise DataError(f"Missing label file: {path}")
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      arr = np.asarray(img)
  except Exception as e:  # PIL raises several exception types on bad files.
    raise DataError(f"Corrupt or unreadable label file {path}: {type(e).__name__}: {e}") from e
  if mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "L", "P"):
    raise DataError(f"Label file {path} has Pillow mode {mode!r}; expected a 16-bit grey "
                    "label map ('I;16', as detectron2's preparation scripts write) or 8-bit grey")
  if arr.ndim != 2:
    raise DataError(f"Label file {path} decoded to shape {arr.shape}, expected [H, W]")
  return arr.astype(np.int32)


class DetectronSemSegSource:
  """One split of a benchmark in the detectron2 layout (see the module docstring).

  Attributes:
    name: '<benchmark>-<split folder>'.
    benchmark: the benchmark name (a key of `LAYOUTS`).
    class_names: the C class names (label value k = class k).
    class_synonyms: every name of each class (FC-CLIP lists).
    ignore_label: 255 or 65535.
    image_dir, label_dir: the folders read.
    stems: the file stems, sorted.
  """

  def __init__(self, benchmark: str, root: str, split: str = "val", *, max_images: int = 0,
               class_names: Optional[Sequence[str]] = None):
    """Lists the split's files (no label map is decoded).

    Args:
      benchmark: a key of `LAYOUTS`.
      root: the benchmark's folder, or the folder holding it ('' = $DETECTRON2_DATASETS).
      split: 'train', 'val' or 'test' (= 'val').
      max_images: > 0: keep the first `max_images` stems (sorted).
      class_names: override the names (default: `fssjax.data.class_names`); the count must be
        the benchmark's.

    Raises:
      DataError: missing folders (naming the expected layout), an empty label folder, or a
        label map without its image.
      ValueError: unknown benchmark or split; a class-name list of the wrong length.
    """
    if benchmark not in LAYOUTS:
      raise ValueError(f"Unknown dense benchmark {benchmark!r}; valid: {list(BENCHMARKS)}")
    sub = _split_dir(benchmark, split)
    top = resolve_root(benchmark, root)
    lay = LAYOUTS[benchmark]
    self.benchmark = benchmark
    self.name = f"{benchmark}-{sub}"
    self.ignore_label = lay.ignore_label
    self.class_synonyms = cn.class_synonyms(benchmark)
    names = tuple(cn.class_names(benchmark)) if class_names is None else tuple(class_names)
    if len(names) != len(self.class_synonyms):
      raise ValueError(f"{benchmark}: {len(names)} class names given, the benchmark has "
                       f"{len(self.class_synonyms)}")
    self.class_names = names
    self.image_dir = os.path.join(top, lay.images.format(split=sub))
    self.label_dir = os.path.join(top, lay.labels.format(split=sub))
    for what, d in (("label", self.label_dir), ("image", self.image_dir)):
      if not os.path.isdir(d):
        raise DataError(f"{benchmark}: the {what} folder {d} does not exist.\n"
                        + layout_text(benchmark, root or "<root>"))
    # Stem -> the label file's own name (its extension may be upper case: '.PNG').
    label_files = {f[:-len(lay.label_ext)]: f for f in os.listdir(self.label_dir)
                   if f.lower().endswith(lay.label_ext)}
    stems = sorted(label_files)
    if not stems:
      raise DataError(f"{benchmark}: no *{lay.label_ext} label maps in {self.label_dir}.\n"
                      + layout_text(benchmark, root or "<root>"))
    images = {}
    for f in os.listdir(self.image_dir):
      stem, ext = os.path.splitext(f)
      if ext.lower() in IMAGE_EXTS:
        images.setdefault(stem, f)
    missing = [s for s in stems if s not in images]
    if missing:
      raise DataError(f"{benchmark}: {len(missing)} label maps in {self.label_dir} have no image "
                      f"in {self.image_dir} (first: {missing[0]}{lay.label_ext}; expected "
                      f"{os.path.join(self.image_dir, missing[0] + '.jpg')})")
    if max_images and max_images > 0:
      stems = stems[:int(max_images)]
    self.stems = tuple(stems)
    self._images = {s: images[s] for s in self.stems}
    self._labels = {s: label_files[s] for s in self.stems}

  def __len__(self) -> int:
    return len(self.stems)

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_dir, self._images[self.stems[index]])

  def label_path(self, index: int) -> str:
    return os.path.join(self.label_dir, self._labels[self.stems[index]])

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3] RGB, label int32 [H, W] in [0, C) or ignore_label).

    Raises:
      DataError: unreadable files, image / label sizes that differ, or label values that are
        neither a class nor the ignore value (the message names the file and the values).
    """
    image = imageio.read_rgb(self.image_path(index))
    path = self.label_path(index)
    label = read_label(path, self.ignore_label)
    if label.shape != image.shape[:2]:
      raise DataError(f"{path}: label map is {list(label.shape)} but its image "
                      f"{self.image_path(index)} is {list(image.shape[:2])} (HxW)")
    c = len(self.class_names)
    bad = ((label < 0) | (label >= c)) & (label != self.ignore_label)
    if bad.any():
      values = np.unique(label[bad])[:8].tolist()
      raise DataError(f"{path}: label values {values} are neither classes 0..{c - 1} of "
                      f"{self.benchmark} nor its ignore value {self.ignore_label}")
    return image, label


# ------------------------------------------------------------------------------------------
# Evaluation preprocessing.


def shortest_edge_size(height: int, width: int, short: int = 640,
                       max_size: int = 2560) -> tuple[int, int]:
  """(new_h, new_w) of detectron2's `ResizeShortestEdge.get_output_shape`: the shorter side
  becomes `short`, the longer one scales alike, capped at `max_size` (0 = no cap); rounded
  half up (`int(x + 0.5)`)."""
  if height < 1 or width < 1 or short < 1:
    raise ValueError(f"shortest_edge_size: sizes must be >= 1 (got {height}x{width}, {short})")
  scale = short / min(height, width)
  if height < width:
    newh, neww = short, scale * width
  else:
    newh, neww = scale * height, short
  if max_size and max(newh, neww) > max_size:
    s = max_size / max(newh, neww)
    newh, neww = newh * s, neww * s
  return int(newh + 0.5), int(neww + 0.5)


def resize_for_eval(image: np.ndarray, short: int = 640, max_size: int = 2560) -> np.ndarray:
  """The whole image with its shorter side resized to `short` (PIL bilinear, as detectron2's
  `ResizeShortestEdge` on uint8 images). uint8 [H, W, 3] -> uint8 [h, w, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"resize_for_eval expects uint8 [H, W, 3], got {image.dtype} "
                     f"{list(image.shape)}")
  h, w = shortest_edge_size(image.shape[0], image.shape[1], short, max_size)
  if (h, w) == image.shape[:2]:
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def logits_to_label_size(logits, height: int, width: int):
  """Logits [..., h, w, C] resized bilinearly (half-pixel centres, no antialiasing: PyTorch
  `F.interpolate(mode='bilinear', align_corners=False)`, detectron2's `sem_seg_postprocess`;
  `fssjax.nn.ops.resize_bilinear`) to [..., height, width, C]; jit-able (JAX), float32."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fssjax.nn.ops import resize_bilinear  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(logits, jnp.float32)
  return resize_bilinear(x, (int(height), int(width)), axes=(x.ndim - 3, x.ndim - 2),
                         align_corners=False)


def predict_label_map(logits, height: int, width: int) -> np.ndarray:
  """argmax of `logits_to_label_size`: int32 [..., height, width] class indices."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return np.asarray(jnp.argmax(logits_to_label_size(logits, height, width), -1), np.int32)


# ------------------------------------------------------------------------------------------
# Training targets for mask classification.


def semantic_targets(label: np.ndarray, ignore_label: int, max_targets: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Mask-classification targets of a label map (MaskFormer's `MaskFormerSemanticDatasetMapper`,
  the input of `fssjax.nn.matching.set_criterion`): one binary mask per class present.

  Classes are taken in increasing order (np.unique, as the mapper); ignored pixels belong to no
  mask (they are negatives of every mask, as in the mapper). Padded to `max_targets` rows:
  classes -1 and empty masks after the real ones.

  Args:
    label: integer [H, W] label map (values < C or `ignore_label`).
    ignore_label: the ignore value (255 or 65535).
    max_targets: T, the padded number of targets.

  Returns:
    (classes int32 [T], masks float32 [T, H, W]).

  Raises:
    ValueError: more classes in the image than `max_targets`.
  """
  label = np.asarray(label)
  classes = np.unique(label)
  classes = classes[classes != ignore_label]
  if len(classes) > max_targets:
    raise ValueError(f"label map has {len(classes)} classes, more than max_targets="
                     f"{max_targets}; raise max_targets")
  out_classes = np.full((max_targets,), -1, np.int32)
  out_masks = np.zeros((max_targets,) + label.shape, np.float32)
  out_classes[:len(classes)] = classes
  for k, c in enumerate(classes):
    out_masks[k] = label == c
  return out_classes, out_masks


# ------------------------------------------------------------------------------------------
# Registration with the dense evaluator.


def _get(data, key, default):
  try:
    value = data[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def source_from_config(data) -> DetectronSemSegSource:
  """The source of a data block: data.dataset (a benchmark), data.root, data.split ('test'),
  data.max_images (0 = all)."""
  return DetectronSemSegSource(str(data["dataset"]), str(_get(data, "root", "")),
                               str(_get(data, "split", "test")),
                               max_images=int(_get(data, "max_images", 0)))


def register() -> None:
  """Registers the six benchmarks with `fssjax.evaluators.register_dense_source` (done on
  import; calling again is harmless)."""
  from fssjax import evaluators  # pylint: disable=import-outside-toplevel
  for name in BENCHMARKS:
    evaluators.register_dense_source(name, source_from_config)


register()
