"""TensorBoard output without TensorFlow, read back with tensorboard's own event reader, and
the evaluation pictures checked pixel by pixel."""

import glob
import io
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from fssjax import monitoring


def read_events(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_writer_event_files_read_back_without_tensorflow(tmp_path):
  logdir = str(tmp_path / "tb")
  writer = monitoring.create_writer(logdir)
  writer.write_hparams({"optimizer": {"lr": 1e-3, "name": "adam"}, "train.batch_size": 8,
                        "data.augment": True})
  writer.write_scalars(3, {"eval/miou": 41.5, "train/loss": np.float32(0.25)})
  writer.write_scalars(5, {"eval/miou": 42.5})
  picture = np.zeros((2, 6, 10, 3), np.float32)
  picture[0, 1, 2] = (1.0, 0.5, 0.0)
  writer.write_images(5, {"eval/episodes": picture})
  writer.write_texts(5, {"eval/left_out": "classes 4, 7"})
  writer.write_histograms(5, {"train/hist": np.arange(10.0)})
  writer.close()
  assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1

  acc = read_events(logdir)
  tags = acc.Tags()["tensors"]
  assert {"eval/miou", "train/loss", "eval/episodes", "eval/left_out", "train/hist"} <= set(tags)
  # Scalars: TensorFlow 2's format (tensor summaries of the scalars plugin).
  miou = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in acc.Tensors("eval/miou")]
  assert miou == [(3, 41.5), (5, 42.5)]
  assert acc.SummaryMetadata("eval/miou").plugin_data.plugin_name == "scalars"
  # Images: [width, height, PNG...] of the images plugin; decodes to the written pixels.
  (event,) = acc.Tensors("eval/episodes")
  data = tensor_util.make_ndarray(event.tensor_proto)
  assert acc.SummaryMetadata("eval/episodes").plugin_data.plugin_name == "images"
  assert data[0] == b"10" and data[1] == b"6" and len(data) == 4
  first = np.asarray(Image.open(io.BytesIO(data[2])))
  assert first.shape == (6, 10, 3) and tuple(first[1, 2]) == (255, 128, 0)
  # Text.
  (event,) = acc.Tensors("eval/left_out")
  assert tensor_util.make_ndarray(event.tensor_proto).item() == b"classes 4, 7"
  assert acc.SummaryMetadata("eval/left_out").plugin_data.plugin_name == "text"
  # Hparams: the session start info of the hparams plugin, nested keys flattened.
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  assert info.hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
  assert info.hparams["optimizer.name"].string_value == "adam"
  assert info.hparams["data.augment"].bool_value is True
  assert info.hparams["train.batch_size"].number_value == 8


def test_no_tensorflow_imported_by_the_writer_or_clu():
  code = ("import sys\n"
          "import fssjax.monitoring\n"
          "from clu import metric_writers, periodic_actions\n"
          "import fssjax.evaluators, fssjax.results\n"
          "assert metric_writers.SummaryWriter is not None\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'torch'))\n"
          "print('IMPORTED', bad)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "IMPORTED []" in proc.stdout, proc.stdout


def _summary(query, truth, prediction, *, iou=37.5, name="dog"):
  return dict(query=query, truth=truth, prediction=prediction, support=query,
              support_mask=truth, class_id=12, class_name=name, episode_index=7, iou=iou)


def test_episode_picture_contours_visible_on_an_object_of_the_same_colour():
  h = w = 40
  # The object is pure green, the colour of the truth contour.
  query = np.full((h, w, 3), 0.3, np.float32)
  truth = np.zeros((h, w), np.uint8)
  truth[10:30, 12:28] = 1
  query[truth == 1] = monitoring.TRUTH_COLOR
  prediction = np.zeros((h, w), np.uint8)
  prediction[14:34, 12:28] = 1
  truth[0, :] = 255  # an ignored row
  picture = monitoring.episode_picture([_summary(query, truth, prediction)])
  th = picture.shape[1] - h  # the caption band: whole 14-pixel lines
  assert th % monitoring.TEXT_HEIGHT == 0 and th >= monitoring.TEXT_HEIGHT
  assert picture.shape == (1, th + h, 4 * w, 3) and picture.dtype == np.float32
  row = picture[0]
  panel = lambda k: row[th:, k * w:(k + 1) * w]
  # Panel 0 is the query itself.
  np.testing.assert_allclose(panel(0), query, atol=1 / 255)
  # Truth panel: the contour is on the mask's boundary, the dark halo just outside it, so the
  # outline shows even though object and contour are both green.
  truth_panel = panel(1)
  green = np.asarray(monitoring.TRUTH_COLOR)
  np.testing.assert_allclose(truth_panel[10, 12:28], np.tile(green, (16, 1)))
  np.testing.assert_allclose(truth_panel[29, 20], green)
  np.testing.assert_allclose(truth_panel[9, 12:28], 0.0)  # halo above the top edge
  np.testing.assert_allclose(truth_panel[30, 12:28], 0.0)  # and below the bottom edge
  np.testing.assert_allclose(truth_panel[20, 11], 0.0)
  # Interior: the object's own colour, lightly tinted; outside: the image.
  np.testing.assert_allclose(truth_panel[20, 20], green, atol=1e-6)
  np.testing.assert_allclose(truth_panel[5, 5], query[5, 5])
  # Ignored pixels are greyed.
  assert np.all(np.abs(truth_panel[0, 5] - (0.5 * query[0, 5] + 0.25)) < 1e-6)
  # Prediction panel: a red contour where the prediction's boundary is, not where the truth's.
  pred_panel = panel(2)
  red = np.asarray(monitoring.PREDICTION_COLOR)
  np.testing.assert_allclose(pred_panel[14, 12:28], np.tile(red, (16, 1)))
  np.testing.assert_allclose(pred_panel[33, 20], red)
  assert not np.allclose(pred_panel[10, 20], red)
  # Support panel: a blue contour.
  np.testing.assert_allclose(panel(3)[10, 20], monitoring.SUPPORT_COLOR)
  # The caption band holds white text on black: class name, episode and IoU.
  band = row[:th]
  assert monitoring.row_caption(_summary(query, truth, prediction)) == (
      "dog (class 12) | episode 7 | IoU 37.5")
  lines = [band[i:i + monitoring.TEXT_HEIGHT] for i in range(0, th, monitoring.TEXT_HEIGHT)]
  for line in lines:  # every caption line holds white text
    assert (line.max(axis=-1) > 0.5).sum() > 20
  assert np.all(band[:, -3:] == 0)  # wrapped, not clipped: the band's right end stays empty
  # The IoU is on the last line: another IoU changes that line's pixels and nothing else.
  other = monitoring.episode_picture([_summary(query, truth, prediction, iou=99.9)])
  assert other.shape == picture.shape
  last = slice(th - monitoring.TEXT_HEIGHT, th)
  assert not np.array_equal(other[0, last], row[last])
  np.testing.assert_array_equal(other[0, :th - monitoring.TEXT_HEIGHT],
                                row[:th - monitoring.TEXT_HEIGHT])
  np.testing.assert_array_equal(other[0, th:], row[th:])
  # A narrow row (4 x 12 pixels) wraps the caption onto several lines instead of clipping it.
  small = np.zeros((12, 12), np.uint8)
  narrow = monitoring.episode_row(_summary(np.zeros((12, 12, 3), np.float32), small, small))
  n_lines = (narrow.shape[0] - 12) // monitoring.TEXT_HEIGHT
  assert n_lines >= 3 and np.all(narrow[:-12, -2:] == 0)
  # A wide row has the whole caption on one line.
  wide = monitoring.episode_picture([_summary(np.zeros((20, 100, 3), np.float32),
                                              np.zeros((20, 100), np.uint8),
                                              np.zeros((20, 100), np.uint8))])
  assert wide.shape == (1, monitoring.TEXT_HEIGHT + 20, 400, 3)


def test_episode_picture_rows_at_the_scored_resolution():
  # Original-resolution scoring: truth 30x20 while the network input is 16x16. The row is drawn
  # at 30x20; rows of different sizes are padded to the widest.
  query = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
  t1 = np.zeros((30, 20), np.uint8)
  t1[5:25, 5:15] = 1
  t2 = np.zeros((16, 16), np.uint8)
  t2[4:12, 4:12] = 1
  s1 = dict(_summary(query, t1, t1), support_mask=t2)
  s2 = _summary(query, t2, t2)
  picture = monitoring.episode_picture([s1, s2])
  r1, r2 = monitoring.episode_row(s1), monitoring.episode_row(s2)
  th1 = r1.shape[0] - 30
  assert r1.shape[1:] == (4 * 20, 3) and r2.shape[1:] == (4 * 16, 3)
  assert picture.shape == (1, r1.shape[0] + 2 + r2.shape[0], 4 * 20, 3)
  np.testing.assert_allclose(picture[0, th1 + 5, 20 + 5], monitoring.TRUTH_COLOR)
  np.testing.assert_array_equal(picture[0, r1.shape[0] + 2:, :64], r2)
  np.testing.assert_allclose(picture[0, r1.shape[0] + 2:, 64:], 0.2)  # padding
  assert monitoring.episode_picture([]).shape[0] == 0


def test_write_eval_and_summary_line(tmp_path):
  class Recorder:
    def __init__(self):
      self.scalars, self.images = {}, {}

    def write_scalars(self, step, scalars):
      self.scalars.update(scalars)

    def write_images(self, step, images):
      self.images.update(images)

  t = np.zeros((8, 8), np.uint8)
  t[2:6, 2:6] = 1
  q = np.zeros((8, 8, 3), np.float32)
  results = dict(miou=100.0, miou_all_classes=80.0, left_out_classes=[4], fbiou=90.0,
                 baseline_miou=10.0, baseline_fbiou=20.0, support_empty=3,
                 per_class_iou={0: 100.0, 4: 0.0}, class_names={0: "cat", 4: "rare"},
                 n_episodes=10, shots=1, resolution="8x8", summaries=[_summary(q, t, t)])
  rec = Recorder()
  monitoring.write_eval(rec, 1, results, prefix="eval")
  assert rec.scalars["eval/miou"] == 100.0 and rec.scalars["eval/miou_all_classes"] == 80.0
  assert rec.scalars["eval/support_empty"] == 3
  assert "eval/per_class_iou/000_cat" in rec.scalars
  assert "eval/per_class_iou/004_rare" not in rec.scalars  # left out: no misleading 0
  assert rec.images["eval/episodes"].shape[0] == 1
  line = monitoring.summary_line(results)
  assert line.startswith("mIoU 100.00 over 1 of 2 classes (all 2 fold classes, published "
                         "logger: 80.00")
  assert "3 empty support masks" in line
  js = monitoring.results_for_json(dict(results, per_class_iou={0: float("nan")}))
  assert "summaries" not in js and js["per_class_iou"] == {"0": None}
  config = ml_collections.ConfigDict(dict(a=dict(b=1, c=[1, 2]), d="x"))
  assert monitoring.flatten_config(config) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
