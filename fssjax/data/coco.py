"""COCO-format segmentation sources (COCO-20i, the synthetic benchmark; LVIS builds on this).

`CocoSource` reads an instances JSON (images, annotations with polygon / RLE segmentations,
categories) and an image folder. Class ids are 0-based indices of the categories sorted by
category id; records are the images sorted by image id.

Indexing. The JSON is parsed once (orjson when it is installed, else the standard json module;
pycocotools' `COCO()` constructor is not used: it would re-parse the whole JSON in every
process, while the cached index below loads in milliseconds). No image or mask is decoded. The
index is cached in `cache_dir/<kind>-<file name>-<path hash>-<stamp>/`, the stamp hashing the
annotation file's absolute path, size and mtime_ns: an edited annotation file is re-indexed and
the stale index of that path removed. The folder is written under a temporary name and renamed
into place (atomic). It holds
  * meta.npz: the image table (ids, sizes, file names), the categories, and per image the range
    of its annotation rows;
  * ann_table.npy (one int64 row per annotation: record, class, iscrowd, segmentation kind,
    start, count, RLE height, width), ann_area.npy (the JSON's `area` field),
    ann_mask_area.npy (the decoded area, see Presence), and the segmentations in binary form:
    part_table.npy + coords.npy (polygon parts and uncompressed RLE counts as float64, exact for
    COCO's coordinates) and rle.bin (compressed RLE strings).
The class -> images index (which depends on `crowd` and `min_area`) is computed from
ann_table in numpy at construction. The big arrays are memory-mapped lazily by `load()` in
each process, so a cached source constructs in milliseconds and pickles small (grain workers).
Measured (CPU seconds on this project's shared 2-core machine) with generated instances JSONs of
COCO-like statistics (8-40-vertex polygons, 1% crowd RLE):
  * 605k annotations / 86k images, 338 MB (the size of COCO train2014): json parse 18.4 s, whole
    index build 23.2 s (with orjson 11.2 s / 14.8 s); pycocotools `COCO()` on the same file
    16.8 s. From the cache: construction 0.1 s, pickled source 9.4 MB, one image's annotations
    read in 0.05 ms; the cache folder is 291 MB.
  * 100k annotations, 56 MB: json parse 2.6 s, build 3.3 s (orjson 1.3 s / 2.2 s).

Masks. `load(index, c)` returns the union of the image's class-`c` instance masks (polygons and
RLE decoded with pycocotools.mask, as `COCO.annToMask` does; polygon parts with fewer than 3
vertices are skipped). Crowd annotations (`iscrowd=1`), per `crowd`:
  * 'background' (default, as the published COCO-20i masks): crowd regions are background (0)
    and an image whose only class-`c` annotations are crowd does not list class `c`. PFENet and
    HSNet read COCO-20i from label PNGs made from the instances JSON (HSNet's README links the
    PNGs on Google Drive; PFENet distributes its parsing script off GitHub, issues #8, #20). The
    readable copy, RePRI's data/coco/create_masks.py (mboudiaf/RePRI-for-Few-Shot-Segmentation),
    takes only `coco.getAnnIds(imgIds=..., iscrowd=False)`: crowd regions end up background.
    That script also fills only the first polygon of each instance and lets later instances of
    other classes overwrite earlier ones in one label map; this source uses the exact per-class
    union instead, so its masks can differ from those PNGs on multi-part and overlapping objects.
  * 'ignore': crowd regions of class `c` not covered by a non-crowd instance are 255.
  * 'foreground': crowd regions count as class `c` (and as presence in the index).

Presence. Class `c` is listed for an image only when one of its counted annotations has a
non-empty decoded mask: the area is computed at indexing time by pycocotools from the
annotation alone (`decoded_area`: polygons rasterised at the image size, parts with fewer than
3 points skipped; RLE areas from their counts), so an annotation with an empty segmentation
(`[]`) or only degenerate polygons does not list its image, and no episode trains on an
all-empty mask. (This costs about 35 us per polygon annotation, once, when the index is built.)
`min_area`: class `c` is listed for an image only when the summed decoded area of its counted
annotations is >= min_area (0: any counted annotation with a non-empty mask). PFENet's
filter corresponds to 2048 (2 * 32 * 32 pixels).

Errors. Missing files raise `DataError` naming the file (the factories print the expected
layout when the root is wrong). A corrupt image raises `DataError` naming the file; with
`skip_corrupt=True` the record is skipped instead: `load` counts it in `corrupt_count` (per
process), remembers it, logs a warning, and returns the next readable record of the same class
(cyclically, in `images_with_class` order), raising only when none is readable. An image whose
decoded size differs from the annotation's height/width (or an RLE whose `size` differs from
it) gets its mask resized nearest to the image, the rule of every source
(`fssjax.data.imageio.fit_mask`: logged with the file and both sizes, counted in
`resized_masks`).
Classes with fewer than 2 images (which cannot form an episode) are listed in `rare_classes`
and logged at construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from fssjax.data import imageio
from fssjax.data.base import IGNORE, DataError

try:  # Optional: faster JSON parsing.
  import orjson as _orjson  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment.
  _orjson = None

log = logging.getLogger(__name__)

_FORMAT_VERSION = 3  # 3: ann_mask_area.npy (presence from the decoded annotation area)
_INDEX_FILES = ("meta.npz", "ann_table.npy", "ann_area.npy", "ann_mask_area.npy",
                "part_table.npy", "coords.npy", "rle.bin")
CROWD_MODES = ("background", "ignore", "foreground")


def default_cache_dir() -> str:
  """$FSSJAX_CACHE_DIR/index, else ~/.cache/fssjax/index."""
  base = os.environ.get("FSSJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fssjax")
  return os.path.join(base, "index")


def _json_loads(data: bytes) -> Any:
  if _orjson is not None:
    return _orjson.loads(data)
  return json.loads(data)


def _file_stamp(path: str) -> tuple[str, str]:
  """(hash of the absolute path, hash of path + size + mtime_ns + format version)."""
  apath = os.path.abspath(path)
  st = os.stat(apath)
  path_hash = hashlib.sha256(apath.encode("utf-8")).hexdigest()[:12]
  stamp = f"{apath}|{st.st_size}|{st.st_mtime_ns}|{_FORMAT_VERSION}"
  return path_hash, hashlib.sha256(stamp.encode("utf-8")).hexdigest()[:16]


def segmentation_to_rle(segm: Any, height: int, width: int, where: str) -> dict | None:
  """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE.

  Returns None for an empty polygon list. `where` names the annotation in error messages.
  """
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  if isinstance(segm, list):
    polys = [p for p in segm if len(p) >= 6]
    if not polys:
      return None
    rles = mask_utils.frPyObjects(polys, height, width)
    return mask_utils.merge(rles)
  if isinstance(segm, dict) and "counts" in segm:
    size = [int(s) for s in segm.get("size", ())]
    if size != [height, width]:
      raise DataError(
          f"{where}: RLE size {size} (HxW) differs from the image size "
          f"{[height, width]} (HxW) given in the annotation file")
    counts = segm["counts"]
    if isinstance(counts, list):
      return mask_utils.frPyObjects(segm, height, width)
    if isinstance(counts, str):
      counts = counts.encode("ascii")
    return {"size": [height, width], "counts": counts}
  raise DataError(f"{where}: unsupported segmentation of type {type(segm).__name__}")


def decoded_area(segm: Any, height: int, width: int, where: str) -> int:
  """Pixels of one annotation's decoded mask, from the annotation alone (no image is read).

  Polygons are rasterised at the image's (height, width) by pycocotools (parts with fewer than
  3 points are skipped, as in `load`; an empty list has area 0), RLEs at their own size.

  Raises:
    DataError: a segmentation pycocotools cannot read (names `where`).
  """
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  try:
    if isinstance(segm, list):
      polys = [p for p in segm if len(p) >= 6]
      if not polys:
        return 0
      rles = mask_utils.frPyObjects(polys, height, width)
      rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
      return int(mask_utils.area(rle))
    size = [int(v) for v in segm["size"]]
    counts = segm["counts"]
    if isinstance(counts, list):
      return int(sum(int(v) for v in counts[1::2]))  # uncompressed: odd runs are foreground
    if isinstance(counts, str):
      counts = counts.encode("ascii")
    return int(mask_utils.area({"size": size, "counts": counts}))
  except DataError:
    raise
  except Exception as e:  # pycocotools raises several types on malformed input
    raise DataError(f"{where}: unreadable segmentation ({type(e).__name__}: {e})") from e


def _union_mask(segms: Sequence[Any], height: int, width: int, where: str) -> np.ndarray:
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  rles = [r for r in (segmentation_to_rle(s, height, width, where) for s in segms) if r is not None]
  if not rles:
    return np.zeros((height, width), np.uint8)
  rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=0)
  return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class CocoSource:
  """A COCO-format instances JSON + image folder as a `SegmentationSource`.

  See the module docstring for indexing, caching, mask, crowd and error behaviour.

  Attributes:
    name: source name (for logs and manifests).
    class_names: category names sorted by category id.
    category_ids: the COCO category id of each class id.
    corrupt_count: records skipped as unreadable in this process (skip_corrupt=True).
    built_index: True when this construction parsed the annotation JSON, False when the
      index came from the cache.
    rare_classes: class ids with fewer than 2 images.
  """

  _CACHE_KIND = "coco"

  def __init__(self, image_dir: str, annotation_file: str, *, name: str = "coco",
               cache_dir: str | None = None, crowd: str = "background", min_area: float = 0.0,
               skip_corrupt: bool = False):
    if crowd not in CROWD_MODES:
      raise ValueError(f"crowd={crowd!r}; expected one of {list(CROWD_MODES)}")
    if not os.path.isfile(annotation_file):
      raise DataError(f"Missing annotation file: {annotation_file}")
    if not os.path.isdir(image_dir):
      raise DataError(f"Missing image directory: {image_dir}")
    self.name = name
    self.image_dir = image_dir
    self.annotation_file = annotation_file
    self.crowd = crowd
    self.min_area = float(min_area)
    self.skip_corrupt = bool(skip_corrupt)
    self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    self.corrupt_count = 0
    self.resized_masks = 0
    self._bad: set[int] = set()
    self._store: dict | None = None  # memory-mapped annotation arrays, opened lazily

    self.index_dir, self.built_index = self._load_or_build_index()
    with np.load(os.path.join(self.index_dir, "meta.npz"), allow_pickle=False) as z:
      meta = {k: z[k] for k in z.files}
    self.image_ids = meta["image_ids"]
    self.heights = meta["heights"]
    self.widths = meta["widths"]
    self._file_names = meta["file_names"]
    self._ann_offsets = meta["ann_offsets"]
    self.category_ids = [int(c) for c in meta["category_ids"]]
    self.class_names = [str(n) for n in meta["category_names"]]
    self._class_offsets, self._class_records = self._class_index()
    counts = np.diff(self._class_offsets)
    self.rare_classes = [int(c) for c in np.nonzero(counts < 2)[0]]
    if self.rare_classes:
      log.info("%s: %d of %d classes have fewer than 2 images (no episode possible): %s",
                  self.name, len(self.rare_classes), len(self.class_names),
                  [self.class_names[c] for c in self.rare_classes[:20]])

  # ---------------------------------------------------------------- index

  @staticmethod
  def _relative_file_name(img: dict, where: str) -> str:
    """The image's path relative to `image_dir` (COCO: the `file_name` field)."""
    try:
      return str(img["file_name"])
    except KeyError:
      raise DataError(f"{where}: image entry id={img.get('id')} has no file_name") from None

  def _load_or_build_index(self) -> tuple[str, bool]:
    """Returns (index directory, whether it was built now)."""
    path_hash, stamp = _file_stamp(self.annotation_file)
    prefix = f"{self._CACHE_KIND}-{os.path.basename(self.annotation_file)}-{path_hash}-"
    target = os.path.join(self.cache_dir, prefix + stamp)
    if all(os.path.isfile(os.path.join(target, f)) for f in _INDEX_FILES):
      return target, False
    os.makedirs(self.cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=self.cache_dir, prefix=".tmp-" + prefix)
    try:
      self._build_index(tmp)
      if os.path.isdir(target):  # an incomplete leftover
        shutil.rmtree(target, ignore_errors=True)
      try:
        os.rename(tmp, target)  # atomic: the index appears complete or not at all
      except OSError:
        if not all(os.path.isfile(os.path.join(target, f)) for f in _INDEX_FILES):
          raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    for f in os.listdir(self.cache_dir):  # caches of earlier versions of this file
      if f.startswith(prefix) and f != os.path.basename(target):
        shutil.rmtree(os.path.join(self.cache_dir, f), ignore_errors=True)
    return target, True

  def _build_index(self, out_dir: str) -> None:
    """Parses the annotation JSON and writes the index arrays into `out_dir`."""
    af = self.annotation_file
    try:
      with open(af, "rb") as f:
        data = _json_loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f"Annotation file {af} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
      raise DataError(f"Annotation file {af}: expected a JSON object with images, annotations, "
                      "categories")
    for key in ("images", "annotations", "categories"):
      if key not in data:
        raise DataError(f"Annotation file {af} has no {key!r} key (found {sorted(data)})")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids = [int(c["id"]) for c in cats]
    cat_to_class = {cid: i for i, cid in enumerate(cat_ids)}
    images = sorted(data["images"], key=lambda im: im["id"])
    image_ids = [int(im["id"]) for im in images]
    id_to_record = {iid: r for r, iid in enumerate(image_ids)}
    if len(id_to_record) != len(image_ids):
      raise DataError(f"Annotation file {af} has duplicate image ids")
    file_names = [self._relative_file_name(im, af) for im in images]

    # One row per annotation: record, class, iscrowd, kind, start, count, rle height, width.
    # kind 0: polygon parts part_table[start:start+count] (coordinate offset, length) into
    # coords; 1: compressed RLE bytes rle[start:start+count]; 2: uncompressed RLE counts
    # coords[start:start+count].
    anns = data["annotations"]
    rows: list = []
    areas: list = []
    coords: list = []
    parts: list = []
    rle_chunks: list = []
    mask_areas: list = []
    rle_pos = 0
    image_hw = [(int(im["height"]), int(im["width"])) for im in images]
    for a in anns:
      r = id_to_record.get(a.get("image_id"))
      c = cat_to_class.get(a.get("category_id"))
      if r is None or c is None:
        what = (f"image id {a.get('image_id')!r}" if r is None else
                f"category id {a.get('category_id')!r}")
        raise DataError(
            f"Annotation file {af}: annotation id={a.get('id')} refers to unknown {what}")
      segm = a.get("segmentation")
      crowd = int(a.get("iscrowd", 0))
      areas.append(a.get("area", 0.0))
      if isinstance(segm, (list, dict)) and (isinstance(segm, list) or "counts" in segm and
                                             len(segm.get("size", ())) == 2):
        mask_areas.append(decoded_area(segm, *image_hw[r],
                                       f"Annotation file {af}: annotation id={a.get('id')}"))
      if isinstance(segm, list):
        rows.append((r, c, crowd, 0, len(parts), len(segm), 0, 0))
        for poly in segm:
          parts.append((len(coords), len(poly)))
          coords.extend(poly)
      elif isinstance(segm, dict) and "counts" in segm and len(segm.get("size", ())) == 2:
        h, w = segm["size"]
        counts = segm["counts"]
        if isinstance(counts, list):
          rows.append((r, c, crowd, 2, len(coords), len(counts), h, w))
          coords.extend(counts)
        else:
          b = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
          rows.append((r, c, crowd, 1, rle_pos, len(b), h, w))
          rle_chunks.append(b)
          rle_pos += len(b)
      else:
        raise DataError(f"Annotation file {af}: annotation id={a.get('id')} has no valid "
                        "segmentation (polygon list or RLE dict with counts and size)")
    table = np.array(rows, np.int64).reshape(-1, 8)
    area = np.array(areas, np.float64)
    mask_area = np.array(mask_areas, np.int64)
    del rows, areas, mask_areas
    num_images, num_anns = len(images), len(anns)
    heights = np.array([int(im["height"]) for im in images], np.int32)
    widths = np.array([int(im["width"]) for im in images], np.int32)
    cat_names = [str(c.get("name", c["id"])) for c in cats]
    del data, anns, images, cats
    order = np.argsort(table[:, 0], kind="stable")  # group annotations by record
    table, area, mask_area = table[order], area[order], mask_area[order]
    ann_offsets = np.zeros(num_images + 1, np.int64)
    ann_offsets[1:] = np.cumsum(np.bincount(table[:, 0], minlength=num_images))
    np.save(os.path.join(out_dir, "ann_table.npy"), table)
    np.save(os.path.join(out_dir, "ann_area.npy"), area)
    np.save(os.path.join(out_dir, "ann_mask_area.npy"), mask_area)
    np.save(os.path.join(out_dir, "part_table.npy"), np.array(parts, np.int64).reshape(-1, 2))
    np.save(os.path.join(out_dir, "coords.npy"), np.array(coords, np.float64))
    with open(os.path.join(out_dir, "rle.bin"), "wb") as f:
      f.write(b"".join(rle_chunks))
    np.savez(os.path.join(out_dir, "meta.npz"),
             image_ids=np.array(image_ids, np.int64), heights=heights, widths=widths,
             file_names=np.array([f.encode("utf-8") for f in file_names], dtype=np.bytes_),
             ann_offsets=ann_offsets, category_ids=np.array(cat_ids, np.int64),
             category_names=np.array(cat_names, dtype=np.str_))
    log.info("Indexed %s: %d images, %d annotations, %d categories", af, num_images, num_anns,
             len(cat_ids))

  def _class_index(self) -> tuple[np.ndarray, np.ndarray]:
    """CSR arrays: records of class c are records[offsets[c]:offsets[c+1]] (sorted)."""
    num_classes = len(self.class_names)
    table = np.load(os.path.join(self.index_dir, "ann_table.npy"), mmap_mode="r")
    area = np.load(os.path.join(self.index_dir, "ann_mask_area.npy"), mmap_mode="r")
    counted = np.asarray(area) > 0  # presence from the decoded mask, not the JSON's lists
    if self.crowd != "foreground":
      counted &= table[:, 2] == 0
    key = table[counted, 0] * num_classes + table[counted, 1]
    uniq, inverse = np.unique(key, return_inverse=True)
    if self.min_area > 0:
      summed = np.bincount(inverse, weights=np.asarray(area, np.float64)[counted],
                           minlength=len(uniq))
      uniq = uniq[summed >= self.min_area]
    records, classes = uniq // num_classes, uniq % num_classes
    order = np.lexsort((records, classes))
    records, classes = records[order].astype(np.int64), classes[order]
    offsets = np.zeros(num_classes + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(classes, minlength=num_classes))
    records.setflags(write=False)
    return offsets, records

  # ---------------------------------------------------------------- protocol

  def __len__(self) -> int:
    return len(self.image_ids)

  def images_with_class(self, class_id: int) -> np.ndarray:
    if not 0 <= class_id < len(self.class_names):
      raise ValueError(f"{self.name}: class id {class_id} outside 0..{len(self.class_names) - 1}")
    return self._class_records[self._class_offsets[class_id]:self._class_offsets[class_id + 1]]

  def record_key(self, index: int) -> str:
    return self._file_names[index].decode("utf-8")

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_dir, self.record_key(index))

  def image_key(self, index: int) -> str:
    """The image file (normalised path under `image_dir`): two image entries that name one
    file are one image for the episode samplers."""
    return os.path.normpath(self.record_key(index))

  def classes_with_fewer_than(self, n: int) -> list[int]:
    """Class ids with fewer than `n` images (an episode with K shots needs K + 1)."""
    return [int(c) for c in np.nonzero(np.diff(self._class_offsets) < n)[0]]

  def _open_store(self) -> dict:
    if self._store is None:
      d = self.index_dir
      # Built in a local and published whole: grain's reader threads may race here.
      store = {k: np.load(os.path.join(d, k + ".npy"), mmap_mode="r")
               for k in ("ann_table", "part_table", "coords")}
      rle_path = os.path.join(d, "rle.bin")
      store["rle"] = (np.memmap(rle_path, np.uint8, mode="r")
                      if os.path.getsize(rle_path) else np.zeros(0, np.uint8))
      self._store = store
    return self._store

  def annotations(self, index: int) -> list[tuple[int, int, Any]]:
    """(class_id, iscrowd, segmentation) of record `index`'s annotations, from the index.

    Segmentations come back in COCO form: a list of polygons, or an RLE dict.
    """
    st = self._open_store()
    rows = st["ann_table"][self._ann_offsets[index]:self._ann_offsets[index + 1]]
    out = []
    for _, cls, crowd, kind, start, count, h, w in rows.tolist():
      if kind == 0:
        segm = [st["coords"][s:s + n].tolist()
                for s, n in st["part_table"][start:start + count].tolist()]
      elif kind == 1:
        segm = {"size": [h, w], "counts": st["rle"][start:start + count].tobytes()}
      else:
        segm = {"size": [h, w], "counts": [int(v) for v in st["coords"][start:start + count]]}
      out.append((cls, crowd, segm))
    return out

  def load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], mask uint8 [H,W]: 1 = class_id, 255 = ignore, 0 = other)."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: record {index} outside 0..{len(self) - 1}")
    if not self.skip_corrupt:
      return self._load(index, class_id)
    return imageio.load_skipping_corrupt(
        self, index, class_id, self._read_image,
        lambda r, image: (image, self._mask(r, class_id, image)), log)

  # ---------------------------------------------------------------- internals

  def _read_image(self, index: int) -> np.ndarray:
    return imageio.read_rgb(self.image_path(index))

  def _load(self, index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    image = self._read_image(index)
    return image, self._mask(index, class_id, image)

  def _mask(self, index: int, class_id: int, image: np.ndarray) -> np.ndarray:
    h, w = int(self.heights[index]), int(self.widths[index])
    where = f"{self.annotation_file} image id {int(self.image_ids[index])}"
    fg, crowd = [], []
    for c, is_crowd, segm in self.annotations(index):
      if c != class_id:
        continue
      (crowd if is_crowd else fg).append(segm)
    if self.crowd == "foreground":
      fg, crowd = fg + crowd, []
    mask = self._union(fg, h, w, where)
    if self.crowd == "ignore" and crowd:
      crowd_mask = self._union(crowd, h, w, where)
      mask[(crowd_mask > 0) & (mask == 0)] = IGNORE
    # The annotation's height / width may differ from the decoded image: the shared rule.
    return imageio.fit_mask(mask, image.shape, self.image_path(index), where, self)

  def _union(self, segms: Sequence[Any], h: int, w: int, where: str) -> np.ndarray:
    """Union mask [h, w] of `segms`; an RLE of another size is decoded at its own size and
    resized nearest to (h, w) (`imageio.fit_mask`, counted and logged)."""
    same, other = [], []
    for segm in segms:
      size = segm.get("size") if isinstance(segm, dict) else None
      if size is not None and [int(v) for v in size] != [h, w]:
        other.append(segm)
      else:
        same.append(segm)
    mask = _union_mask(same, h, w, where)
    for segm in other:
      sh, sw = (int(v) for v in segm["size"])
      part = imageio.fit_mask(_union_mask([segm], sh, sw, where), (h, w),
                              f"{where} (image size {h}x{w})", f"{where} RLE of size {sh}x{sw}",
                              self)
      np.maximum(mask, part, out=mask)
    return mask

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_store"] = None  # memory maps are reopened lazily in each process
    return state


# ------------------------------------------------------------------ factories

COCO20I_LAYOUT = """\
Expected COCO-20i layout (COCO 2014):
  {root}/train2014/COCO_train2014_*.jpg
  {root}/val2014/COCO_val2014_*.jpg
  {root}/annotations/instances_train2014.json
  {root}/annotations/instances_val2014.json"""


def _coco_split_dir(split: str) -> str:
  if split == "train":
    return "train2014"
  if split in ("test", "val"):
    return "val2014"
  raise ValueError(f"COCO-20i split {split!r}; valid splits: ['train', 'test'] ('val' = 'test')")


def coco20i_paths(root: str, split: str) -> tuple[str, str, str, list[str]]:
  """(resolved root, image dir, annotation file, missing paths) of a COCO-20i split.

  Accepts the root itself or HSNet's `datapath` holding `COCO2014/`. Cheap: only checks that
  the paths exist.
  """
  sub = _coco_split_dir(split)
  if root and not os.path.isdir(os.path.join(root, "annotations")) and os.path.isdir(
      os.path.join(root, "COCO2014", "annotations")):
    root = os.path.join(root, "COCO2014")  # HSNet's datapath/COCO2014 layout.
  image_dir = os.path.join(root, sub)
  ann = os.path.join(root, "annotations", f"instances_{sub}.json")
  if not root or not os.path.isdir(root):
    return root, image_dir, ann, [os.path.abspath(root) if root else "<data.root is empty>"]
  missing = [os.path.abspath(p) for p in (image_dir, ann) if not os.path.exists(p)]
  return root, image_dir, ann, missing


def coco20i(root: str, split: str, **kwargs) -> CocoSource:
  """COCO-20i source: split 'train' -> train2014, 'test' (or 'val') -> val2014.

  The source indexes all 80 classes; the fold's classes come from
  `fssjax.data.folds.fold_classes('coco20i' or 'coco20i_contiguous', fold, split)`.
  `kwargs` go to `CocoSource` (cache_dir, crowd, min_area, skip_corrupt).
  """
  sub = _coco_split_dir(split)
  root, image_dir, ann, missing = coco20i_paths(root, split)
  if missing:
    raise DataError(f"COCO-20i data not found under root {root!r} (missing: "
                    f"{missing}).\n" + COCO20I_LAYOUT.format(root=root or "<root>"))
  kwargs.setdefault("name", f"coco20i-{sub}")
  return CocoSource(image_dir, ann, **kwargs)


def synthetic(root: str, split: str, **kwargs) -> CocoSource:
  """The generated COCO-format benchmark (fssjax.data.synthetic): 'train' or 'test'/'val'.

  The source's `class_descriptions` (one string per class id) are the generator's exact
  descriptions from descriptions.json.
  """
  from fssjax.data import synthetic as synth  # pylint: disable=import-outside-toplevel

  if split not in ("train", "val", "test"):
    raise ValueError(f"synthetic split {split!r}; valid splits: ['train', 'test'] ('val' = 'test')")
  sub = "train" if split == "train" else "val"
  image_dir = synth.image_dir(root, sub)
  ann = synth.annotation_file(root, sub)
  missing = [p for p in (image_dir, ann) if not os.path.exists(p)]
  if missing:
    raise DataError(
        f"Synthetic benchmark not found under {root!r} (missing: {missing}); create it with "
        "fssjax.data.synthetic.ensure(root). Expected layout:\n"
        f"  {root}/images/{{train,val}}/\n  {root}/annotations/instances_{{train,val}}.json")
  kwargs.setdefault("name", f"synthetic-{sub}")
  source = CocoSource(image_dir, ann, **kwargs)
  if os.path.isfile(synth.descriptions_file(root)):
    described = synth.load_descriptions(root)
    # The exact description of each class (the generator's), for text fields.
    source.class_descriptions = [described.get(cid, {}).get("description")
                                 for cid in source.category_ids]
  return source
