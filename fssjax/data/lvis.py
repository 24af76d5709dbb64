"""LVIS v1 sources and the LVIS-92i folds.

LVIS v1 annotations (`lvis_v1_train.json`, `lvis_v1_val.json`) are COCO-format instances files
over the COCO 2017 images; image entries carry a `coco_url` instead of a `file_name`, and the
val images come from both train2017 and val2017. `LvisSource` is a `CocoSource` whose image path
is the last two components of `coco_url` (e.g. `train2017/000000391895.jpg`) under the root.
Masks are the union of the class's polygon annotations (pycocotools); LVIS has no crowd
annotations. Class ids index the 1203 categories sorted by id.

LVIS-92i (Matcher, aim-uofa/Matcher matcher/data/lvis.py, `build_img_metadata_classwise`):
  * val classes = the classes of the val annotations with more than `shot` images
    (`len(val_anno[c]) > shot`), in category order;
  * n = len(val classes) // 10 classes per fold; fold f tests `val_classes[f + 10 * v]`,
    v = 0..n-1 (about 92 per fold, hence the name);
  * train classes = every class of the train annotations that fold f does not test;
  * evaluation draws 2300 episodes, cycling classes `idx % n` (Matcher's data/lvis.py).
Matcher reads preprocessed pickles (`lvis_train.pkl`, `lvis_val.pkl`: class -> image ->
annotations) whose construction script is not published; here they are rebuilt from the official
JSON files, so fold membership follows the rule above over the classes that actually have
> `shot` val images. With shot=5 fewer classes qualify and the folds change (Matcher issue #10).
"""

from __future__ import annotations

import os

from fssjax.data import folds
from fssjax.data.base import DataError
from fssjax.data.coco import CocoSource

LVIS_LAYOUT = """\
Expected LVIS-92i layout (LVIS v1 over COCO 2017 images):
  {root}/lvis_v1_train.json   (or {root}/annotations/lvis_v1_train.json)
  {root}/lvis_v1_val.json     (or {root}/annotations/lvis_v1_val.json)
  {root}/train2017/*.jpg
  {root}/val2017/*.jpg"""


class LvisSource(CocoSource):
  """An LVIS v1 annotation file + the COCO 2017 image folders under `image_root`."""

  _CACHE_KIND = "lvis"

  @staticmethod
  def _relative_file_name(img: dict, where: str) -> str:
    url = img.get("coco_url")
    if url:
      parts = str(url).rstrip("/").split("/")
      if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    name = img.get("file_name")
    if name:
      return str(name)
    raise DataError(f"{where}: image entry id={img.get('id')} has neither coco_url nor file_name")


def _lvis_split(split: str) -> str:
  if split == "train":
    return "train"
  if split in ("test", "val"):
    return "val"
  raise ValueError(f"LVIS-92i split {split!r}; valid splits: ['train', 'test'] ('val' = 'test')")


def annotation_file(root: str, split: str) -> str:
  """Path of lvis_v1_{train,val}.json under root (or root/annotations)."""
  name = f"lvis_v1_{_lvis_split(split)}.json"
  for cand in (os.path.join(root, name), os.path.join(root, "annotations", name)):
    if os.path.isfile(cand):
      return cand
  raise DataError(f"LVIS annotation file {name} not found under root {root!r}.\n" +
                  LVIS_LAYOUT.format(root=root or "<root>"))


def lvis92i(root: str, split: str, **kwargs) -> LvisSource:
  """LVIS-92i source: 'train' -> lvis_v1_train.json, 'test' (or 'val') -> lvis_v1_val.json.

  The source indexes all 1203 classes; fold classes come from `lvis92i_fold_classes`.
  `kwargs` go to `CocoSource` (cache_dir, min_area, skip_corrupt).
  """
  if not root or not os.path.isdir(root):
    raise DataError(f"LVIS root {root!r} does not exist.\n" +
                    LVIS_LAYOUT.format(root=root or "<root>"))
  ann = annotation_file(root, split)
  kwargs.setdefault("name", f"lvis92i-{_lvis_split(split)}")
  return LvisSource(root, ann, **kwargs)


def eligible_classes(val_source: CocoSource, shot: int = 1) -> list[int]:
  """Val classes with more than `shot` images, in category order (the LVIS-92i class pool)."""
  return [c for c in range(len(val_source.class_names))
          if len(val_source.images_with_class(c)) > shot]


def lvis92i_fold_classes(root: str, fold: int, split: str, *, shot: int = 1,
                         cache_dir: str | None = None,
                         val_source: CocoSource | None = None,
                         train_source: CocoSource | None = None) -> list[int]:
  """Sorted class ids of LVIS-92i `fold` for split 'train' (base) or 'test' (novel).

  Reads (and caches) the val index, and for 'train' the train index, unless the sources are
  given.
  """
  if split not in ("train", "test"):
    raise ValueError(f"LVIS-92i split {split!r}; valid splits: ['train', 'test']")
  if val_source is None:
    val_source = lvis92i(root, "test", cache_dir=cache_dir)
  eligible = eligible_classes(val_source, shot)
  if split == "test":
    return folds.fold_classes("lvis92i", fold, "test", eligible=eligible)
  if train_source is None:
    train_source = lvis92i(root, "train", cache_dir=cache_dir)
  base_pool = [c for c in range(len(train_source.class_names))
               if len(train_source.images_with_class(c)) > 0]
  return folds.fold_classes("lvis92i", fold, "train", eligible=eligible, base_pool=base_pool)
