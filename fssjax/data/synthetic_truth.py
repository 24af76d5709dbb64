"""Dense labels and exact per-image descriptions of the embedded benchmark, from its ground truth.

The generator (`fssjax.data.synthetic.render_truth`) knows, for every drawn shape, its class
(or -1 for a distractor), the colours it was painted with, its whole mask and the part left
visible by the shapes drawn after it. From that this module writes, per image:

  * a **label map** (uint8 [H, W]): the 0-based category index (COCO id - 1, 0..79) of the
    front-most shape at each pixel; `IGNORE` (255) where no category is visible (the
    background and the distractor shapes, which belong to no category). Occlusion order is
    respected: a pixel belongs to the last-drawn shape that covers it (the visible masks of
    `render_truth`, which never overlap), so it is exactly the union of the COCO annotations.
  * an exact **scene**: its objects (the category instances, in drawing order, back to
    front), their attributes and the relations between them, as structured JSON and as a
    description text of the kind a multimodal LLM writes.

Rules (ours; every word is computed from the true masks, nothing is measured on pixels):

  * name: the category name ("striped star"); object noun = the shape word ("star",
    "L-shape"); texture word = the category's texture adjective ("striped", "bullseye");
  * colours: the colours the instance was painted with (names of `synthetic.COLOURS`), main
    colour first; one for the solid texture, two for the others;
  * size: visible area / image area: < 2% 'tiny', < 6% 'small', < 15% 'medium', else 'large'
    (`fssjax.data.captions.size_word`); position: the visible centroid's cell of a 3 x 3 grid
    (`captions.position_word`);
  * spatial relation of each pair (i, j), i drawn before j, subject i: the offset of the
    visible-mask centroids (x right, y down, pixels, rounded to 3 decimals); none when both
    |dx| and |dy| are below `MARGIN` x the image side; else along the dominant axis
    (|dx| >= |dy|: horizontal) 'left of' (dx > 0) / 'right of', or 'above' (dy > 0) /
    'below';
  * 'overlaps': the two whole (unoccluded) masks share a pixel; the subject is the one in front
    (drawn later), which hides part of the other;
  * text: "There is a [<twin>] <size> <colour>[ and <colour>] <texture word> <shape>." per
    object, then "The <ref> is <relation> the <ref>." / "The <ref> overlaps the <ref>." per
    relation, where <ref> is the first of (texture word), (size, texture word), (main colour,
    texture word), (second colour, texture word), (size, main colour, texture word), (all
    attributes) + shape whose words no other object of the image with that shape also has (so a
    scene-graph parser links each definite mention to one object);
  * twins (objects of one image with the same shape and the same set of attributes: same
    class, size word and colours, in any order) get a first attribute <twin> from their
    visible centroids along the axis where they spread most: 'left' / 'right' (/ 'left' /
    'middle' / 'right' for three) or 'upper' / 'lower' (/ 'upper' / 'middle' / 'lower'), in
    the text and in the priors, so every reference names one object.

The priors (`priors_json`, the JSON of `fssjax.priors.scene_graph.ScenePriors`): one object
per instance with name = the shape word (lower-case, as the parser writes nouns) and
attributes = ([twin], size, colours..., texture word), and the relations above. The project's
parser (`SceneGraphParser(attribute_words=COLOUR_WORDS | ATTRIBUTE_WORDS)`) reads the text
back into exactly these priors for 186 of the first 200 validation images (seed 0); the
misses are spaCy chunking a colour as a noun.

Layout written next to the COCO-format output (detectron2's semantic-segmentation layout):

  DIR/annotations_detectron2/{train,val}/000000.png   label maps (uint8, 255 = no category)
  DIR/annotations/scenes_{train,val}.json             {"info": {...}, "images": [scene, ...]}

A scene: {"id" (the COCO image id), "file_name", "label_file", "objects": [{"category_id",
"name", "shape", "texture", "noun", "texture_word", "colours", "size", "twin" (twins only),
"area", "area_fraction", "bbox" (COCO [x, y, w, h] of the visible part), "centroid" ([x, y]
of the visible part, pixels), "position", "depth" (drawing order among all drawn shapes, distractors
included), "reference"}], "relations": [{"subject", "relation", "object"}], "description",
"priors"}.

Sets generated before this module existed lack these files: `ensure_dense(root)` renders the
images again from the set's seed (same pixels, same truth) and adds them.

Open-vocabulary split (`SEEN` / `UNSEEN`): the 80 categories are the 10 x 8 (shape, texture)
pairs; the 20 with (texture index - shape index) mod 8 in {3, 7} (orders of `synthetic.SHAPES`
and `synthetic.TEXTURES`) are held out as unseen names: every shape and every texture word
still occurs in the 60 seen names (each shape in 6, each texture in 7 or 8), so an unseen name is
a new combination of known words ("dotted circle": dotted stars and solid circles are seen).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from fssjax import utils
from fssjax.data import captions
from fssjax.data import synthetic
from fssjax.data.base import DataError

IGNORE = 255  # label value of pixels of no category (background, distractors)
MARGIN = 0.08  # of the image side: smaller centroid offsets give no spatial relation
LABEL_DIR = "annotations_detectron2"
UNSEEN_OFFSETS = (3, 7)  # (texture index - shape index) mod 8 of the unseen categories
RELATIONS = ("left of", "right of", "above", "below", "overlaps")
_TWIN_WORDS = {("x", 2): ("left", "right"), ("y", 2): ("upper", "lower"),
               ("x", 3): ("left", "middle", "right"), ("y", 3): ("upper", "middle", "lower")}
# Every attribute word of the descriptions (colours, texture adjectives, size words, twin
# words): a parser should keep them as attributes (`SceneGraphParser(attribute_words=...)`).
ATTRIBUTE_WORDS = frozenset(
    list(synthetic.COLOURS) + [adj for adj, _ in synthetic.TEXTURES.values()]
    + [w for _, w in captions.SIZES] + [w for ws in _TWIN_WORDS.values() for w in ws])


# ----------------------------------------------------------------------------------------------
# Open-vocabulary split.


def is_unseen(cat: synthetic.Category) -> bool:
  """Whether a category's name is held out of training (see the module docstring)."""
  s = list(synthetic.SHAPES).index(cat.shape)
  t = list(synthetic.TEXTURES).index(cat.texture)
  return (t - s) % len(synthetic.TEXTURES) in UNSEEN_OFFSETS


def class_split(which: str) -> tuple[int, ...]:
  """0-based category indices of 'seen' (60), 'unseen' (20) or 'all' (80), in id order.

  Raises:
    ValueError: another value.
  """
  cats = synthetic.categories()
  if which == "all":
    return tuple(range(len(cats)))
  if which == "seen":
    return tuple(c.id - 1 for c in cats if not is_unseen(c))
  if which == "unseen":
    return tuple(c.id - 1 for c in cats if is_unseen(c))
  raise ValueError(f"class split {which!r}: expected 'seen', 'unseen' or 'all'")


# The class names of each side of the split, in category-id order.
SEEN: tuple[str, ...] = tuple(synthetic.categories()[c].name for c in class_split("seen"))
UNSEEN: tuple[str, ...] = tuple(synthetic.categories()[c].name for c in class_split("unseen"))


# ----------------------------------------------------------------------------------------------
# Paths.


def label_dir(root: str, split: str) -> str:
  """Directory of the label maps of `split` (file names as the images', '.png')."""
  synthetic.image_dir(root, split)  # checks the split
  return os.path.join(root, LABEL_DIR, split)


def label_file(root: str, split: str, index: int) -> str:
  return os.path.join(label_dir(root, split), f"{index:06d}.png")


def scenes_file(root: str, split: str) -> str:
  """The per-image descriptions of `split`: annotations/scenes_{split}.json."""
  synthetic.image_dir(root, split)
  return os.path.join(root, "annotations", f"scenes_{split}.json")


def has_dense(root: str, split: str) -> bool:
  """Whether `split` of the set at `root` has its dense files (the scenes file is written
  after all label maps)."""
  return os.path.isfile(scenes_file(root, split))


# ----------------------------------------------------------------------------------------------
# One image.


def label_map(shapes: Sequence[synthetic.DrawnShape], size: int) -> np.ndarray:
  """uint8 [size, size]: category index of the front-most shape, `IGNORE` elsewhere."""
  label = np.full((size, size), IGNORE, np.uint8)
  for s in shapes:
    if s.cls >= 0:
      label[s.visible] = s.cls
  return label


def _article(phrase: str) -> str:
  return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _centroid(mask: np.ndarray) -> tuple[float, float]:
  ys, xs = np.nonzero(mask)
  return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def relations(objects: Sequence[dict], whole: Sequence[np.ndarray], size: int,
              margin: float = MARGIN) -> list[dict]:
  """The relations of every pair (see the module docstring), pairs in object order.

  Args:
    objects: object records with 'centroid' ([x, y] of the visible part) and 'depth'.
    whole: each object's unoccluded mask.
    size: image side (pixels).
  """
  out = []
  for i in range(len(objects)):
    for j in range(i + 1, len(objects)):
      (xi, yi), (xj, yj) = objects[i]["centroid"], objects[j]["centroid"]
      dx, dy = xj - xi, yj - yi
      if max(abs(dx), abs(dy)) >= margin * size:
        if abs(dx) >= abs(dy):
          rel = "left of" if dx > 0 else "right of"
        else:
          rel = "above" if dy > 0 else "below"
        out.append({"subject": i, "relation": rel, "object": j})
      if np.any(whole[i] & whole[j]):
        front, back = (j, i) if objects[j]["depth"] > objects[i]["depth"] else (i, j)
        out.append({"subject": front, "relation": "overlaps", "object": back})
  return out


def _attributes(o: dict) -> list[str]:
  return ([o["twin"]] if o.get("twin") else []) + [o["size"], *o["colours"], o["texture_word"]]


def _phrase(o: dict) -> str:
  """'[twin word] size colour[ and colour] texture noun'."""
  twin = [o["twin"]] if o.get("twin") else []
  return " ".join(twin + [o["size"], " and ".join(o["colours"]), o["texture_word"], o["noun"]])


def _mark_twins(objects: Sequence[dict]) -> None:
  """Sets o['twin'] of objects whose noun and attributes are identical (module docstring)."""
  groups: dict[tuple, list[int]] = {}
  for k, o in enumerate(objects):
    groups.setdefault((o["noun"], frozenset(_attributes(o))), []).append(k)
  for members in groups.values():
    if len(members) < 2:
      continue
    xs = [objects[k]["centroid"][0] for k in members]
    ys = [objects[k]["centroid"][1] for k in members]
    axis = "x" if max(xs) - min(xs) >= max(ys) - min(ys) else "y"
    key = xs if axis == "x" else ys
    order = sorted(range(len(members)), key=lambda m: (key[m], m))
    words = _TWIN_WORDS.get((axis, len(members)))
    for rank, m in enumerate(order):
      # More than three twins cannot happen (at most three instances per class).
      objects[members[m]]["twin"] = words[rank] if words else f"number {rank + 1}"


def _references(objects: Sequence[dict]) -> list[str]:
  """The shortest unambiguous definite reference of each object (module docstring)."""
  out = []
  for i, o in enumerate(objects):
    size, main, tex, twin = o["size"], o["colours"][0], o["texture_word"], o.get("twin")
    cands = [(tex,), (size, tex), (main, tex), (o["colours"][-1], tex), (size, main, tex)]
    if twin:
      cands = [(twin, tex), (twin, size, tex), (twin, main, tex), (twin, size, main, tex)]
    ref = _phrase(o)  # all attributes: unique once twins are marked
    for cand in cands:
      hits = [k for k, p in enumerate(objects)
              if p["noun"] == o["noun"] and set(cand) <= set(_attributes(p))]
      if hits == [i]:
        ref = " ".join(cand + (o["noun"],))
        break
    out.append(ref)
  return out


def describe(objects: Sequence[dict], rels: Sequence[dict]) -> str:
  """The description text of a scene (module docstring)."""
  parts = []
  for o in objects:
    parts.append(f"There is {_article(_phrase(o))}.")
  refs = [o["reference"] for o in objects]
  for r in rels:
    s, t = refs[r["subject"]], refs[r["object"]]
    if r["relation"] == "overlaps":
      parts.append(f"The {s} overlaps the {t}.")
    else:
      parts.append(f"The {s} is {r['relation']} the {t}.")
  return " ".join(parts)


def priors_json(objects: Sequence[dict], rels: Sequence[dict], text: str) -> dict[str, Any]:
  """The exact priors in the JSON of `fssjax.priors.scene_graph.ScenePriors.to_json`."""
  return {"text": text,
          "objects": [{"name": o["noun"].lower(), "attributes": _attributes(o),
                       "span": _article(_phrase(o))}
                      for o in objects],
          "relations": [dict(r) for r in rels]}


def scene(shapes: Sequence[synthetic.DrawnShape], size: int,
          margin: float = MARGIN) -> dict[str, Any]:
  """The exact scene of one image: {'objects', 'relations', 'description', 'priors'}."""
  cats = synthetic.categories()
  objects, whole = [], []
  for s in shapes:
    if s.cls < 0 or not s.visible.any():
      continue
    cat = cats[s.cls]
    rows = s.visible.sum(axis=1, dtype=np.int64)  # projections: faster than np.nonzero
    cols = s.visible.sum(axis=0, dtype=np.int64)
    area = int(rows.sum())
    coord = np.arange(size, dtype=np.int64)
    cx = float(int(cols @ coord) / area + 0.5)  # = xs.mean() + 0.5 exactly (integer sums)
    cy = float(int(rows @ coord) / area + 0.5)
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    # captions.size_word / position_word, from the numbers computed here.
    size_word = next(word for bound, word in captions.SIZES if area / float(size * size) < bound)
    position = captions.POSITIONS[min(int(3 * cy / size), 2)][min(int(3 * cx / size), 2)]
    objects.append({
        "category_id": cat.id, "name": cat.name, "shape": cat.shape, "texture": cat.texture,
        "noun": "L-shape" if cat.shape == "lshape" else cat.shape,
        "texture_word": synthetic.TEXTURES[cat.texture][0], "colours": list(s.colours),
        "size": size_word, "area": area,
        "area_fraction": round(area / float(size * size), 6),
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
        "centroid": [round(cx, 3), round(cy, 3)], "position": position,
        "depth": int(s.depth)})
    whole.append(s.mask)
  rels = relations(objects, whole, size, margin)
  _mark_twins(objects)
  for o, ref in zip(objects, _references(objects)):
    o["reference"] = ref
  text = describe(objects, rels)
  return {"objects": objects, "relations": rels, "description": text,
          "priors": priors_json(objects, rels, text)}


def image_scene(seed: int, split: str, index: int, size: int = 128) -> dict[str, Any]:
  """`scene` of image `index` of `split` (rendered with `synthetic.render_truth`)."""
  _, shapes = synthetic.render_truth(seed, split, index, size)
  return scene(shapes, size)


def encode_label(label: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(label, np.uint8), mode="L").save(buf, format="PNG",
                                                               compress_level=1)
  return buf.getvalue()


def image_record(shapes: Sequence[synthetic.DrawnShape], size: int, index: int,
                 image_id: int, file_name: str) -> tuple[bytes, dict[str, Any]]:
  """(label map PNG bytes, scene record) of one image, as the generator writes them."""
  rec = {"id": int(image_id), "file_name": file_name, "label_file": f"{index:06d}.png"}
  rec.update(scene(shapes, size))
  return encode_label(label_map(shapes, size)), rec


def scenes_info(seed: int, size: int, split: str) -> dict[str, Any]:
  return {"generator": synthetic.GENERATOR, "version": synthetic.VERSION, "seed": int(seed),
          "size": int(size), "split": split, "ignore_label": IGNORE, "margin": MARGIN,
          "rules": "fssjax.data.synthetic_truth module docstring"}


def write_scenes(root: str, split: str, seed: int, size: int,
                 records: Sequence[dict[str, Any]]) -> None:
  utils.atomic_write_json(scenes_file(root, split),
                          {"info": scenes_info(seed, size, split), "images": list(records)},
                          separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# Reading, and adding the files to an older set.


def load_scenes(root: str, split: str) -> list[dict[str, Any]]:
  """The scene records of `split` (index order).

  Raises:
    DataError: the file is missing or not a scenes file.
  """
  path = scenes_file(root, split)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    images = data["images"]
    if not isinstance(images, list) or not all("objects" in r for r in images):
      raise ValueError("'images' is not a list of scene records")
    return images
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: expected the scene descriptions of the embedded benchmark "
                    f"(a JSON object with an 'images' list of records with 'objects'); "
                    f"{type(e).__name__}: {e}. Regenerate the set or run "
                    f"`python -m fssjax.data.synthetic_truth --root DIR`") from e


def load_label(root: str, split: str, index: int) -> np.ndarray:
  """uint8 [H, W] label map of image `index` (values 0..79, 255 = no category)."""
  path = label_file(root, split, index)
  try:
    with Image.open(path) as im:
      return np.asarray(im, np.uint8)
  except OSError as e:
    raise DataError(f"{path}: cannot read the label map ({e}); expected a uint8 PNG written "
                    "by the embedded-benchmark generator") from e


def ensure_dense(root: str, splits: Sequence[str] = ("train", "val")) -> None:
  """Adds the label maps and scenes of `splits` to a generated set that lacks them.

  The images are rendered again from the set's STAMP (seed, size, counts): same pixels and
  truth as when the set was made. Each split is written into a temporary folder and renamed,
  then the scenes file (the completion mark) is written.

  Raises:
    DataError: `root` is not a generated set (no STAMP.json with the generator parameters).
  """
  stamp = synthetic.read_stamp(root)
  if not stamp or stamp.get("generator") != synthetic.GENERATOR or "seed" not in stamp:
    raise DataError(f"{root}: not a generated embedded benchmark (no STAMP.json of "
                    f"{synthetic.GENERATOR}); generate one with `python -m fssjax.data.synthetic "
                    "--out DIR`")
  seed, size = int(stamp["seed"]), int(stamp["size"])
  for split in splits:
    if has_dense(root, split):
      continue
    n = int(stamp[split])
    t0 = time.time()
    parent = os.path.join(root, LABEL_DIR)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{split}.tmp-")
    try:
      records = []
      base = synthetic.SPLITS[split] * 10_000_000
      ext = stamp.get("image_format", "png")
      for index in range(n):
        _, shapes = synthetic.render_truth(seed, split, index, size)
        png, rec = image_record(shapes, size, index, base + index + 1, f"{index:06d}.{ext}")
        with open(os.path.join(tmp, rec["label_file"]), "wb") as f:
          f.write(png)
        records.append(rec)
      final = label_dir(root, split)
      if os.path.exists(final):
        shutil.rmtree(final)
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    write_scenes(root, split, seed, size, records)
    synthetic.log.info("added dense labels and scenes of %s/%s (%d images) in %.1f s", root,
                       split, n, time.time() - t0)


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m fssjax.data.synthetic_truth",
      description="Add dense label maps and exact scene descriptions to a generated set that "
                  "lacks them (sets generated now have them already).")
  parser.add_argument("--root", required=True, help="a generated set's directory")
  args = parser.parse_args(argv)
  try:
    ensure_dense(args.root)
  except DataError as e:
    print(f"error: {e}")
    return 2
  print(f"{args.root}: dense labels and scenes present")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
