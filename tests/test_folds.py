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
