"""Dense open-vocabulary sources (fssjax.data.dense) and class names (fssjax.data.class_names).

Each test writes a tiny data set in the layout the detectron2 preparation scripts write (8-bit
PNG label maps with 255 = ignore; 16-bit TIFF with 65535 = ignore for ADE20K-847 and
PASCAL-Context-459) and reads it back.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fssjax import evaluators
from fssjax.data import class_names as cn
from fssjax.data import dense
from fssjax.data.base import DataError

FOLDER = {"coco_stuff_171": "coco", "ade20k_150": "ADEChallengeData2016",
          "ade20k_847": "ADE20K_2021_17_01", "pascal_context_59": "pascal_ctx_d2",
          "pascal_context_459": "pascal_ctx_d2", "pascal_voc_20": "pascal_voc_d2"}


def _write_split(top: str, benchmark: str, split: str, labels: dict[str, np.ndarray]):
  lay = dense.LAYOUTS[benchmark]
  sub = lay.splits[0 if split == "train" else 1]
  img_dir = os.path.join(top, lay.images.format(split=sub))
  lab_dir = os.path.join(top, lay.labels.format(split=sub))
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(lab_dir, exist_ok=True)
  rng = np.random.RandomState(0)
  for stem, lab in labels.items():
    h, w = lab.shape
    Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(img_dir, stem + ".jpg"), quality=95)
    if lay.ignore_label == 65535:
      Image.fromarray(lab.astype(np.uint16)).save(os.path.join(lab_dir, stem + ".tif"))
    else:
      Image.fromarray(lab.astype(np.uint8)).save(os.path.join(lab_dir, stem + ".png"))
  return img_dir, lab_dir


def _label(h, w, classes, ignore, seed=0):
  rng = np.random.RandomState(seed)
  lab = rng.choice(classes, size=(h, w)).astype(np.int64)
  lab[0, :3] = ignore
  return lab


def test_class_names_from_fc_clip():
  counts = {b: len(cn.class_names(b)) for b in cn.BENCHMARKS}
  assert counts == {"coco_stuff_171": 171, "ade20k_150": 150, "ade20k_847": 847,
                    "pascal_context_59": 59, "pascal_context_459": 459, "pascal_voc_20": 20}
  assert cn.class_names("ade20k_150")[:3] == ("wall", "building", "sky")
  assert cn.class_synonyms("ade20k_150")[8] == ("windowpane", "window", "windows")
  assert cn.class_names("pascal_voc_20")[0] == "aeroplane"  # no background
  assert cn.class_names("pascal_voc_20")[-1] == "tvmonitor"
  assert cn.class_names("pascal_context_459")[:2] == ("accordion", "aeroplane")
  assert cn.class_names("ade20k_847")[-1] == "adding machine"
  # COCO-Stuff-171: contiguous class k has COCO id dataset_ids[k]; 11 ids are unused.
  ids = cn.dataset_ids("coco_stuff_171")
  assert ids[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13) and ids[-1] == 182
  assert len(set(range(1, 183)) - set(ids)) == 11
  assert cn.class_names("coco_stuff_171")[0] == "person"
  assert cn.class_prompts("pascal_voc_20")[0].startswith("aeroplane, airplane")
  assert all(n and n == n.strip() for syn in cn.class_synonyms("ade20k_847") for n in syn)
  with pytest.raises(ValueError, match="line 2"):
    cn.parse("0:invalid_class_id\nwall,walls\n", "x.txt")
  with pytest.raises(ValueError, match="Unknown benchmark"):
    cn.class_names("ade20k_151")


@pytest.mark.parametrize("benchmark", dense.BENCHMARKS)
def test_source_reads_detectron2_layout(tmp_path, benchmark):
  lay = dense.LAYOUTS[benchmark]
  c = len(cn.class_names(benchmark))
  assert lay.ignore_label == evaluators.DENSE_IGNORE_LABELS[benchmark]
  top = os.path.join(str(tmp_path), FOLDER[benchmark])
  classes = [0, 1, c - 1] + ([300, 500] if c > 500 else [])
  labels = {"b_img": _label(5, 7, classes, lay.ignore_label, 1),
            "a_img": _label(6, 4, classes, lay.ignore_label, 2)}
  _write_split(top, benchmark, "val", labels)
  # root = the folder holding the benchmark's folder ($DETECTRON2_DATASETS) or the folder.
  for root in (str(tmp_path), top):
    src = dense.DetectronSemSegSource(benchmark, root, "test")
    assert len(src) == 2 and src.stems == ("a_img", "b_img")  # sorted by stem
    assert src.ignore_label == lay.ignore_label and len(src.class_names) == c
    image, label = src.load(0)
    assert image.dtype == np.uint8 and image.shape == (6, 4, 3)
    assert label.dtype == np.int32
    np.testing.assert_array_equal(label, labels["a_img"])  # 16-bit values kept exactly
    assert isinstance(src, evaluators.DenseSource)
  # Registered with the dense evaluator (data.split defaults to the validation split).
  data = ml_collections.ConfigDict(dict(dataset=benchmark, root=str(tmp_path), max_images=1))
  via = evaluators.dense_source(data)
  assert isinstance(via, dense.DetectronSemSegSource) and len(via) == 1
  # No training split written: a clear error naming the folder and the layout.
  with pytest.raises(DataError, match="Expected .* layout"):
    dense.DetectronSemSegSource(benchmark, str(tmp_path), "train")


def test_ade847_alternative_folder(tmp_path):
  # FC-CLIP's prepare_ade20k_full_sem_seg.py writes under ade/ADE20K_2021_17_01.
  top = os.path.join(str(tmp_path), "ade", "ADE20K_2021_17_01")
  _write_split(top, "ade20k_847", "train", {"x": _label(4, 4, [0, 846], 65535)})
  src = dense.DetectronSemSegSource("ade20k_847", str(tmp_path), "train")
  assert src.name == "ade20k_847-training" and src.load(0)[1].max() == 65535


def test_errors_name_files_and_layout(tmp_path):
  with pytest.raises(DataError) as e:
    dense.DetectronSemSegSource("ade20k_150", str(tmp_path / "nowhere"), "val")
  msg = str(e.value)
  assert "ADEChallengeData2016/images/validation/<stem>.jpg" in msg
  assert "annotations_detectron2/validation/<stem>.png" in msg
  top = os.path.join(str(tmp_path), "pascal_voc_d2")
  img_dir, lab_dir = _write_split(top, "pascal_voc_20", "val",
                                  {"ok": _label(4, 4, [0, 19], 255),
                                   "bad": _label(4, 4, [0, 19], 255)})
  # A label value that is neither a class nor the ignore value.
  bad = _label(4, 4, [0, 19], 255)
  bad[2, 2] = 20
  Image.fromarray(bad.astype(np.uint8)).save(os.path.join(lab_dir, "bad.png"))
  src = dense.DetectronSemSegSource("pascal_voc_20", str(tmp_path), "val")
  with pytest.raises(DataError, match=r"bad\.png: label values \[20\]"):
    src.load(src.stems.index("bad"))
  # A label map without its image.
  os.remove(os.path.join(img_dir, "ok.jpg"))
  with pytest.raises(DataError, match="ok.png; expected .*ok.jpg"):
    dense.DetectronSemSegSource("pascal_voc_20", str(tmp_path), "val")
  with pytest.raises(ValueError, match="unknown split"):
    dense.DetectronSemSegSource("pascal_voc_20", str(tmp_path), "trainval")


def test_eval_resize_protocol():
  # detectron2 ResizeShortestEdge.get_output_shape.
  assert dense.shortest_edge_size(480, 640) == (640, 853)
  assert dense.shortest_edge_size(1000, 300) == (2133, 640)
  assert dense.shortest_edge_size(100, 1000) == (256, 2560)  # capped by max_size
  assert dense.shortest_edge_size(100, 1000, 640, 0) == (640, 6400)
  img = np.zeros((30, 40, 3), np.uint8)
  assert dense.resize_for_eval(img, short=64).shape == (64, 85, 3)
  # Logits back to label size: PyTorch bilinear, align_corners=False, edges clamped.
  logits = np.array([[[0.0], [1.0]]], np.float32)  # [1, 2, 1]
  up = np.asarray(dense.logits_to_label_size(logits, 1, 4))[0, :, 0]
  np.testing.assert_allclose(up, [0.0, 0.25, 0.75, 1.0], atol=1e-6)
  two = np.zeros((2, 2, 2), np.float32)
  two[:, 0, 0] = two[:, 1, 1] = 1.0  # class 0 on the left column, class 1 on the right
  # Sample positions x = (j + 0.5) * 2 / 5 - 0.5 = -0.3, 0.1, 0.5, 0.9, 1.3 (0.5: a tie -> 0).
  pred = dense.predict_label_map(two, 3, 5)
  np.testing.assert_array_equal(pred, np.tile([0, 0, 0, 1, 1], (3, 1)))



def test_semantic_targets():
  label = np.array([[3, 3, 255], [0, 3, 7]])
  classes, masks = dense.semantic_targets(label, 255, 5)
  np.testing.assert_array_equal(classes, [0, 3, 7, -1, -1])
  np.testing.assert_array_equal(masks[1], [[1, 1, 0], [0, 1, 0]])
  assert masks[0].sum() == 1 and masks[2].sum() == 1 and not masks[3:].any()
  assert masks.sum(0)[0, 2] == 0  # the ignored pixel is in no mask
  with pytest.raises(ValueError, match="max_targets"):
    dense.semantic_targets(label, 255, 2)
