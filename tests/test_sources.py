"""Tests of the data sources on real files written in each data set's own layout.

COCO (instances JSON with polygon, compressed and uncompressed RLE and crowd annotations; PNG
and JPEG images), PASCAL VOC (JPEGImages + palette / greyscale label PNGs with 255 borders +
image lists or HSNet split files), FSS-1000 (class folders) and LVIS (coco_url image paths).
Masks are checked pixel-exactly against what was drawn, or, for polygons, against pycocotools'
own `COCO.annToMask`.
"""

import json
import logging
import os
import pickle
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fssjax.configlib import base_config
from fssjax.data import coco, folds, fss1000, imageio, lvis, pascal, sources, synthetic
from fssjax.data import fss1000_splits
from fssjax.data.base import IGNORE, DataError, SegmentationSource

RNG = np.random.default_rng(0)


def _rand_image(h, w):
  return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box(h, w, r0, r1, c0, c1):
  m = np.zeros((h, w), np.uint8)
  m[r0:r1, c0:c1] = 1
  return m


def _rle_uncompressed(mask):
  """COCO uncompressed RLE, written out by hand: column-major runs starting with zeros."""
  flat = mask.flatten(order="F")
  counts, cur, run = [], 0, 0
  for v in flat:
    if v == cur:
      run += 1
    else:
      counts.append(run)
      cur, run = v, 1
  counts.append(run)
  return {"size": list(mask.shape), "counts": counts}


def _rle_compressed(mask):
  rle = mask_utils.encode(np.asfortranarray(mask))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# ----------------------------------------------------------------------------- COCO

# Records (sorted by image id): 0 = A (id 10), 1 = B (20), 2 = C (30), 3 = D (40), 4 = E (50).
# Classes (sorted by category id): 0 person (1), 1 car (3), 2 airplane (5).
SIZES = {10: (20, 30), 20: (16, 24), 30: (12, 12), 40: (10, 14), 50: (8, 8)}
FILES = {10: "a.png", 20: "b.jpg", 30: "c.png", 40: "d.png", 50: "e.png"}
M_PERSON2 = _box(20, 30, 12, 16, 20, 28)
M_CROWD_A = _box(20, 30, 0, 5, 10, 30)  # overlaps the person polygon at rows 2..4, cols 10..12
M_CAR_A = _box(20, 30, 10, 20, 0, 6)
M_AIR_B = _box(16, 24, 2, 9, 12, 22)
M_CROWD_C = _box(12, 12, 3, 9, 3, 9)


def _coco_json():
  anns = [
      dict(id=1, image_id=10, category_id=1, iscrowd=0, area=60.0,
           segmentation=[[2, 2, 12, 2, 12, 8, 2, 8]], bbox=[2, 2, 10, 6]),
      dict(id=2, image_id=10, category_id=1, iscrowd=0, area=32.0,
           segmentation=_rle_compressed(M_PERSON2), bbox=[20, 12, 8, 4]),
      dict(id=3, image_id=10, category_id=1, iscrowd=1, area=100.0,
           segmentation=_rle_uncompressed(M_CROWD_A), bbox=[10, 0, 20, 5]),
      dict(id=4, image_id=10, category_id=3, iscrowd=0, area=60.0,
           segmentation=_rle_uncompressed(M_CAR_A), bbox=[0, 10, 6, 10]),
      dict(id=5, image_id=20, category_id=3, iscrowd=0, area=120.0,
           segmentation=[[1, 1, 20, 1, 10, 14]], bbox=[1, 1, 19, 13]),
      dict(id=6, image_id=20, category_id=5, iscrowd=0, area=70.0,
           segmentation=_rle_compressed(M_AIR_B), bbox=[12, 2, 10, 7]),
      dict(id=7, image_id=30, category_id=1, iscrowd=1, area=36.0,
           segmentation=_rle_uncompressed(M_CROWD_C), bbox=[3, 3, 6, 6]),
      dict(id=8, image_id=40, category_id=5, iscrowd=0, area=28.0,
           segmentation=[[1, 1, 5, 1, 5, 5, 1, 5], [8, 6, 12, 6, 12, 9, 8, 9]], bbox=[1, 1, 11, 8]),
      dict(id=9, image_id=40, category_id=3, iscrowd=0, area=2.0,
           segmentation=[[10, 1, 12, 1, 12, 2, 10, 2]], bbox=[10, 1, 2, 1]),
  ]
  images = [dict(id=i, file_name=FILES[i], height=SIZES[i][0], width=SIZES[i][1])
            for i in (30, 10, 50, 20, 40)]  # unsorted on purpose
  cats = [dict(id=5, name="airplane"), dict(id=1, name="person"), dict(id=3, name="car")]
  return dict(images=images, annotations=anns, categories=cats)


def _write_coco(image_dir, ann_file, doc=None):
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.dirname(ann_file), exist_ok=True)
  pixels = {}
  for i, (h, w) in SIZES.items():
    img = _rand_image(h, w)
    path = os.path.join(image_dir, FILES[i])
    Image.fromarray(img).save(path, quality=95) if path.endswith(".jpg") else Image.fromarray(
        img).save(path)
    pixels[i] = np.asarray(Image.open(path).convert("RGB"))
  with open(ann_file, "w") as f:
    json.dump(doc or _coco_json(), f)
  return pixels


@pytest.fixture()
def coco_set(tmp_path):
  image_dir = str(tmp_path / "images")
  ann = str(tmp_path / "annotations" / "instances.json")
  pixels = _write_coco(image_dir, ann)
  return image_dir, ann, pixels, str(tmp_path / "cache")


def _ref_mask(ann_file, ann_ids):
  """Union of pycocotools COCO.annToMask over annotations (the reference path)."""
  api = COCO(ann_file)
  out = None
  for a in api.loadAnns(ann_ids):
    m = api.annToMask(a)
    out = m if out is None else np.maximum(out, m)
  return out.astype(np.uint8)


def test_coco_index_and_masks_pixel_exact(coco_set):
  image_dir, ann, pixels, cache = coco_set
  src = coco.CocoSource(image_dir, ann, cache_dir=cache)
  assert isinstance(src, SegmentationSource)
  assert src.class_names == ["person", "car", "airplane"] and src.category_ids == [1, 3, 5]
  assert len(src) == 5 and [src.record_key(i) for i in range(5)] == [
      "a.png", "b.jpg", "c.png", "d.png", "e.png"]
  # Crowd-only image C does not list person (crowd='background', the published masks).
  assert src.images_with_class(0).tolist() == [0]
  assert src.images_with_class(1).tolist() == [0, 1, 3]
  assert src.images_with_class(2).tolist() == [1, 3]
  assert src.images_with_class(2).dtype == np.int64
  assert src.rare_classes == [0] and src.classes_with_fewer_than(3) == [0, 2]

  image, mask = src.load(0, 0)
  np.testing.assert_array_equal(image, pixels[10])
  poly = _ref_mask(ann, [1])
  assert poly.sum() > 40  # the polygon covers the 10x6 box
  expected = np.maximum(poly, M_PERSON2)
  np.testing.assert_array_equal(mask, expected)
  assert mask.dtype == np.uint8 and mask.shape == (20, 30)
  assert mask[0, 20] == 0  # crowd region is background

  _, car = src.load(0, 1)
  np.testing.assert_array_equal(car, M_CAR_A)  # uncompressed RLE, exact
  image_b, air = src.load(1, 2)
  np.testing.assert_array_equal(image_b, pixels[20])  # JPEG, as PIL decodes it
  np.testing.assert_array_equal(air, M_AIR_B)  # compressed RLE, exact
  _, car_b = src.load(1, 1)
  np.testing.assert_array_equal(car_b, _ref_mask(ann, [5]))
  _, air_d = src.load(3, 2)  # two polygon parts
  np.testing.assert_array_equal(air_d, _ref_mask(ann, [8]))
  assert air_d[:6, :6].sum() > 0 and air_d[6:, 8:].sum() > 0
  _, none = src.load(4, 0)
  assert none.shape == (8, 8) and not none.any()


def test_coco_crowd_modes_and_min_area(coco_set):
  image_dir, ann, _, cache = coco_set
  fg = np.maximum(_ref_mask(ann, [1]), M_PERSON2)

  ign = coco.CocoSource(image_dir, ann, cache_dir=cache, crowd="ignore")
  assert ign.images_with_class(0).tolist() == [0]
  _, m = ign.load(0, 0)
  expected = fg.copy()
  expected[(M_CROWD_A == 1) & (fg == 0)] = IGNORE
  np.testing.assert_array_equal(m, expected)
  assert m[3, 11] == 1  # instance pixels under the crowd region stay foreground

  fore = coco.CocoSource(image_dir, ann, cache_dir=cache, crowd="foreground")
  assert fore.images_with_class(0).tolist() == [0, 2]
  _, m = fore.load(0, 0)
  np.testing.assert_array_equal(m, np.maximum(fg, M_CROWD_A))
  _, m = fore.load(2, 0)
  np.testing.assert_array_equal(m, M_CROWD_C)

  big = coco.CocoSource(image_dir, ann, cache_dir=cache, min_area=10)
  assert big.images_with_class(1).tolist() == [0, 1]  # D's car has area 2
  with pytest.raises(ValueError, match="crowd='people'"):
    coco.CocoSource(image_dir, ann, cache_dir=cache, crowd="people")


def test_coco_index_cache_and_rebuild(coco_set, monkeypatch):
  image_dir, ann, _, cache = coco_set
  first = coco.CocoSource(image_dir, ann, cache_dir=cache)
  assert first.built_index
  (entry,) = os.listdir(cache)
  assert entry.startswith("coco-instances.json-") and first.index_dir == os.path.join(cache, entry)

  def boom(self):
    raise AssertionError("re-parsed the annotation file")

  with monkeypatch.context() as mp:
    mp.setattr(coco.CocoSource, "_build_index", boom)
    second = coco.CocoSource(image_dir, ann, cache_dir=cache)
  assert not second.built_index
  for c in range(3):
    np.testing.assert_array_equal(first.images_with_class(c), second.images_with_class(c))
  np.testing.assert_array_equal(first.load(0, 0)[1], second.load(0, 0)[1])

  # Editing the annotation file (new mtime / size) triggers a rebuild.
  doc = _coco_json()
  doc["annotations"].append(dict(id=10, image_id=40, category_id=1, iscrowd=0, area=9.0,
                                 segmentation=_rle_compressed(_box(10, 14, 0, 3, 0, 3)),
                                 bbox=[0, 0, 3, 3]))
  with open(ann, "w") as f:
    json.dump(doc, f)
  st = os.stat(ann)
  os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  third = coco.CocoSource(image_dir, ann, cache_dir=cache)
  assert third.built_index
  assert third.images_with_class(0).tolist() == [0, 3]
  np.testing.assert_array_equal(third.load(3, 0)[1], _box(10, 14, 0, 3, 0, 3))
  assert os.listdir(cache) == [os.path.basename(third.index_dir)] != [entry]  # stale one removed


def test_coco_source_pickles(coco_set):
  image_dir, ann, _, cache = coco_set
  src = coco.CocoSource(image_dir, ann, cache_dir=cache)
  img, m = src.load(1, 2)  # opens the annotation blob
  clone = pickle.loads(pickle.dumps(src))
  assert src._store is not None and clone._store is None and len(pickle.dumps(src)) < 100_000
  img2, m2 = clone.load(1, 2)
  np.testing.assert_array_equal(img, img2)
  np.testing.assert_array_equal(m, m2)
  assert clone.class_names == src.class_names
  np.testing.assert_array_equal(clone.images_with_class(1), src.images_with_class(1))


def test_coco_errors(tmp_path, coco_set, caplog):
  image_dir, ann, _, cache = coco_set
  with pytest.raises(DataError) as e:
    coco.coco20i(str(tmp_path / "nowhere"), "train", cache_dir=cache)
  msg = str(e.value)
  assert "annotations/instances_train2014.json" in msg and "train2014/" in msg and "val2014/" in msg

  # Corrupt image: named in the error; skipped and counted with skip_corrupt=True.
  with open(os.path.join(image_dir, "d.png"), "wb") as f:
    f.write(b"this is not a png")
  src = coco.CocoSource(image_dir, ann, cache_dir=cache)
  with pytest.raises(DataError, match=r"d\.png"):
    src.load(3, 2)
  skip = coco.CocoSource(image_dir, ann, cache_dir=cache, skip_corrupt=True)
  image, mask = skip.load(3, 2)  # airplane: D is corrupt -> the next airplane record, B
  np.testing.assert_array_equal(mask, M_AIR_B)
  assert image.shape == (16, 24, 3) and skip.corrupt_count == 1
  skip.load(3, 2)
  assert skip.corrupt_count == 1  # remembered, not decoded again

  # Image size differs from the annotation's height/width: the mask is resized (nearest) to
  # the image, counted, and logged with both names and sizes.
  _, expected = src.load(0, 0)
  Image.fromarray(_rand_image(21, 30)).save(os.path.join(image_dir, "a.png"))
  before = imageio.resized_mask_count()
  with caplog.at_level(logging.WARNING):
    image, mask = src.load(0, 0)
  assert image.shape == (21, 30, 3) and mask.shape == (21, 30)
  np.testing.assert_array_equal(mask, expected[np.minimum(np.arange(21) * 20 // 21, 19)])
  assert src.resized_masks == 1 and imageio.resized_mask_count() == before + 1
  assert "a.png is 21x30" in caplog.text and "image id 10 is 20x30" in caplog.text

  os.unlink(os.path.join(image_dir, "e.png"))
  with pytest.raises(DataError, match=r"Missing image file: .*e\.png"):
    src.load(4, 0)

  bad = tmp_path / "bad.json"
  bad.write_text("{\"images\": [")
  with pytest.raises(DataError, match=r"bad\.json is not valid JSON"):
    coco.CocoSource(image_dir, str(bad), cache_dir=cache)
  doc = _coco_json()
  doc["annotations"][4]["image_id"] = 999
  bad.write_text(json.dumps(doc))
  with pytest.raises(DataError, match=r"annotation id=5 refers to unknown image id 999"):
    coco.CocoSource(image_dir, str(bad), cache_dir=cache)
  assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]  # no partial index left


def test_coco20i_layout(tmp_path):
  root = tmp_path / "coco"
  _write_coco(str(root / "val2014"), str(root / "annotations" / "instances_val2014.json"))
  src = coco.coco20i(str(root), "test", cache_dir=str(tmp_path / "cache"))
  assert src.name == "coco20i-val2014" and len(src) == 5
  assert src.images_with_class(2).tolist() == [1, 3]
  with pytest.raises(DataError, match="instances_train2014.json"):
    coco.coco20i(str(root), "train", cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="'trn'"):
    coco.coco20i(str(root), "trn")


# ----------------------------------------------------------------------------- PASCAL

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]


def _labels():
  """Label maps (values 0..20, 255 border) of the test images, by name."""
  l1 = np.zeros((12, 16), np.uint8)
  l1[2:7, 2:8] = 1  # aeroplane
  l1[1, 1:9] = 255
  l1[7, 1:9] = 255  # boundary around it
  l1[8:12, 10:16] = 6  # bus
  l2 = np.zeros((10, 10), np.uint8)
  l2[0:5, 0:5] = 6
  l2[5:10, 5:10] = 15  # person
  l3 = np.zeros((8, 8), np.uint8)
  l3[0, 0:3] = 1  # 3 aeroplane pixels
  l3[4:8, 4:8] = 15
  l4 = np.zeros((6, 6), np.uint8)
  l4[0, :] = 255
  return {"2007_000001": l1, "2007_000002": l2, "2007_000003": l3, "2007_000004": l4}


def _write_voc(root):
  voc = os.path.join(root, "VOC2012")
  os.makedirs(os.path.join(voc, "JPEGImages"))
  os.makedirs(os.path.join(voc, "SegmentationClassAug"))
  os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"))
  for k, (name, lab) in enumerate(_labels().items()):
    Image.fromarray(_rand_image(*lab.shape)).save(os.path.join(voc, "JPEGImages", name + ".jpg"))
    if k % 2 == 0:  # palette PNG, as SegmentationClassAug ships
      img = Image.fromarray(lab, mode="P")
      img.putpalette(VOC_PALETTE)
    else:  # greyscale PNG
      img = Image.fromarray(lab, mode="L")
    img.save(os.path.join(voc, "SegmentationClassAug", name + ".png"))
  seg = os.path.join(voc, "ImageSets", "Segmentation")
  with open(os.path.join(seg, "train.txt"), "w") as f:
    f.write("2007_000001\n2007_000002\n2007_000003\n2007_000004\n")
  with open(os.path.join(seg, "val.txt"), "w") as f:
    f.write("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
            "/JPEGImages/2007_000003.jpg /SegmentationClassAug/2007_000003.png\n")
  return voc


def test_pascal_derived_lists_masks_and_cache(tmp_path, monkeypatch):
  voc = _write_voc(str(tmp_path))
  cache = str(tmp_path / "cache")
  assert Image.open(os.path.join(voc, "SegmentationClassAug", "2007_000001.png")).mode == "P"
  train = pascal.pascal5i(str(tmp_path), "train", 0, cache_dir=cache)
  assert train.built_index and train.class_names[5] == "bus"
  assert [train.record_key(i) for i in range(len(train))] == [
      "2007_000001", "2007_000002", "2007_000003"]
  assert train.images_with_class(5).tolist() == [0, 1]  # bus
  assert train.images_with_class(14).tolist() == [1, 2]  # person
  assert train.images_with_class(0).tolist() == []  # aeroplane is novel in fold 0

  labels = _labels()
  _, m = train.load(0, 5)
  np.testing.assert_array_equal(m, np.where(labels["2007_000001"] == 255, 255,
                                            (labels["2007_000001"] == 6).astype(np.uint8)))
  _, m = train.load(1, 14)  # greyscale PNG
  np.testing.assert_array_equal(m, (labels["2007_000002"] == 15).astype(np.uint8))

  test = pascal.pascal5i(voc, "test", 0, cache_dir=cache)
  assert test.images_with_class(0).tolist() == [0, 1]
  image, m = test.load(0, 0)
  expected = np.zeros((12, 16), np.uint8)
  expected[2:7, 2:8] = 1
  expected[1, 1:9] = 255
  expected[7, 1:9] = 255
  np.testing.assert_array_equal(m, expected)
  assert image.shape == (12, 16, 3) and image.dtype == np.uint8
  assert pascal.pascal5i(voc, "test", 0, cache_dir=cache, min_pixels=4).images_with_class(
      0).tolist() == [0]

  # The second construction reads the cached label counts: no mask is decoded.
  def boom(*a, **k):
    raise AssertionError("decoded a mask")

  with monkeypatch.context() as mp:
    mp.setattr(pascal.imageio, "read_mask", boom)
    again = pascal.pascal5i(str(tmp_path), "train", 0, cache_dir=cache)
  assert not again.built_index and again.images_with_class(5).tolist() == [0, 1]
  clone = pickle.loads(pickle.dumps(again))
  np.testing.assert_array_equal(clone.load(0, 5)[1], again.load(0, 5)[1])


def test_pascal_hsnet_split_files(tmp_path):
  voc = _write_voc(str(tmp_path))
  split_dir = tmp_path / "splits" / "pascal"
  files = {("val", 0): "2007_000003__01\n", ("trn", 1): "2007_000002__06\n",
           ("trn", 2): "", ("trn", 3): "2007_000002__15\n2007_000003__15\n",
           ("trn", 0): "2007_000001__01\n"}
  for sub in ("trn", "val"):
    os.makedirs(split_dir / sub)
    for k in range(4):
      (split_dir / sub / f"fold{k}.txt").write_text(files.get((sub, k), ""))
  # Found automatically under <root>/splits/pascal; the file, not the masks, decides.
  test = pascal.pascal5i(str(tmp_path), "test", 0, cache_dir=str(tmp_path / "cache"))
  assert test.list_source == str(split_dir) and not test.built_index
  assert len(test) == 1 and test.images_with_class(0).tolist() == [0]
  assert test.record_key(0) == "2007_000003"
  train = pascal.PascalSource(voc, "train", split_dir=str(split_dir))
  assert train.images_with_class(0).tolist() == [0] and train.images_with_class(5).tolist() == [1]
  assert train.images_with_class(14).tolist() == [1, 2]
  (split_dir / "trn" / "fold2.txt").write_text("2007_000002__6\nbad line\n")
  with pytest.raises(DataError, match=r"fold2.txt:2: expected"):
    pascal.PascalSource(voc, "train", split_dir=str(split_dir))


def test_pascal_errors(tmp_path):
  with pytest.raises(DataError, match=r"JPEGImages/<name>.jpg"):
    pascal.pascal5i(str(tmp_path / "none"), "train", 0)
  voc = _write_voc(str(tmp_path))
  Image.fromarray(_rand_image(10, 10)).save(os.path.join(voc, "JPEGImages", "bad.jpg"))
  Image.fromarray(np.full((10, 12), 6, np.uint8), mode="L").save(
      os.path.join(voc, "SegmentationClassAug", "bad.png"))
  lst = tmp_path / "bad.txt"
  lst.write_text("bad\n")
  src = pascal.PascalSource(voc, "train", image_list=str(lst), cache_dir=str(tmp_path / "c"))
  image, mask = src.load(0, 5)  # a 10x12 label map for a 10x10 image: resized nearest
  assert image.shape == (10, 10, 3) and mask.shape == (10, 10) and np.all(mask == 1)
  assert src.resized_masks == 1
  with pytest.raises(ValueError, match="fold 4"):
    pascal.pascal5i(voc, "test", 4)


def test_read_mask_modes(tmp_path):
  lab = np.array([[0, 1, 255], [20, 6, 0]], np.uint8)
  p = Image.fromarray(lab, mode="P")
  p.putpalette(VOC_PALETTE)
  p.save(tmp_path / "p.png")
  Image.fromarray(lab, mode="L").save(tmp_path / "l.png")
  Image.fromarray(np.stack([lab] * 3, -1)).save(tmp_path / "rgb.png")
  for f in ("p.png", "l.png", "rgb.png"):
    np.testing.assert_array_equal(imageio.read_mask(str(tmp_path / f)), lab)
  colour = np.zeros((2, 3, 3), np.uint8)
  colour[0, 0] = (128, 0, 0)
  Image.fromarray(colour).save(tmp_path / "colour.png")
  with pytest.raises(DataError, match="colour-coded"):
    imageio.read_mask(str(tmp_path / "colour.png"))
  (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
  with pytest.raises(DataError, match=r"junk\.png"):
    imageio.read_rgb(str(tmp_path / "junk.png"))
  with pytest.raises(DataError, match=r"Missing mask file: .*nope\.png"):
    imageio.read_mask(str(tmp_path / "nope.png"))


# ----------------------------------------------------------------------------- FSS-1000


def _write_fss(root, names, n=2):
  gray = np.array([[0, 127, 128, 255]] * 4, np.uint8)
  for name in names:
    d = os.path.join(root, name)
    os.makedirs(d)
    for k in range(1, n + 1):
      Image.fromarray(_rand_image(4, 4)).save(os.path.join(d, f"{k}.jpg"))
      Image.fromarray(np.stack([gray] * 3, -1)).save(os.path.join(d, f"{k}.png"))  # RGB mask
  return gray


def test_fss1000_split_source(tmp_path):
  root = tmp_path / "FSS-1000"
  gray = _write_fss(str(root), fss1000_splits.VAL_CLASSES)
  src = fss1000.fss1000(str(tmp_path), "val")
  names = sorted(fss1000_splits.VAL_CLASSES)
  assert len(src) == 480 and src.class_names[520] == names[0]
  assert src.images_with_class(520).tolist() == [0, 1]
  assert src.images_with_class(760).tolist() == [] and src.images_with_class(0).tolist() == []
  assert src.record_key(1) == f"{names[0]}/2.jpg" and src.class_of(2) == 521
  image, mask = src.load(0, 520)
  np.testing.assert_array_equal(mask, (gray >= 128).astype(np.uint8))
  assert mask[0].tolist() == [0, 0, 1, 1] and image.shape == (4, 4, 3)
  assert not src.load(0, 521)[1].any()
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone.load(3, 521)[1], mask)

  shutil.rmtree(root / names[5])
  with pytest.raises(DataError, match=rf"1 of 240 class folders missing .*{names[5]}"):
    fss1000.fss1000(str(root), "val")
  with pytest.raises(DataError, match="240 of 240"):
    fss1000.fss1000(str(root), "test")
  with pytest.raises(ValueError, match="'dev'"):
    fss1000.fss1000(str(root), "dev")


# ----------------------------------------------------------------------------- LVIS


def _write_lvis(root, split, cats_on_two, cats_on_one):
  """An LVIS-style JSON (1203 categories, coco_url paths) over 3 images in train/val2017."""
  imgs = [(1, "train2017", 10, 12), (2, "val2017", 9, 11), (3, "val2017", 8, 8)]
  images = []
  for iid, folder, h, w in imgs:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    fn = f"{iid:012d}.jpg"
    Image.fromarray(_rand_image(h, w)).save(os.path.join(root, folder, fn))
    images.append(dict(id=iid, height=h, width=w,
                       coco_url=f"http://images.cocodataset.org/{folder}/{fn}",
                       neg_category_ids=[], not_exhaustive_category_ids=[]))
  anns, k = [], 0
  for cat, on in [(c, (1, 2)) for c in cats_on_two] + [(c, (3,)) for c in cats_on_one]:
    for iid in on:
      k += 1
      anns.append(dict(id=k, image_id=iid, category_id=cat, area=8.0, bbox=[1, 1, 4, 2],
                       segmentation=[[1, 1, 5, 1, 5, 3, 1, 3]]))
  cats = [dict(id=i, name=f"lvis_cat_{i}", frequency="r") for i in range(1, 1204)]
  path = os.path.join(root, f"lvis_v1_{split}.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  return path


def test_lvis_paths_masks_and_folds(tmp_path):
  root = str(tmp_path / "lvis")
  val_json = _write_lvis(root, "val", cats_on_two=range(1, 24), cats_on_one=[24])
  _write_lvis(root, "train", cats_on_two=[1, 2, 3, 4, 5, 6, 11], cats_on_one=[])
  cache = str(tmp_path / "cache")
  val = lvis.lvis92i(root, "test", cache_dir=cache)
  assert len(val.class_names) == 1203 and val.class_names[0] == "lvis_cat_1"
  assert val.record_key(0) == "train2017/000000000001.jpg"
  assert val.record_key(1) == "val2017/000000000002.jpg"
  assert val.images_with_class(0).tolist() == [0, 1] and val.images_with_class(23).tolist() == [2]
  image, mask = val.load(1, 4)
  assert image.shape == (9, 11, 3)
  api = COCO(val_json)
  ref = api.annToMask(api.loadAnns(api.getAnnIds(imgIds=[2], catIds=[5]))[0])
  np.testing.assert_array_equal(mask, ref)

  eligible = lvis.eligible_classes(val, shot=1)
  assert eligible == list(range(23))  # class 23 has one image only
  test0 = lvis.lvis92i_fold_classes(root, 0, "test", cache_dir=cache)
  assert test0 == [0, 10]  # 23 // 10 = 2 per fold: eligible[0], eligible[10]
  assert lvis.lvis92i_fold_classes(root, 2, "test", cache_dir=cache) == [2, 12]
  assert lvis.lvis92i_fold_classes(root, 0, "train", cache_dir=cache) == [1, 2, 3, 4, 5]
  with pytest.raises(DataError, match="lvis_v1_train.json"):
    lvis.lvis92i(str(tmp_path / "empty"), "train")


# ----------------------------------------------------------------------------- build_source


def _data(**kw):
  data = base_config().data
  for k, v in kw.items():
    data[k] = v
  return data


def test_build_source_dispatch(tmp_path):
  cache = str(tmp_path / "cache")
  root = tmp_path / "coco"
  _write_coco(str(root / "train2014"), str(root / "annotations" / "instances_train2014.json"))
  for ds in ("coco20i", "coco20i_contiguous"):
    data = _data(dataset=ds, root=str(root), fold=1)
    src = sources.build_source(data, "train", cache_dir=cache)
    assert isinstance(src, coco.CocoSource) and src.name == "coco20i-train2014"
    assert sources.benchmark_of(data) == ds
  assert sources.fold_classes_for(_data(dataset="coco20i", fold=1), "test") == list(
      range(1, 80, 4))
  assert sources.fold_classes_for(_data(dataset="coco20i_contiguous", fold=1), "test") == list(
      range(20, 40))

  _write_voc(str(tmp_path / "voc"))
  src = sources.build_source(_data(dataset="pascal5i", root=str(tmp_path / "voc"), fold=1),
                             "train", cache_dir=cache)
  assert isinstance(src, pascal.PascalSource) and src.classes == folds.fold_classes(
      "pascal5i", 1, "train")
  assert src.images_with_class(5).tolist() == []  # bus is novel in fold 1

  _write_fss(str(tmp_path / "fss"), fss1000_splits.VAL_CLASSES, n=1)
  src = sources.build_source(_data(dataset="fss1000", root=str(tmp_path / "fss")), "val")
  assert isinstance(src, fss1000.Fss1000Source) and len(src) == 240
  assert sources.fold_classes_for(_data(dataset="fss1000"), "val") == list(range(520, 760))

  lroot = str(tmp_path / "lvis")
  _write_lvis(lroot, "val", cats_on_two=range(1, 24), cats_on_one=[])
  data = _data(dataset="lvis92i", root=lroot, fold=3)
  src = sources.build_source(data, "test", cache_dir=cache)
  assert isinstance(src, lvis.LvisSource)
  assert sources.fold_classes_for(data, "test", source=src) == [3, 13]

  with pytest.raises(ValueError, match=r"'ade20k'.*coco20i"):
    sources.build_source(_data(dataset="ade20k"), "train")
  with pytest.raises(ValueError, match=r"'dev'"):
    sources.build_source(_data(dataset="coco20i", root=str(root)), "dev")
  with pytest.raises(DataError, match="Expected COCO-20i layout"):
    sources.build_source(_data(dataset="coco20i", root=str(tmp_path / "missing")), "train")


def test_build_source_synthetic(tmp_path):
  root = str(tmp_path / "synth")
  synthetic.generate(root, train=4, val=3, size=32, seed=1, workers=1)
  data = _data(dataset="synthetic", root=root)
  assert sources.benchmark_of(data) == "synthetic"
  src = sources.build_source(data, "test", cache_dir=str(tmp_path / "cache"))
  assert src.name == "synthetic-val" and len(src) == 3 and len(src.class_names) == 80
  api = COCO(synthetic.annotation_file(root, "val"))
  c = next(c for c in range(80) if len(src.images_with_class(c)))
  r = int(src.images_with_class(c)[0])
  img_id = int(src.image_ids[r])
  ann_ids = api.getAnnIds(imgIds=[img_id], catIds=[src.category_ids[c]], iscrowd=False)
  _, mask = src.load(r, c)
  np.testing.assert_array_equal(mask, _ref_mask(synthetic.annotation_file(root, "val"), ann_ids))


# ----------------------------------------------------------------------------- issue 8 faults


def test_read_rgb_decodes_every_mode_to_8bit_without_clipping(tmp_path):
  """Each Pillow mode becomes uint8 RGB by the stated rule; deep images are scaled, not
  clipped (Pillow's own convert('RGB') turns every 16-bit value above 255 into white)."""
  v16 = np.array([[0, 257, 32896, 65535]], np.uint16)  # 8-bit values 0, 1, 128, 255
  want16 = np.array([0, 1, 128, 255], np.uint8)
  Image.fromarray(v16).save(tmp_path / "g16.png")  # mode I;16
  Image.frombytes("I;16B", (4, 1), v16.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
  Image.fromarray(v16.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 16-bit values
  Image.fromarray(np.array([[0, 0.5, 1, 0.25]], np.float32)).save(tmp_path / "f01.tif")
  Image.fromarray(np.array([[0, 100.4, 255, 7]], np.float32)).save(tmp_path / "f255.tif")
  for name, mode, want in (("g16.png", "I;16", want16), ("g16b.tif", "I;16B", want16),
                           ("i32.tif", "I", want16), ("f01.tif", "F", [0, 128, 255, 64]),
                           ("f255.tif", "F", [0, 100, 255, 7])):
    assert Image.open(tmp_path / name).mode == mode
    rgb = imageio.read_rgb(str(tmp_path / name))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3), name
    np.testing.assert_array_equal(rgb[0], np.stack([want] * 3, -1), err_msg=name)
  # A 16-bit FSS-style mask read as luminance is scaled too: 32896 is 128, foreground.
  np.testing.assert_array_equal(imageio.read_mask(str(tmp_path / "g16.png"), gray=True)[0],
                                want16)

  # Palette with transparency: the palette colours, no Pillow warning.
  p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
  p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  p.info["transparency"] = 0
  p.save(tmp_path / "pt.png", transparency=0)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rgb = imageio.read_rgb(str(tmp_path / "pt.png"))
  assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [200, 100, 50]
  # LA (grey + alpha), 1-bit, RGBA, CMYK.
  la = np.stack([np.array([[7, 250]], np.uint8), np.array([[0, 255]], np.uint8)], -1)
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  assert imageio.read_rgb(str(tmp_path / "la.png"))[0].tolist() == [[7] * 3, [250] * 3]
  Image.fromarray(np.array([[True, False]])).save(tmp_path / "one.png")
  assert Image.open(tmp_path / "one.png").mode == "1"
  assert imageio.read_rgb(str(tmp_path / "one.png"))[0].tolist() == [[255] * 3, [0] * 3]
  Image.new("CMYK", (2, 1), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
  assert imageio.read_rgb(str(tmp_path / "cmyk.tif"))[0, 0].tolist() == [255, 0, 0]
  rgba = np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], np.uint8)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  assert imageio.read_rgb(str(tmp_path / "rgba.png"))[0].tolist() == [[1, 2, 3], [4, 5, 6]]

  # Out of the rule: rejected, naming the file and the mode.
  Image.fromarray(np.array([[0, 300.0]], np.float32)).save(tmp_path / "fbig.tif")
  with pytest.raises(DataError, match=r"fbig\.tif \(mode F.*\[0.0, 300.0\]"):
    imageio.read_rgb(str(tmp_path / "fbig.tif"))
  Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "ibig.tif")
  with pytest.raises(DataError, match=r"ibig\.tif \(mode I\)"):
    imageio.read_rgb(str(tmp_path / "ibig.tif"))
  with pytest.raises(DataError, match=r"x\.png has Pillow mode 'La'"):
    imageio.to_8bit(Image.new("La", (2, 2)), "x.png")


def test_fss1000_mask_of_another_size_is_resized_and_scored(tmp_path, caplog):
  """A 12x12 image with a 13x14 mask: resized nearest, the episode is scored, counted, logged."""
  from fssjax import configlib
  from fssjax.data import episodes as ep
  from fssjax.data import pipeline

  root = tmp_path / "FSS-1000"
  _write_fss(str(root), fss1000_splits.VAL_CLASSES)
  name = sorted(fss1000_splits.VAL_CLASSES)[0]
  Image.fromarray(_rand_image(12, 12)).save(root / name / "1.jpg")
  mask = np.zeros((13, 14), np.uint8)
  mask[:, 7:] = 255  # right half
  Image.fromarray(mask).save(root / name / "1.png")
  src = fss1000.fss1000(str(root), "val")
  with caplog.at_level(logging.WARNING):
    image, m = src.load(0, 520)
  assert image.shape == (12, 12, 3) and m.shape == (12, 12)
  assert m[0].tolist() == [0] * 6 + [1] * 6  # column x reads floor(x * 14 / 12)
  assert src.resized_masks == 1
  assert "1.jpg is 12x12" in caplog.text and "1.png is 13x14" in caplog.text

  config = configlib.base_config()
  config.data.image_size = 16
  episodes = [ep.Episode(520, 0, (1,)), ep.Episode(520, 1, (0,)), ep.Episode(521, 2, (3,))]
  batches = list(pipeline.eval_loader(config, src, episodes, normalization="imagenet",
                                      global_batch_size=4, shot=1, process_index=0,
                                      process_count=1, worker_count=0))
  (batch,) = batches
  assert batch["valid"].tolist() == [True, True, True, False]
  assert batch["masks_resized"].tolist() == [1, 1, 0, 0]
  assert batch["masks_resized"].dtype == np.int32


def _degenerate_coco_json():
  doc = _coco_json()
  doc["images"].append(dict(id=60, file_name="a.png", height=20, width=30))  # a.png again
  doc["annotations"] += [
      dict(id=20, image_id=50, category_id=5, iscrowd=0, area=12.0, segmentation=[],
           bbox=[0, 0, 3, 4]),                                       # empty segmentation
      dict(id=21, image_id=30, category_id=5, iscrowd=0, area=5.0,
           segmentation=[[1, 1, 6, 1]], bbox=[1, 1, 5, 0]),          # a 2-point polygon
      dict(id=22, image_id=50, category_id=3, iscrowd=0, area=4.0,
           segmentation=[[1, 1, 4, 1, 7, 1]], bbox=[1, 1, 6, 0]),    # 3 collinear points
      dict(id=23, image_id=60, category_id=1, iscrowd=0, area=60.0,
           segmentation=[[2, 2, 12, 2, 12, 8, 2, 8]], bbox=[2, 2, 10, 6]),
  ]
  return doc


def test_coco_presence_comes_from_the_decoded_area(tmp_path):
  """Empty `[]` and degenerate polygons do not list their image under their class."""
  image_dir = str(tmp_path / "images")
  ann = str(tmp_path / "annotations" / "instances.json")
  _write_coco(image_dir, ann, _degenerate_coco_json())
  src = coco.CocoSource(image_dir, ann, cache_dir=str(tmp_path / "cache"))
  assert src.built_index and os.path.basename(src.index_dir).startswith("coco-instances.json-")
  # records: 0 A(10) 1 B(20) 2 C(30) 3 D(40) 4 E(50) 5 A again (60)
  assert src.images_with_class(2).tolist() == [1, 3]  # airplane: not E ([]), not C (2 points)
  assert src.images_with_class(1).tolist() == [0, 1, 3]  # car: not E (collinear polygon)
  assert src.images_with_class(0).tolist() == [0, 5]
  area = np.load(os.path.join(src.index_dir, "ann_mask_area.npy"))
  assert sorted(area.tolist())[:3] == [0, 0, 0] and (area > 0).sum() == len(area) - 3
  assert coco.decoded_area([], 20, 30, "x") == 0
  assert coco.decoded_area([[1, 1, 6, 1]], 20, 30, "x") == 0
  assert coco.decoded_area(_rle_uncompressed(M_CAR_A), 20, 30, "x") == int(M_CAR_A.sum())
  assert coco.decoded_area(_rle_compressed(M_AIR_B), 16, 24, "x") == int(M_AIR_B.sum())


def test_a_query_is_never_its_own_support_when_an_image_is_listed_twice(tmp_path):
  from fssjax.data import episodes as ep

  image_dir = str(tmp_path / "images")
  ann = str(tmp_path / "annotations" / "instances.json")
  _write_coco(image_dir, ann, _degenerate_coco_json())
  src = coco.CocoSource(image_dir, ann, cache_dir=str(tmp_path / "cache"))
  assert src.image_key(0) == src.image_key(5) == "a.png"
  # person: records 0 and 5 are one image (a.png): no 1-shot episode is possible.
  with pytest.raises(DataError, match="none of the 1 classes has 2 images"):
    ep.test_episodes("coco20i", src, [0], 10, 1, seed=0)
  sampler = ep.EpisodeSampler(src, [0, 1], max_shot=1)
  assert sampler.usable_classes(1) == (1,)
  assert sampler.same_image(0, 5) and not sampler.same_image(0, 1)
  assert sampler.support_candidates(0, 0).tolist() == []


def test_coco_rle_of_another_size_is_resized_to_its_image(tmp_path):
  """The same rule for COCO: an RLE stored at 6x6 for a 12x12 image is resized nearest."""
  image_dir = str(tmp_path / "images")
  ann = str(tmp_path / "annotations" / "instances.json")
  doc = _coco_json()
  small = _box(6, 6, 0, 3, 0, 6)  # top half
  doc["annotations"].append(dict(id=30, image_id=30, category_id=3, iscrowd=0, area=18.0,
                                 segmentation=_rle_compressed(small), bbox=[0, 0, 6, 3]))
  _write_coco(image_dir, ann, doc)
  src = coco.CocoSource(image_dir, ann, cache_dir=str(tmp_path / "cache"))
  assert 2 in src.images_with_class(1).tolist()  # C lists car (decoded area 18 > 0)
  image, mask = src.load(2, 1)
  assert image.shape == (12, 12, 3)
  np.testing.assert_array_equal(mask, _box(12, 12, 0, 6, 0, 12))
  assert src.resized_masks == 1
