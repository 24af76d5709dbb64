"""The embedded benchmark's dense labels, exact scene descriptions, open-vocabulary split and
its dense source ('synthetic_dense')."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO

from fssjax import evaluators
from fssjax.data import synthetic
from fssjax.data import synthetic_dense as sd
from fssjax.data import synthetic_truth as st
from fssjax.data.base import DataError

TINY = dict(train=6, val=5, size=48, seed=3)
IDX = {c.name: c.id - 1 for c in synthetic.categories()}


def _shape(name, colours, rows, cols, depth, size=40):
  m = np.zeros((size, size), bool)
  m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
  cls = IDX[name] if name else -1
  return cls, tuple(colours), m, depth


def _drawn(specs, size=40):
  """DrawnShapes from (class name or None, colours, whole mask) in drawing order; visible
  parts computed as the generator does (later shapes occlude earlier ones)."""
  shapes, covered = [], np.zeros((size, size), bool)
  vis = []
  for cls, colours, m, depth in reversed(specs):
    vis.append(m & ~covered)
    covered |= m
  vis = vis[::-1]
  for (cls, colours, m, depth), v in zip(specs, vis):
    shapes.append(synthetic.DrawnShape(cls=cls, shape="square", texture="solid",
                                       colours=colours, mask=m, visible=v, depth=depth))
  return shapes


def test_hand_made_scene_label_map_and_description():
  specs = [
      _shape("striped star", ("red", "blue"), (2, 11), (2, 11), 0),     # 100 px, 8 hidden
      _shape("dotted circle", ("green", "white"), (8, 21), (10, 23), 1),  # 196 px, 16 hidden
      _shape(None, ("black", "white"), (18, 21), (20, 23), 2),           # a distractor
      _shape("solid square", ("yellow",), (30, 34), (24, 28), 3),         # 25 px
  ]
  shapes = _drawn(specs)
  label = st.label_map(shapes, 40)
  want = np.full((40, 40), 255, np.uint8)
  want[2:12, 2:12] = IDX["striped star"]
  want[8:22, 10:24] = IDX["dotted circle"]  # in front of the star
  want[18:22, 20:24] = 255                  # the distractor hides part of the circle
  want[30:35, 24:29] = IDX["solid square"]
  np.testing.assert_array_equal(label, want)

  sc = st.scene(shapes, 40)
  objs = sc["objects"]
  assert [o["name"] for o in objs] == ["striped star", "dotted circle", "solid square"]
  # Visible areas 92, 180, 25 of 1600 px: 5.75% small, 11.25% medium, 1.56% tiny.
  assert [o["area"] for o in objs] == [92, 180, 25]
  assert [o["size"] for o in objs] == ["small", "medium", "tiny"]
  assert [o["position"] for o in objs] == ["top left", "centre", "bottom"]
  assert objs[0]["bbox"] == [2, 2, 10, 10] and objs[2]["bbox"] == [24, 30, 5, 5]
  assert [o["depth"] for o in objs] == [0, 1, 3]
  assert sc["relations"] == [
      {"subject": 0, "relation": "left of", "object": 1},
      {"subject": 1, "relation": "overlaps", "object": 0},
      {"subject": 0, "relation": "above", "object": 2},
      {"subject": 1, "relation": "above", "object": 2}]
  assert sc["description"] == (
      "There is a small red and blue striped star. There is a medium green and white dotted "
      "circle. There is a tiny yellow solid square. The striped star is left of the dotted "
      "circle. The dotted circle overlaps the striped star. The striped star is above the solid "
      "square. The dotted circle is above the solid square.")
  assert sc["priors"]["objects"][0] == {"name": "star", "attributes": ["small", "red", "blue",
                                                                       "striped"],
                                        "span": "a small red and blue striped star"}
  assert sc["priors"]["relations"] == sc["relations"]


def test_twins_get_a_position_word():
  specs = [_shape("zigzag L-shape", ("red", "lime"), (20, 27), (22, 29), 0),
           _shape("zigzag L-shape", ("red", "lime"), (4, 11), (2, 9), 1)]
  sc = st.scene(_drawn(specs), 40)
  assert [o["twin"] for o in sc["objects"]] == ["right", "left"]
  assert sc["description"] == (
      "There is a right small red and lime zigzag L-shape. There is a left small red and lime "
      "zigzag L-shape. The right zigzag L-shape is right of the left zigzag L-shape.")
  assert sc["priors"]["objects"][1]["attributes"] == ["left", "small", "red", "lime", "zigzag"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("dense") / "set")
  synthetic.generate(root, workers=1, **TINY)
  return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_maps_are_the_union_of_the_coco_annotations(tiny_set, split):
  coco = COCO(synthetic.annotation_file(tiny_set, split))
  scenes = st.load_scenes(tiny_set, split)
  assert len(scenes) == TINY[split] == len(os.listdir(st.label_dir(tiny_set, split)))
  for index, img_id in enumerate(sorted(coco.getImgIds())):
    want = np.full((48, 48), 255, np.uint8)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
      want[coco.annToMask(a) == 1] = a["category_id"] - 1
    np.testing.assert_array_equal(st.load_label(tiny_set, split, index), want)
    rec = scenes[index]
    assert rec["id"] == img_id and rec["file_name"] == f"{index:06d}.png"
    cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))}
    assert {o["category_id"] for o in rec["objects"]} == cats
    assert len(rec["objects"]) == len(coco.getAnnIds(imgIds=img_id))
    assert [o["area"] for o in rec["objects"]] == [
        a["area"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
    assert rec == json.loads(json.dumps(st.image_scene(3, split, index, 48) | {
        "id": img_id, "file_name": rec["file_name"], "label_file": rec["label_file"]}))


def test_exact_description_of_a_generated_image(tiny_set):
  rec = st.load_scenes(tiny_set, "val")[0]
  # The generator's truth for val image 0 of seed 3 at 48 px: two gradient circles, painted
  # green+cyan and yellow+cyan.
  assert rec["description"] == (
      "There is a medium green and cyan gradient circle. There is a medium yellow and cyan "
      "gradient circle. The green gradient circle is left of the yellow gradient circle.")
  _, shapes = synthetic.render_truth(3, "val", 0, 48)
  assert [s.colours for s in shapes if s.cls >= 0] == [("green", "cyan"), ("yellow", "cyan")]


def test_older_sets_get_identical_dense_files(tiny_set, tmp_path):
  old = str(tmp_path / "old")
  shutil.copytree(tiny_set, old)
  shutil.rmtree(os.path.join(old, st.LABEL_DIR))
  for split in ("train", "val"):
    os.unlink(st.scenes_file(old, split))
  assert not st.has_dense(old, "val")
  src = sd.source_from_config(ml_collections.ConfigDict(
      dict(dataset="synthetic_dense", root=old, split="val")))
  assert st.has_dense(old, "val") and not st.has_dense(old, "train")
  assert len(src) == 5
  for split in ("val",):
    for f in sorted(os.listdir(st.label_dir(tiny_set, split))):
      with open(os.path.join(st.label_dir(tiny_set, split), f), "rb") as a, \
          open(os.path.join(st.label_dir(old, split), f), "rb") as b:
        assert a.read() == b.read()
    assert st.load_scenes(old, split) == st.load_scenes(tiny_set, split)
  with pytest.raises(DataError, match="not a generated embedded benchmark"):
    st.ensure_dense(str(tmp_path))


def test_open_vocabulary_split():
  assert len(sd.SEEN) == 60 and len(sd.UNSEEN) == 20 and not set(sd.SEEN) & set(sd.UNSEEN)
  assert "dotted circle" in sd.UNSEEN and "striped star" in sd.SEEN
  assert sd.UNSEEN[:4] == ("dotted circle", "gradient circle", "gridded square", "solid square")
  seen_words = {w for n in sd.SEEN for w in n.split()}
  for name in sd.UNSEEN:  # a new combination of words all seen in training names
    assert set(name.split()) <= seen_words
  cats = synthetic.categories()
  for c in st.class_split("unseen"):
    shape, texture = cats[c].shape, cats[c].texture
    assert sum(cats[k].shape == shape for k in st.class_split("seen")) == 6
    assert sum(cats[k].texture == texture for k in st.class_split("seen")) in (7, 8)


def test_dense_source_registered_and_class_splits(tiny_set):
  assert evaluators.DENSE_SOURCES["synthetic_dense"] is sd.source_from_config

  def source(**kw):
    return evaluators.dense_source(ml_collections.ConfigDict(
        dict(dataset="synthetic_dense", root=tiny_set, **kw)))

  full = source(split="test")
  assert isinstance(full, evaluators.DenseSource) and len(full) == 5
  assert full.class_names == tuple(c.name for c in synthetic.categories())
  unseen = source(split="val", classes="unseen")
  seen_bg = source(split="train", classes="seen", background=True, max_images=4)
  assert unseen.class_names == sd.UNSEEN and unseen.ignore_label == 255
  assert seen_bg.class_names == ("background",) + sd.SEEN and len(seen_bg) == 4
  unseen_ids = st.class_split("unseen")
  for index in range(len(unseen)):
    image, label = unseen.load(index)
    raw = st.load_label(tiny_set, "val", index).astype(np.int32)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and label.dtype == np.int32
    want = np.full(raw.shape, 255)
    for k, c in enumerate(unseen_ids):
      want[raw == c] = k
    np.testing.assert_array_equal(label, want)
    np.testing.assert_array_equal(full.load(index)[1], raw)
  seen_ids = st.class_split("seen")
  for index in range(4):
    raw = st.load_label(tiny_set, "train", index).astype(np.int32)
    label = seen_bg.load(index)[1]
    assert ((label == 0) == (raw == 255)).all()
    for k, c in enumerate(seen_ids):
      assert ((label == k + 1) == (raw == c)).all()
    assert ((label == 255) == np.isin(raw, unseen_ids)).all()
  assert full.scene(2) == st.load_scenes(tiny_set, "val")[2]
  pri = full.priors(0)
  assert [o.name for o in pri.objects] == ["circle", "circle"]
  assert pri.relation_texts() == ("circle left of circle",) and pri.text == full.description(0)


def test_seen_unseen_miou():
  names = {0: "striped star", 1: "dotted circle", 2: "gradient circle", 3: "solid star"}
  res = {"class_names": names, "per_class_iou": {0: 80.0, 1: 30.0, 2: float("nan"), 3: 60.0}}
  got = sd.seen_unseen_miou(res)
  assert got["miou_seen"] == 70.0 and got["miou_unseen"] == 30.0  # nan: absent from truth
  assert got["hiou"] == pytest.approx(2 * 70 * 30 / 100) and got["n_unseen"] == 1


def test_bad_data_blocks_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown data keys \['clases'\]"):
    sd.source_from_config(ml_collections.ConfigDict(dict(dataset="synthetic_dense",
                                                         clases="seen")))
  with pytest.raises(DataError, match=r"synthetic_dense data.root='.*nowhere' does not exist"):
    sd.source_from_config(ml_collections.ConfigDict(dict(dataset="synthetic_dense",
                                                         root=str(tmp_path / "nowhere"))))
  with pytest.raises(ValueError, match="data.classes='novel'"):
    sd.SyntheticDenseSource(str(tmp_path), "val", "novel")
  with pytest.raises(DataError, match="is not a generated embedded benchmark with dense labels"):
    sd.SyntheticDenseSource(str(tmp_path), "val")


class _ConstantMethod:
  """predict_dense: the same class everywhere (the evaluator's arithmetic is then exact)."""

  normalization = "none"
  evaluators = ("dense",)

  def __init__(self, k):
    self.k = k

  def predict_dense(self, params, frozen, batch, class_names):
    import jax.numpy as jnp
    b = batch["image"].shape[0]
    return jnp.zeros((b, 12, 12, len(class_names))).at[..., self.k].set(1.0)


def test_dense_evaluator_scores_the_registered_source(tiny_set):
  data = ml_collections.ConfigDict(dict(dataset="synthetic_dense", root=tiny_set, split="train",
                                        classes="seen", image_size=32))
  ev = evaluators.DenseEvaluator("ov", data, every=0, prefix="ov", batch_size=4)
  labels = np.stack([ev.source.load(i)[1] for i in range(len(ev.source))])
  present = [c for c in range(60) if (labels == c).any()]
  k = present[0]
  res = ev.run(_ConstantMethod(k), {}, {})
  valid = (labels != 255).sum()
  assert res["n_images"] == 6 and res["ignore_label"] == 255 and res["n_pixels"] == valid
  assert res["per_class_iou"][k] == pytest.approx(100.0 * (labels == k).sum() / valid)
  assert res["miou"] == pytest.approx(res["per_class_iou"][k] / len(present))
  split = sd.seen_unseen_miou(res)
  assert split["miou_seen"] == pytest.approx(res["miou"]) and split["n_unseen"] == 0


def test_words_agree_with_the_ground_truth_captions():
  from fssjax.data import captions
  for index in range(6):
    _, shapes = synthetic.render_truth(0, "val", index, 64)
    objs = st.scene(shapes, 64)["objects"]
    visible = [s.visible for s in shapes if s.cls >= 0]
    assert [o["size"] for o in objs] == [captions.size_word(m) for m in visible]
    assert [o["position"] for o in objs] == [captions.position_word(m) for m in visible]


def test_render_truth_is_render_image_plus_colours():
  for index in range(4):
    image, instances, whole = synthetic.render_image(1, "train", index, 48, with_shapes=True)
    image2, shapes = synthetic.render_truth(1, "train", index, 48)
    np.testing.assert_array_equal(image, image2)
    assert [s.cls for s in shapes] == [c for c, _ in whole] and [s.depth for s in shapes] == \
        list(range(len(shapes)))
    for s, (_, m) in zip(shapes, whole):
      np.testing.assert_array_equal(s.mask, m)
    inst = [s for s in shapes if s.cls >= 0]
    assert [s.cls for s in inst] == [c for c, _ in instances]
    for s, (_, m) in zip(inst, instances):
      np.testing.assert_array_equal(s.visible, m)
      palette = synthetic.categories()[s.cls].colours
      assert set(s.colours) <= set(palette) and len(s.colours) == (
          1 if s.texture == "solid" else 2)
