"""Tests of the benchmark folds (published class splits)."""

import pytest

from fssjax.data import folds
from fssjax.data import fss1000_splits


def test_coco20i_fold0_is_interleaved():
  test = folds.fold_classes("coco20i", 0, "test")
  assert test == list(range(0, 80, 4))
  names = [folds.COCO_CLASS_NAMES[c] for c in test]
  assert names[:5] == ["person", "airplane", "boat", "parking meter", "dog"]
  assert names == [
      "person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase",
      "sports ball", "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair",
      "dining table", "mouse", "microwave", "refrigerator", "scissors"]
  # The names are indexed by the sorted COCO category ids.
  assert len(folds.COCO_CATEGORY_IDS) == 80 == len(set(folds.COCO_CLASS_NAMES))
  assert list(folds.COCO_CATEGORY_IDS) == sorted(folds.COCO_CATEGORY_IDS)
  assert folds.COCO_CATEGORY_IDS[12] == 14  # parking meter
  assert folds.COCO_CATEGORY_IDS[-1] == 90 and folds.COCO_CLASS_NAMES[-1] == "toothbrush"


@pytest.mark.parametrize("bench", ["coco20i", "coco20i_contiguous", "synthetic", "pascal5i"])
def test_folds_partition_classes(bench):
  n = folds.num_classes(bench)
  tests = []
  for f in range(folds.num_folds(bench)):
    test = folds.fold_classes(bench, f, "test")
    train = folds.fold_classes(bench, f, "train")
    assert sorted(test + train) == list(range(n))
    assert len(test) == n // 4 and len(train) == n - n // 4
    tests += test
  assert sorted(tests) == list(range(n))  # every class is novel in exactly one fold


def test_fold_rules():
  assert folds.fold_classes("coco20i", 3, "test") == list(range(3, 80, 4))
  assert folds.fold_classes("synthetic", 1, "test") == folds.fold_classes("coco20i", 1, "test")
  assert folds.fold_classes("coco20i_contiguous", 1, "test") == list(range(20, 40))
  assert folds.fold_classes("pascal5i", 2, "test") == [10, 11, 12, 13, 14]
  assert [folds.VOC_CLASS_NAMES[c] for c in folds.fold_classes("pascal5i", 0, "test")] == [
      "aeroplane", "bicycle", "bird", "boat", "bottle"]
  assert folds.num_folds("lvis92i") == 10 and folds.num_folds("fss1000") == 1


def test_fss1000_split_counts_and_names():
  train, val, test = (fss1000_splits.TRAIN_CLASSES, fss1000_splits.VAL_CLASSES,
                      fss1000_splits.TEST_CLASSES)
  assert (len(train), len(val), len(test)) == (520, 240, 240)
  assert len(set(train) | set(val) | set(test)) == 1000
  assert "bus" in test and "fountain" in train and "handcuff" in val
  assert folds.fold_classes("fss1000", 0, "train") == list(range(520))
  assert folds.fold_classes("fss1000", 0, "val") == list(range(520, 760))
  assert folds.fold_classes("fss1000", 0, "test") == list(range(760, 1000))
  names = folds.class_names("fss1000")
  # HSNet numbering: each split's names sorted, train then val then test.
  assert list(names[760:]) == sorted(test) and list(names[:520]) == sorted(train)
  assert names[760] == "abe's_flyingfish"


def test_lvis92i_rule_and_fold_sizes():
  eligible = list(range(0, 1203, 1))[:925]  # 925 eligible classes -> 92 per fold, 5 unused
  seen = []
  for f in range(10):
    test = folds.fold_classes("lvis92i", f, "test", eligible=eligible)
    assert len(test) == 92
    assert test[0] == eligible[f] and test[1] == eligible[f + 10]
    train = folds.fold_classes("lvis92i", f, "train", eligible=eligible)
    assert not set(train) & set(test) and len(train) == 1203 - 92
    seen += test
  assert len(set(seen)) == 920 and set(seen) <= set(eligible[:920])
  # A sparse eligible list: the rule indexes into it, not into the class ids.
  sparse = list(range(3, 1203, 4))  # 300 classes
  assert folds.fold_classes("lvis92i", 2, "test", eligible=sparse) == [
      sparse[2 + 10 * v] for v in range(30)]
  pool = [5, 7, sparse[2], 12]
  assert folds.fold_classes("lvis92i", 2, "train", eligible=sparse, base_pool=pool) == [5, 7, 12]
  with pytest.raises(ValueError, match="eligible"):
    folds.fold_classes("lvis92i", 0, "test")


def test_errors_name_value_and_valid_ones():
  with pytest.raises(ValueError, match=r"'coco'.*coco20i.*pascal5i"):
    folds.fold_classes("coco", 0, "test")
  with pytest.raises(ValueError, match=r"fold 4 .*\[0, 1, 2, 3\]"):
    folds.fold_classes("coco20i", 4, "test")
  with pytest.raises(ValueError, match=r"fold -1"):
    folds.fold_classes("pascal5i", -1, "train")
  with pytest.raises(ValueError, match=r"'val'.*\['train', 'test'\]"):
    folds.fold_classes("pascal5i", 0, "val")
  with pytest.raises(ValueError, match=r"fold 1 .*\[0\]"):
    folds.fold_classes("fss1000", 1, "test")
  with pytest.raises(ValueError, match="Unknown benchmark"):
    folds.num_classes("ade20k")


# ----------------------------------------------------------------------------------------
# Cross-domain class removal (RePRI's filter_classes; COCO <-> PASCAL names).

# RePRI's figures/coco2pascal.png: the PASCAL classes kept for a COCO-20i fold-f model.
COCO_TO_PASCAL_KEPT = {
    0: ["aeroplane", "boat", "chair", "diningtable", "dog", "person"],
    1: ["bicycle", "bus", "horse", "sofa"],
    2: ["bird", "car", "pottedplant", "sheep", "train", "tvmonitor"],
    3: ["bottle", "cat", "cow", "motorbike"],
}
# The COCO classes removed for a PASCAL-5i fold-f model (its 15 base classes, COCO spelling,
# in COCO id order); the other 65 are kept.
PASCAL_TO_COCO_REMOVED = {
    0: ["person", "car", "motorcycle", "bus", "train", "cat", "dog", "horse", "sheep", "cow",
        "chair", "couch", "potted plant", "dining table", "tv"],
    1: ["person", "bicycle", "motorcycle", "airplane", "train", "boat", "bird", "dog", "horse",
        "sheep", "bottle", "couch", "potted plant", "dining table", "tv"],
    2: ["bicycle", "car", "airplane", "bus", "train", "boat", "bird", "cat", "sheep", "cow",
        "bottle", "chair", "couch", "potted plant", "tv"],
    3: ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "boat", "bird", "cat",
        "dog", "horse", "cow", "bottle", "chair", "dining table"],
}


def test_name_map_covers_every_voc_class():
  assert sorted(folds.VOC_TO_COCO_NAME) == sorted(folds.VOC_CLASS_NAMES)
  assert set(folds.VOC_TO_COCO_NAME.values()) <= set(folds.COCO_CLASS_NAMES)
  assert folds.shared_class_name("pascal5i", 0) == "airplane"
  assert folds.shared_class_name("pascal5i", 19) == "tv"
  assert folds.shared_class_name("coco20i", 57) == "couch"


@pytest.mark.parametrize("fold", range(4))
def test_coco_to_pascal_keeps_the_classes_the_coco_fold_did_not_train_on(fold):
  kept, removed = folds.cross_domain_classes("coco20i", fold, "pascal5i")  # all 20 (-1)
  assert [folds.VOC_CLASS_NAMES[c] for c in kept] == COCO_TO_PASCAL_KEPT[fold]
  assert sorted(kept + removed) == list(range(20)) and not set(kept) & set(removed)
  # Kept = exactly the PASCAL classes that are COCO test classes of the fold.
  coco_test = {folds.COCO_CLASS_NAMES[c] for c in folds.fold_classes("coco20i", fold, "test")}
  assert {folds.shared_class_name("pascal5i", c) for c in kept} == coco_test & set(
      folds.VOC_TO_COCO_NAME.values())


@pytest.mark.parametrize("fold", range(4))
def test_pascal_to_coco_removes_the_15_pascal_base_classes(fold):
  kept, removed = folds.cross_domain_classes("pascal5i", fold, "coco20i")
  assert [folds.COCO_CLASS_NAMES[c] for c in removed] == PASCAL_TO_COCO_REMOVED[fold]
  assert len(kept) == 65 and sorted(kept + removed) == list(range(80))


def test_cross_domain_with_a_target_fold():
  # PASCAL fold 0 tests aeroplane, bicycle, bird, boat, bottle; COCO fold 0 trained on
  # bicycle, bird and bottle.
  kept, removed = folds.cross_domain_classes("coco20i", 0, "pascal5i", 0)
  assert kept == [0, 3] and removed == [1, 2, 4]
  # COCO-20i fold 1 tests bicycle, bus, ..., horse, ..., couch, ...: PASCAL fold 0 trained on
  # bus, horse and sofa (bicycle is one of its test classes).
  kept, removed = folds.cross_domain_classes("pascal5i", 0, "coco20i", 1)
  assert [folds.COCO_CLASS_NAMES[c] for c in removed] == ["bus", "horse", "couch"]
  assert len(kept) == 17 and "bicycle" in [folds.COCO_CLASS_NAMES[c] for c in kept]
  with pytest.raises(ValueError, match="fixed class names"):
    folds.cross_domain_classes("synthetic", 0, "pascal5i")
  with pytest.raises(ValueError, match=r"fold 4"):
    folds.cross_domain_classes("coco20i", 4, "pascal5i")


def _data(**kw):
  import ml_collections  # pylint: disable=import-outside-toplevel
  d = dict(dataset="pascal5i", root="", fold=0, shot=1, skip_corrupt=False,
           cross_domain_from="")
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_sources_hook_and_protocol(tmp_path):
  from fssjax.data import sources  # pylint: disable=import-outside-toplevel
  data = _data(fold=-1, cross_domain_from="coco20i:0")
  kept = sources.fold_classes_for(data, "test")
  assert [folds.VOC_CLASS_NAMES[c] for c in kept] == COCO_TO_PASCAL_KEPT[0]
  assert sources.fold_classes_for(_data(fold=-1), "test") == list(range(20))
  assert sources.fold_classes_for(_data(fold=1), "test") == [5, 6, 7, 8, 9]  # unchanged
  proto = sources.cross_domain_protocol(data)["cross_domain"]
  assert proto["removed_class_names"] == [
      n for n in folds.VOC_CLASS_NAMES if n not in COCO_TO_PASCAL_KEPT[0]]
  assert proto["kept_class_ids"] == kept and proto["trained_on"] == "coco20i"
  assert sources.cross_domain_protocol(_data()) == {}
  coco = _data(dataset="coco20i", fold=-1, cross_domain_from="pascal5i:3")
  removed = [folds.COCO_CLASS_NAMES[c] for c in
             sorted(set(range(80)) - set(sources.fold_classes_for(coco, "test")))]
  assert sorted(removed) == sorted(PASCAL_TO_COCO_REMOVED[3])
  # The PASCAL test source of a cross-domain evaluator indexes only the kept classes.
  root = tmp_path / "VOC2012"
  for sub in ("JPEGImages", "SegmentationClassAug", "splits/pascal/val"):
    (root / sub).mkdir(parents=True)
  for k in range(4):
    lines = [f"img{c}__{c + 1}" for c in range(5 * k, 5 * k + 5)]
    (root / "splits/pascal/val" / f"fold{k}.txt").write_text("\n".join(lines) + "\n")
  src = sources.build_source(_data(root=str(root), fold=-1, cross_domain_from="coco20i:0"),
                             "test", cache_dir=str(tmp_path / "cache"))
  assert src.classes == kept
  with pytest.raises(ValueError, match="cross_domain_from"):
    sources.fold_classes_for(_data(cross_domain_from="coco:0"), "test")
  with pytest.raises(ValueError, match="test split"):
    sources.fold_classes_for(data, "train")
