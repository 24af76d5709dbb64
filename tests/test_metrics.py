"""Hand-computed checks of the few-shot protocol (HSNet) and the dense open-vocabulary mIoU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax import metrics

I = 255  # ignore


def _iu(pred, mask):
  inter, union = jax.jit(metrics.intersection_union)(
      jnp.asarray(pred), jnp.asarray(mask, jnp.uint8))
  return np.asarray(inter), np.asarray(union)


def test_intersection_union_excludes_ignore_from_prediction_and_truth():
  pred = np.array([[[1, 1],
                    [0, 1]]], bool)
  mask = np.array([[[1, I],
                    [0, 0]]], np.uint8)
  # Counted pixels: (0,0) truth 1, (1,0) truth 0, (1,1) truth 0; (0,1) is ignored although
  # the prediction says foreground there.
  # fg: pred {(0,0),(1,1)} = 2, truth {(0,0)} = 1, inter 1 -> union 2 + 1 - 1 = 2
  #     (it would be 3 if the ignored prediction counted).
  # bg: pred {(1,0)} = 1, truth {(1,0),(1,1)} = 2, inter 1 -> union 1 + 2 - 1 = 2.
  inter, union = _iu(pred, mask)
  np.testing.assert_array_equal(inter, [[1, 1]])
  np.testing.assert_array_equal(union, [[2, 2]])
  assert inter.dtype == np.int32
  # Integer predictions: nonzero is foreground.
  inter2, union2 = _iu(pred.astype(np.int32) * 7, mask)
  np.testing.assert_array_equal(inter2, inter)
  np.testing.assert_array_equal(union2, union)


def _hsnet_reference(pred, mask):
  """HSNet's Evaluator.classify_prediction, written with numpy histograms."""
  inters, unions = [], []
  for p, g in zip(pred.astype(np.float64), mask.astype(np.float64)):
    p = p.copy()
    p[g == I] = I
    hist = lambda x: np.histogram(x, bins=2, range=(0, 1))[0]  # like torch.histc(bins=2, 0, 1)
    inter = hist(p[p == g])
    union = hist(p) + hist(g) - inter
    inters.append(inter)
    unions.append(union)
  return np.array(inters), np.array(unions)


def test_intersection_union_matches_hsnet_histogram_reference():
  rng = np.random.default_rng(0)
  pred = rng.random((6, 9, 7)) > 0.5
  mask = rng.choice(np.array([0, 1, I], np.uint8), size=(6, 9, 7), p=[0.45, 0.45, 0.1])
  mask[0] = I  # an all-ignored image counts nothing
  inter, union = _iu(pred, mask)
  want_inter, want_union = _hsnet_reference(pred, mask)
  np.testing.assert_array_equal(inter, want_inter)
  np.testing.assert_array_equal(union, want_union)
  np.testing.assert_array_equal(inter[0], [0, 0])
  np.testing.assert_array_equal(union[0], [0, 0])


def _episodes():
  """Three 1x10 episodes; classes 0, 0, 1 (class 2 of the fold is never drawn)."""
  truth = np.array([
      [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]],  # A, class 0
      [[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]],  # B, class 0
      [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]],  # C, class 1
  ], np.uint8)
  pred = np.array([
      [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
      [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
      [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0]],
  ], bool)
  return pred, truth, np.array([0, 0, 1])


def test_classwise_miou_and_pooled_fbiou_by_hand():
  pred, truth, cls = _episodes()
  inter, union = _iu(pred, truth)
  # A: fg inter 1 union 1;  bg inter 9 union 9.
  # B: fg inter 0 union 9;  bg pred 10, truth 1, inter 1 -> union 10.
  # C: fg pred {1,2,3}, truth {0,1,2}: inter 2, union 4;  bg pred 7, truth 7, inter 6 -> 8.
  np.testing.assert_array_equal(inter, [[9, 1], [1, 0], [6, 2]])
  np.testing.assert_array_equal(union, [[9, 1], [10, 9], [8, 4]])
  acc = metrics.SegmentationAccumulator([0, 1, 2])
  acc.update(cls, inter, union)
  res = acc.result()
  # Class-wise: IoU_0 = (1 + 0) / (1 + 9) = 0.1, IoU_1 = 2 / 4 = 0.5, IoU_2 = 0 (never drawn).
  # mIoU = (0.1 + 0.5 + 0) / 3 = 20.0, whereas the mean of per-episode IoUs would be
  # (1 + 0 + 0.5) / 3 = 50.0 and the mean over drawn classes only 30.0.
  assert res["miou"] == pytest.approx(20.0, abs=1e-12)
  assert res["per_class_iou"] == pytest.approx({0: 10.0, 1: 50.0, 2: 0.0})
  assert res["per_class_episodes"] == {0: 2, 1: 1, 2: 0}
  assert res["n_episodes"] == 3
  # FB-IoU pooled over all episodes: bg 16 / 27, fg 3 / 14;
  # (16/27 + 3/14) / 2 x 100 = 40.343915...
  assert res["fbiou"] == pytest.approx((16 / 27 + 3 / 14) / 2 * 100, abs=1e-10)
  assert res["fbiou"] == pytest.approx(40.3439153, abs=1e-6)


def test_padding_rows_change_nothing():
  pred, truth, cls = _episodes()
  inter, union = _iu(pred, truth)
  ref = metrics.SegmentationAccumulator([0, 1, 2])
  ref.update(cls, inter, union)
  padded = metrics.SegmentationAccumulator([0, 1, 2])
  # Padding rows carry junk (even a class outside the fold); valid=False must skip them.
  padded.update(np.r_[cls, 77, 1], np.r_[inter, [[5, 5], [3, 3]]],
                np.r_[union, [[5, 5], [9, 9]]], valid=np.array([1, 1, 1, 0, 0], bool))
  assert padded.result() == ref.result()


def test_merge_and_process_sum_and_errors():
  pred, truth, cls = _episodes()
  inter, union = _iu(pred, truth)
  whole = metrics.SegmentationAccumulator([2, 1, 0])
  whole.update(cls, inter, union)
  a = metrics.SegmentationAccumulator([0, 1, 2])
  b = metrics.SegmentationAccumulator([0, 1, 2])
  a.update(cls[:1], inter[:1], union[:1])
  b.update(cls[1:], inter[1:], union[1:])
  a.merge(b).sum_across_processes()  # one process: the identity
  assert a.result() == whole.result()
  with pytest.raises(ValueError, match="class 5 is not one of the test classes"):
    a.update([5], inter[:1], union[:1])
  with pytest.raises(ValueError, match="class ids differ"):
    a.merge(metrics.SegmentationAccumulator([0, 1]))


def test_empty_accumulator_gives_zero():
  res = metrics.SegmentationAccumulator([3, 4]).result()
  assert res["miou"] == 0.0 and res["fbiou"] == 0.0 and res["n_episodes"] == 0


def test_vote_rule_cases():
  # K = 4 one-shot masks for 4 images of 4 pixels; votes written out per image.
  shots = np.zeros((4, 4, 1, 4), bool)
  # image 0: votes [4, 2, 1, 0], max 4: 4/4, 2/4 = 0.5 (tie -> fg), 1/4 < 0.5 -> [1,1,0,0]
  shots[0, :, 0, 0] = True
  shots[0, :2, 0, 1] = True
  shots[0, :1, 0, 2] = True
  # image 1: no votes at all: max 0 -> max(0, 1) = 1, 0/1 < 0.5 -> empty
  # image 2: votes [1, 1, 0, 0], max 1 -> [1,1,0,0]
  shots[2, 0, 0, 0] = True
  shots[2, 3, 0, 1] = True
  # image 3: votes [3, 1, 0, 2], max 3: 1, 1/3 < 0.5, 0, 2/3 -> [1,0,0,1]
  shots[3, :3, 0, 0] = True
  shots[3, 1, 0, 1] = True
  shots[3, 2:, 0, 3] = True
  got = np.asarray(jax.jit(metrics.vote)(jnp.asarray(shots)))
  want = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 0, 0]], [[1, 0, 0, 1]]], bool)
  np.testing.assert_array_equal(got, want)


def test_vote_matches_hsnet_float_rule_and_is_identity_for_one_shot():
  rng = np.random.default_rng(1)
  for k in (1, 2, 3, 5):
    shots = rng.random((5, k, 6, 6)) < rng.random((5, k, 1, 1))
    votes = shots.sum(1).astype(np.float32)
    max_vote = np.maximum(votes.reshape(5, -1).max(1), 1).reshape(5, 1, 1)
    want = (votes / max_vote) >= 0.5  # HSNet: pred_mask = agg.float() / max_vote; >= 0.5
    np.testing.assert_array_equal(np.asarray(metrics.vote(jnp.asarray(shots))), want)
    if k == 1:
      np.testing.assert_array_equal(want, shots[:, 0])


def test_dense_accumulator_by_hand():
  # 4 classes; truth uses 0, 1, 2; class 3 is only predicted; 255 ignored.
  truth = np.array([[0, 0, 1, 1, 2, I]])
  pred = np.array([[0, 1, 1, 1, 3, 3]])
  acc = metrics.DenseAccumulator(4)
  acc.update(pred, truth)
  # Counted pixels: the first five (the prediction under the ignored pixel is not counted).
  # Confusion matrix (rows truth, columns prediction):
  want = np.array([[1, 1, 0, 0],
                   [0, 2, 0, 0],
                   [0, 0, 0, 1],
                   [0, 0, 0, 0]])
  np.testing.assert_array_equal(acc.matrix, want)
  # class 0: tp 1, truth 2, pred 1 -> IoU 1/2, acc 1/2;  class 1: tp 2, truth 2, pred 3 -> 2/3,
  # acc 1;  class 2: tp 0, truth 1, pred 0 -> 0, acc 0;  class 3: predicted once, absent from
  # the truth -> left out (detectron2 since 2022: iou_valid = pos_gt > 0 & union > 0).
  # mIoU = (1/2 + 2/3 + 0) / 3 x 100 = 38.888...  (the old union > 0 rule gave 29.17)
  res = acc.result(class_names=["a", "b", "c", "d"])
  assert res["miou"] == pytest.approx((0.5 + 2 / 3) / 3 * 100)
  assert res["macc"] == pytest.approx((0.5 + 1 + 0) / 3 * 100)
  # fwIoU: truth frequencies 2/5, 2/5, 1/5.
  assert res["fwiou"] == pytest.approx((0.4 * 0.5 + 0.4 * 2 / 3) * 100)
  assert res["per_class_iou"]["b"] == pytest.approx(200 / 3)
  assert np.isnan(res["per_class_iou"]["d"]) and res["predicted_not_present"] == ["d"]
  assert res["n_classes_present"] == 3 and res["n_pixels"] == 5
  assert res["pixel_acc"] == pytest.approx(3 / 5 * 100)
  # A class absent from truth and prediction is left out of the mean too.
  acc5 = metrics.DenseAccumulator(5)
  acc5.update(pred, truth)
  r5 = acc5.result()
  assert r5["miou"] == pytest.approx(res["miou"]) and np.isnan(r5["per_class_iou"][4])
  # 16-bit label maps: 65535 ignored.
  acc16 = metrics.DenseAccumulator(4, ignore=65535)
  acc16.update(pred.astype(np.uint16), np.where(truth == I, 65535, truth).astype(np.uint16))
  np.testing.assert_array_equal(acc16.matrix, want)
  np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(
      jnp.asarray(pred), jnp.asarray(np.where(truth == I, 65535, truth)), 4, ignore=65535)),
      want)
  # No counted pixel at all: zeros, not NaN.
  empty = metrics.DenseAccumulator(3).result()
  assert empty["miou"] == 0.0 and empty["pixel_acc"] == 0.0 and empty["n_classes_present"] == 0
  # Device confusion matrix equals the host one; merge adds.
  cm = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(truth), 4)
  np.testing.assert_array_equal(np.asarray(cm), acc.matrix)
  other = metrics.DenseAccumulator(4)
  other.update_matrix(cm)
  other.merge(acc).sum_across_processes()
  np.testing.assert_array_equal(other.matrix, 2 * acc.matrix)
  with pytest.raises(ValueError, match="truth value 7"):
    acc.update(np.array([0]), np.array([7]))
  with pytest.raises(ValueError, match="predicted value 4"):
    acc.update(np.array([4]), np.array([0]))
