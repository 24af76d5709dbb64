"""Tests of the synthetic benchmark generator: COCO validity, occlusion, determinism, caching."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fssjax.data import synthetic
from fssjax.data.base import DataError

TINY = dict(train=40, val=20, size=64, seed=3)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth") / "set")
  stamp = synthetic.generate(root, workers=1, **TINY)
  return root, stamp


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_layout_and_stamp(tiny_set):
  root, stamp = tiny_set
  assert sorted(os.listdir(root)) == ["STAMP.json", "annotations", "annotations_detectron2",
                                      "descriptions.json", "images"]
  assert synthetic.read_stamp(root) == stamp
  assert stamp["version"] == synthetic.VERSION and stamp["seed"] == 3 and stamp["size"] == 64
  assert stamp["counts"]["train"]["images"] == 40 and stamp["counts"]["val"]["images"] == 20
  for split, n in (("train", 40), ("val", 20)):
    files = sorted(os.listdir(synthetic.image_dir(root, split)))
    assert files == [f"{i:06d}.png" for i in range(n)]
  # STAMP is written last: no other file is newer.
  stamp_time = os.stat(synthetic.stamp_file(root)).st_mtime_ns
  for dirpath, _, files in os.walk(root):
    for f in files:
      assert os.stat(os.path.join(dirpath, f)).st_mtime_ns <= stamp_time


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_loads_and_masks_match_images(tiny_set, split):
  root, stamp = tiny_set
  coco = COCO(synthetic.annotation_file(root, split))
  cats = coco.loadCats(coco.getCatIds())
  assert [c["id"] for c in cats] == list(range(1, 81))
  assert len({c["name"] for c in cats}) == 80
  assert all(c["supercategory"] in synthetic.SHAPES for c in cats)
  img_ids = coco.getImgIds()
  assert len(img_ids) == TINY[split]
  assert len(coco.getAnnIds()) == stamp["counts"][split]["annotations"]
  min_area = synthetic._MIN_VISIBLE_AREA * 64 * 64
  for img_id in img_ids:
    info = coco.loadImgs(img_id)[0]
    with Image.open(os.path.join(synthetic.image_dir(root, split), info["file_name"])) as im:
      assert im.mode == "RGB" and im.size == (info["width"], info["height"]) == (64, 64)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
    assert anns, f"image {img_id} has no annotation"
    assert {a["category_id"] for a in anns} <= set(range(1, 81))
    union = np.zeros((64, 64), np.int32)
    for a in anns:
      assert a["iscrowd"] == 0
      m = coco.annToMask(a)
      assert m.shape == (info["height"], info["width"])
      assert m.sum() == a["area"] >= min_area
      ys, xs = np.nonzero(m)
      assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      union += m
    # Visible parts only: annotations of one image never overlap.
    assert union.max() == 1


def test_rendered_classes_follow_the_plan(tiny_set):
  root, _ = tiny_set
  for split in ("train", "val"):
    coco = COCO(synthetic.annotation_file(root, split))
    for index, img_id in enumerate(sorted(coco.getImgIds())):
      got = {a["category_id"] - 1 for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))}
      assert got == set(synthetic.image_categories(TINY["seed"], split, index))


def test_occlusion_annotates_visible_parts_only():
  occluded = 0
  for index in range(30):
    image, instances, shapes = synthetic.render_image(5, "train", index, 64, with_shapes=True)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    # Each instance's visible mask = its shape minus every shape drawn after it.
    visible = iter(instances)
    for i, (cls, full) in enumerate(shapes):
      if cls < 0:
        continue
      got_cls, vis = next(visible)
      assert got_cls == cls
      later = np.zeros_like(full)
      for _, m in shapes[i + 1:]:
        later |= m
      np.testing.assert_array_equal(vis, full & ~later)
      assert vis.sum() >= synthetic._MIN_VISIBLE_FRACTION * full.sum()
      occluded += int(vis.sum() < full.sum())
    assert next(visible, None) is None
  assert occluded >= 5, "occlusion should be common"


def test_shapes_fit_the_render_window():
  # Rendering only looks at pixels within _EXTENT radii of a shape's centre.
  g = np.linspace(-2.0, 2.0, 801)
  u, v = np.meshgrid(g, g)
  extras = {"ellipse": 2.0, "bar": 4.0, "blob": [(0.15, (1.0, 0.0))] * 3}
  for shape in list(synthetic.SHAPES) + list(extras):
    m = synthetic._shape_mask(shape, u, v, extras.get(shape))
    assert 0.2 < m.mean() * 16 < np.pi + 0.01, shape  # area in unit^2: visible, <= the disc
    assert np.sqrt(u ** 2 + v ** 2)[m].max() <= synthetic._EXTENT, shape


def test_distractors_are_drawn_and_unannotated():
  n_distractors = 0
  for index in range(30):
    _, instances, shapes = synthetic.render_image(0, "val", index, 64, with_shapes=True)
    n_distractors += sum(cls < 0 for cls, _ in shapes)
    assert len(instances) == sum(cls >= 0 for cls, _ in shapes)
  assert n_distractors >= 15


def test_same_seed_identical_bytes_any_worker_count_and_other_seed_differs(tiny_set, tmp_path):
  root, _ = tiny_set
  kw = dict(TINY, train=60, val=8)
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, workers=1, **kw)
  synthetic.generate(b, workers=2, **kw)  # two spawned processes, chunks of 50 images
  synthetic.generate(c, workers=1, **dict(kw, seed=4))
  for split in ("train", "val"):
    ja = _read(synthetic.annotation_file(a, split))
    assert ja == _read(synthetic.annotation_file(b, split))
    assert ja != _read(synthetic.annotation_file(c, split))
    for name in sorted(os.listdir(synthetic.image_dir(a, split))):
      assert (_read(os.path.join(synthetic.image_dir(a, split), name))
              == _read(os.path.join(synthetic.image_dir(b, split), name)))
  # The first 40 train images of the seed-3 set are the same whatever the set's size.
  big = json.loads(_read(synthetic.annotation_file(a, "train")))
  small = json.loads(_read(synthetic.annotation_file(root, "train")))
  strip = lambda anns, n: [{k: v for k, v in x.items() if k != "id"} for x in anns
                           if x["image_id"] <= n]
  assert strip(big["annotations"], 40) == strip(small["annotations"], 40)


def test_categories_share_colours_and_cover_folds(tiny_set):
  root, _ = tiny_set
  desc = synthetic.load_descriptions(root)
  assert sorted(desc) == list(range(1, 81))
  users = collections.defaultdict(set)
  for cid, d in desc.items():
    assert len(d["colours"]) >= 2
    assert d["shape"] in d["description"] or d["shape"] == "lshape"
    assert all(c in d["description"] for c in d["colours"])
    lo, hi = d["size_fraction"]
    assert 0.15 <= lo < hi <= 0.5
    for c in d["colours"]:
      users[c].add(cid)
  assert set(users) == set(synthetic.COLOURS)
  # No colour belongs to one category only; in fact each is shared by many.
  assert min(len(v) for v in users.values()) >= 10
  # No palette singles out a category: every category shares each colour with >= 9 others.
  for cid, d in desc.items():
    assert all(len(users[c] - {cid}) >= 9 for c in d["colours"])
  # Shape x texture: all pairs distinct; each interleaved fold (ids - 1 = f + 4v) has every
  # shape twice and every texture at least twice.
  assert len({(d["shape"], d["texture"]) for d in desc.values()}) == 80
  for f in range(4):
    fold = [desc[c + 1] for c in range(f, 80, 4)]
    assert collections.Counter(d["shape"] for d in fold) == {s: 2 for s in synthetic.SHAPES}
    assert set(collections.Counter(d["texture"] for d in fold)) == set(synthetic.TEXTURES)
    assert min(collections.Counter(d["texture"] for d in fold).values()) >= 2
  assert json.loads(_read(synthetic.descriptions_file(root))) == synthetic.descriptions()


def test_default_plan_covers_every_category():
  for split, n in (("train", synthetic.DEFAULTS["train"]), ("val", synthetic.DEFAULTS["val"])):
    images_per_class = np.zeros(80, int)
    n_per_image = []
    for index in range(n):
      classes = synthetic.image_categories(synthetic.DEFAULTS["seed"], split, index)
      assert len(set(classes)) == len(classes) and 1 <= len(classes) <= 3
      images_per_class[classes] += 1
      n_per_image.append(len(classes))
    assert images_per_class.min() >= n // 80
    assert set(n_per_image) == {1, 2, 3}


def test_ensure_reuses_matching_cache_and_rebuilds_stale(tmp_path, monkeypatch, caplog):
  kw = dict(train=12, val=6, size=64, seed=1)
  path = synthetic.ensure(str(tmp_path), workers=1, **kw)
  assert path == os.path.join(str(tmp_path), "synthetic-v1-s1-64-12x6")
  stamp_path = synthetic.stamp_file(path)
  ann_path = synthetic.annotation_file(path, "train")
  before = (os.stat(stamp_path).st_mtime_ns, os.stat(ann_path).st_mtime_ns)
  original = _read(ann_path)

  assert synthetic.ensure(str(tmp_path), workers=1, **kw) == path
  assert (os.stat(stamp_path).st_mtime_ns, os.stat(ann_path).st_mtime_ns) == before

  # A stale stamp (different version) is rebuilt, not reused.
  stamp = json.loads(_read(stamp_path))
  stamp["version"] = 0
  with open(stamp_path, "w") as f:
    json.dump(stamp, f)
  with caplog.at_level("WARNING", logger=synthetic.__name__):
    assert synthetic.ensure(str(tmp_path), workers=1, **kw) == path
  assert "STAMP differs" in caplog.text
  assert synthetic.read_stamp(path)["version"] == synthetic.VERSION
  assert os.stat(ann_path).st_mtime_ns != before[1]
  assert _read(ann_path) == original

  # An incomplete set (no STAMP) is rebuilt too.
  os.unlink(stamp_path)
  os.unlink(ann_path)
  synthetic.ensure(str(tmp_path), workers=1, **kw)
  assert _read(ann_path) == original and synthetic.read_stamp(path) is not None

  # Other settings live in their own directory; no temp dirs are left behind.
  other = synthetic.ensure(str(tmp_path), workers=1, **dict(kw, seed=2))
  assert other != path and synthetic.read_stamp(other)["seed"] == 2
  assert sorted(os.listdir(tmp_path)) == ["synthetic-v1-s1-64-12x6", "synthetic-v1-s2-64-12x6"]

  # Default root from $FSSJAX_DATA.
  monkeypatch.setenv("FSSJAX_DATA", str(tmp_path / "data"))
  assert synthetic.default_root() == str(tmp_path / "data" / "synthetic")
  got = synthetic.ensure(workers=1, **kw)
  assert got == str(tmp_path / "data" / "synthetic" / "synthetic-v1-s1-64-12x6")
  assert _read(synthetic.annotation_file(got, "train")) == original


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown synthetic data set options"):
    synthetic.ensure(str(tmp_path), trian=10)
  with pytest.raises(ValueError, match="unknown synthetic data set options"):
    synthetic.build(str(tmp_path / "x"), seeed=1)
  with pytest.raises(ValueError, match="size must be an int >= 32"):
    synthetic.ensure(str(tmp_path), size=16)
  with pytest.raises(ValueError, match="split must be one of"):
    synthetic.image_dir(str(tmp_path), "test")
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not a synthetic data set"):
    synthetic.build(str(foreign), train=4, val=2, size=64)
  assert (foreign / "notes.txt").read_text() == "keep me"
  (tmp_path / "descriptions.json").write_text("{\"cats\": []}")
  with pytest.raises(DataError, match="descriptions.json"):
    synthetic.load_descriptions(str(tmp_path))


def test_cli(tmp_path):
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "fssjax.data.synthetic", "--out", out, "--train", "6", "--val",
         "3", "--size", "48", "--seed", "7", "--workers", "1"]
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert "done in" in res.stdout and "MiB" in res.stdout
  stamp = synthetic.read_stamp(out)
  assert stamp["seed"] == 7 and stamp["size"] == 48 and stamp["counts"]["val"]["images"] == 3
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert "up to date" in res.stdout


def test_generation_logs_progress_with_rate_and_eta(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(synthetic, "PROGRESS_SECONDS", 0.0)  # a line per chunk of 50 images
  with caplog.at_level("INFO"):
    synthetic.ensure(str(tmp_path), workers=1, train=60, val=2, size=32, seed=0)
  lines = [r.getMessage() for r in caplog.records if "synthetic train:" in r.getMessage()]
  assert len(lines) == 2, lines
  assert lines[0].startswith("synthetic train: 50/60 images (83%)")
  assert "images/s" in lines[0] and "ETA 0:00:0" in lines[0]
  assert lines[1].startswith("synthetic train: 60/60 images (100%)")
  assert any("Generating the synthetic benchmark (60 train + 2 val images of 32 px" in
             r.getMessage() for r in caplog.records)


def test_a_mistyped_root_never_generates_a_second_copy(tmp_path, monkeypatch):
  from fssjax.configlib import base_config
  from fssjax.data import sources

  monkeypatch.setenv("FSSJAX_CACHE_DIR", str(tmp_path / "cache"))
  cache = tmp_path / "sets"
  cache.mkdir()
  kw = dict(train=4, val=4, size=32, seed=0)
  made = synthetic.ensure(str(cache), workers=1, **kw)

  def data(root):
    d = base_config().data
    d.dataset, d.root = "synthetic", root
    return d

  typo = str(tmp_path / "sest")  # does not exist
  with pytest.raises(DataError, match=r"data.root='.*sest' does not exist .*nothing was "
                                      r"generated.*data.root=''"):
    sources.build_source(data(typo), "test")
  assert not os.path.exists(typo)
  assert sources.missing_inputs(data(typo)) and "does not exist" in sources.missing_inputs(
      data(typo))[0]
  other = tmp_path / "coco"  # an existing, non-empty directory without sets
  other.mkdir()
  (other / "annotations").mkdir()
  with pytest.raises(DataError, match=r"neither a synthetic set nor a cache directory of sets "
                                      r"\(it holds: annotations\)"):
    sources.build_source(data(str(other)), "test")
  assert os.listdir(other) == ["annotations"]
  # Accepted: a set's own directory, and an existing directory of sets (or an empty one).
  assert sources.missing_inputs(data(made)) == [] == sources.missing_inputs(data(str(cache)))
  assert synthetic.check_data_root("") is None
  empty = tmp_path / "empty"
  empty.mkdir()
  assert synthetic.check_data_root(str(empty)) is None
  assert sources.build_source(data(made), "test").image_dir.startswith(made)
