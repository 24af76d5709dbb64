"""Segmentation metrics: the published few-shot protocol and an open-vocabulary mIoU.

Few-shot protocol (HSNet, Min et al., ICCV 2021; juhongm999/hsnet `common/evaluation.py` and
`common/logger.py`):

  * Per episode, `intersection_union` counts intersection and union of background (index 0)
    and foreground (index 1). A truth pixel of 255 is *ignore*: HSNet sets the prediction to
    255 wherever the truth is 255 and counts areas with `torch.histc(bins=2, min=0, max=1)`,
    so ignore pixels are excluded from the prediction area, the truth area and the
    intersection alike. We do the same by masking both sides.
  * `SegmentationAccumulator` sums the counts per class over all episodes (HSNet's
    `AverageMeter.intersection_buf/union_buf`), then
      IoU_c  = sum inter_fg(c) / max(sum union_fg(c), 1),
      mIoU   = mean of IoU_c over ALL test classes of the fold x 100 (a class never drawn has
               IoU 0, exactly as HSNet's buffer of zeros gives 0 / max(0, 1)),
      FB-IoU = mean over {bg, fg} of (sum over all episodes of inter) / (sum of union) x 100
               (HSNet sums the class buffers over the test classes, i.e. pools every episode;
               HSNet divides without a floor, we use max(., 1) so that an empty run gives 0).
    This is *not* the mean of per-episode IoUs.
  * `vote` is HSNet's K-shot rule: the K one-shot argmax masks are summed into votes, and a
    pixel is foreground where votes / max(max_votes_in_image, 1) >= 0.5.

  * `SegmentationAccumulator.result(left_out=...)` also reports the mean over the classes
    that were evaluated: a fold class with fewer than K + 1 images never gets an episode, and
    the published mean (over all fold classes) counts it with IoU 0. `miou` is the mean over
    the classes not left out; `miou_all_classes` is the published logger's number. The two
    are equal when no class is left out (full COCO-20i and PASCAL-5i).

Open-vocabulary protocol (detectron2's `SemSegEvaluator.evaluate`, as changed in 2022):
`DenseAccumulator` keeps one confusion matrix (rows truth, columns prediction; truth pixels
equal to the data set's ignore label -- 255, or 65535 for 16-bit label maps -- are not counted,
nor are the predictions there). Per class: IoU = tp / (truth + predicted - tp), accuracy =
tp / truth. mIoU and mean accuracy average over the classes *present in the ground truth*
(a class only predicted, never in the truth, is left out: its false positives still lower the
IoU of the truth classes they were taken from); frequency-weighted IoU weights each class by
its truth pixels; pixel accuracy = sum tp / sum truth.

Counts are exact integers: int32 on device (exact up to 2^31 pixels per image), int64 sums on
the host.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fssjax.data.base import IGNORE  # 255: the few-shot masks' ignore label


# ----------------------------------------------------------------------------------------
# Device-side (jittable) per-episode counts.


def intersection_union(pred: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-episode intersection and union of background and foreground.

  Args:
    pred: [B, H, W] bool, or integers where nonzero is foreground.
    mask: [B, H, W] integer truth: 0 background, 1 foreground, 255 ignored. Any other value
      is treated like 255 (the evaluator rejects such masks on the host).

  Returns:
    (inter, union), each int32 [B, 2] with column 0 background and 1 foreground. Pixels
    where the truth is 255 count in neither the prediction nor the truth.
  """
  if pred.shape != mask.shape or pred.ndim != 3:
    raise ValueError(f"intersection_union expects pred and mask of equal shape [B,H,W]; got "
                     f"pred {pred.shape} and mask {mask.shape}")
  pred_fg = pred if pred.dtype == jnp.bool_ else pred != 0
  truth_fg = mask == 1
  truth_bg = mask == 0
  region = truth_fg | truth_bg
  pred_fg = pred_fg & region
  pred_bg = (~pred_fg) & region

  def count(x):
    return jnp.sum(x, axis=(1, 2), dtype=jnp.int32)

  inter = jnp.stack([count(pred_bg & truth_bg), count(pred_fg & truth_fg)], axis=1)
  area_pred = jnp.stack([count(pred_bg), count(pred_fg)], axis=1)
  area_truth = jnp.stack([count(truth_bg), count(truth_fg)], axis=1)
  return inter, area_pred + area_truth - inter


def vote(binary_preds: jax.Array) -> jax.Array:
  """HSNet's K-shot vote.

  Args:
    binary_preds: [B, K, H, W] bool (or 0/1 integers): the K one-shot foreground masks
      (argmax of each one-shot prediction).

  Returns:
    [B, H, W] bool: foreground where votes / max(max_votes_in_image, 1) >= 0.5, with votes
    the per-pixel sum over K and the maximum taken over the image's pixels. Computed in
    integers as 2 * votes >= max(max_votes, 1), which equals HSNet's float32 rule exactly
    (0.5 is representable and rounding is monotone), so ties at exactly 0.5 are foreground
    and an image with no vote at all is empty.
  """
  if binary_preds.ndim != 4:
    raise ValueError(f"vote expects [B, K, H, W]; got shape {binary_preds.shape}")
  return vote_from_counts(jnp.sum(binary_preds.astype(bool), axis=1, dtype=jnp.int32))


def vote_from_counts(votes: jax.Array) -> jax.Array:
  """The vote rule on per-pixel vote counts [B, H, W] (int): see `vote`."""
  max_votes = jnp.maximum(jnp.max(votes, axis=(1, 2), keepdims=True), 1)
  return 2 * votes >= max_votes


def confusion_matrix(pred: jax.Array, truth: jax.Array, num_classes: int,
                     ignore: int = IGNORE) -> jax.Array:
  """Jittable confusion matrix [num_classes, num_classes] int32, rows truth, columns prediction.

  Truth pixels equal to `ignore` (or outside [0, num_classes)) and predictions outside
  [0, num_classes) are not counted.
  """
  truth = truth.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  keep = (truth != ignore) & (truth >= 0) & (truth < num_classes) & (pred >= 0) & (
      pred < num_classes)
  index = jnp.where(keep, truth * num_classes + pred, 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(
      keep.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------------------
# Host-side accumulation.


def sum_across_processes(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Sums host arrays over all JAX processes (identity with a single process).

  Every process must call this (it is a collective).
  """
  if jax.process_count() == 1:
    return [np.asarray(a) for a in arrays]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(tuple(np.asarray(a) for a in arrays))
  return [np.asarray(g).sum(axis=0).astype(np.asarray(a).dtype)
          for g, a in zip(gathered, arrays)]


class SegmentationAccumulator:
  """Class-wise few-shot IoU sums (HSNet's AverageMeter), on the host in int64.

  Attributes:
    class_ids: the fold's test classes, sorted; mIoU averages over all of them.
    inter, union: int64 [num_classes, 2] sums (column 0 background, 1 foreground).
    episodes: int64 [num_classes] number of episodes counted per class.
  """

  def __init__(self, class_ids: Sequence[int]):
    ids = [int(c) for c in class_ids]
    if not ids:
      raise ValueError("SegmentationAccumulator needs at least one class id")
    if len(set(ids)) != len(ids):
      raise ValueError(f"SegmentationAccumulator: duplicate class ids in {ids}")
    self.class_ids = tuple(sorted(ids))
    self._row = {c: i for i, c in enumerate(self.class_ids)}
    self.inter = np.zeros((len(ids), 2), np.int64)
    self.union = np.zeros((len(ids), 2), np.int64)
    self.episodes = np.zeros((len(ids),), np.int64)

  def update(self, class_id, inter, union, valid=None) -> None:
    """Adds a batch of episodes.

    Args:
      class_id: [B] integer class of each episode.
      inter, union: [B, 2] counts from `intersection_union` (numpy or jax arrays).
      valid: optional [B] bool; False rows (batch padding) are skipped.

    Raises:
      ValueError: on mismatched shapes, or a valid episode whose class is not a test class.
    """
    class_id = np.asarray(class_id).reshape(-1)
    inter = np.asarray(inter, np.int64)
    union = np.asarray(union, np.int64)
    b = class_id.shape[0]
    valid = np.ones((b,), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if inter.shape != (b, 2) or union.shape != (b, 2) or valid.shape != (b,):
      raise ValueError(f"update: expected class_id [B], inter/union [B,2], valid [B]; got "
                       f"{class_id.shape}, {inter.shape}, {union.shape}, {valid.shape}")
    if np.any(inter[valid] > union[valid]) or np.any(inter[valid] < 0):
      raise ValueError("update: intersection larger than union or negative counts")
    rows = []
    for c in class_id[valid]:
      row = self._row.get(int(c))
      if row is None:
        raise ValueError(f"update: episode of class {int(c)} is not one of the test classes "
                         f"{list(self.class_ids)}")
      rows.append(row)
    rows = np.asarray(rows, np.int64)
    np.add.at(self.inter, rows, inter[valid])
    np.add.at(self.union, rows, union[valid])
    np.add.at(self.episodes, rows, 1)

  def merge(self, other: "SegmentationAccumulator") -> "SegmentationAccumulator":
    """Adds `other`'s sums into this accumulator (same class ids required); returns self."""
    if other.class_ids != self.class_ids:
      raise ValueError(f"merge: class ids differ: {list(self.class_ids)} vs "
                       f"{list(other.class_ids)}")
    self.inter += other.inter
    self.union += other.union
    self.episodes += other.episodes
    return self

  def sum_across_processes(self) -> "SegmentationAccumulator":
    """Replaces the sums by their total over all JAX processes (collective); returns self."""
    self.inter, self.union, self.episodes = sum_across_processes(
        [self.inter, self.union, self.episodes])
    return self

  allgather = sum_across_processes

  @property
  def n_episodes(self) -> int:
    return int(self.episodes.sum())

  def class_iou(self) -> np.ndarray:
    """Foreground IoU per class [num_classes] float64 in [0, 1] (0 for a class never drawn)."""
    return self.inter[:, 1] / np.maximum(self.union[:, 1], 1)

  def result(self, left_out: Sequence[int] = ()) -> dict:
    """The class-wise scores.

    Args:
      left_out: fold classes that could not be evaluated (fewer than K + 1 images, so no
        episode was drawn for them); they are excluded from `miou` but not from
        `miou_all_classes`.

    Returns:
      dict(miou: mean IoU x 100 over the classes not left out (the headline),
      miou_all_classes: mean over all fold classes (HSNet's logger; = miou when nothing is
      left out), fbiou, per_class_iou {class_id: IoU x 100}, n_episodes, per_class_episodes,
      left_out_classes: sorted list).

    Raises:
      ValueError: a left-out class that is not a fold class, or every class left out.
    """
    left = sorted({int(c) for c in left_out})
    unknown = [c for c in left if c not in self._row]
    if unknown:
      raise ValueError(f"result: left-out classes {unknown} are not among the fold classes "
                       f"{list(self.class_ids)}")
    if len(left) == len(self.class_ids):
      raise ValueError(f"result: every fold class {list(self.class_ids)} is left out")
    iou = self.class_iou()
    evaluated = np.ones((len(self.class_ids),), bool)
    evaluated[[self._row[c] for c in left]] = False
    pooled_inter = self.inter.sum(axis=0)
    pooled_union = self.union.sum(axis=0)
    fb = pooled_inter / np.maximum(pooled_union, 1)
    all_classes = float(iou.mean() * 100.0)
    return dict(
        miou=float(iou[evaluated].mean() * 100.0) if left else all_classes,
        miou_all_classes=all_classes,
        fbiou=float(fb.mean() * 100.0),
        per_class_iou={c: float(v * 100.0) for c, v in zip(self.class_ids, iou)},
        per_class_episodes={c: int(n) for c, n in zip(self.class_ids, self.episodes)},
        n_episodes=self.n_episodes,
        left_out_classes=left,
    )


class DenseAccumulator:
  """Open-vocabulary dense segmentation scores from a confusion matrix (host, int64).

  Rows are truth classes, columns predicted classes; truth `ignore` pixels are skipped (the
  data set's ignore label: 255, or 65535 for 16-bit label maps such as ADE20K-847 and
  PASCAL-Context-459).
  """

  def __init__(self, num_classes: int, ignore: int = IGNORE):
    if num_classes < 1:
      raise ValueError(f"DenseAccumulator: num_classes must be >= 1, got {num_classes}")
    self.num_classes = int(num_classes)
    self.ignore = int(ignore)
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def update(self, pred, truth) -> None:
    """Adds predictions and truth of any equal shape (integer class indices).

    Raises:
      ValueError: on a shape mismatch, a truth value that is neither a class nor `ignore`,
        or a predicted value outside [0, num_classes).
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
      raise ValueError(f"DenseAccumulator.update: pred {pred.shape} != truth {truth.shape}")
    truth = truth.astype(np.int64).reshape(-1)
    pred = pred.astype(np.int64).reshape(-1)
    keep = truth != self.ignore
    truth, pred = truth[keep], pred[keep]
    n = self.num_classes
    if truth.size and (truth.min() < 0 or truth.max() >= n):
      bad = truth[(truth < 0) | (truth >= n)][0]
      raise ValueError(f"DenseAccumulator.update: truth value {bad} is neither a class in "
                       f"[0, {n}) nor the ignore label {self.ignore}")
    if pred.size and (pred.min() < 0 or pred.max() >= n):
      bad = pred[(pred < 0) | (pred >= n)][0]
      raise ValueError(f"DenseAccumulator.update: predicted value {bad} outside [0, {n})")
    self.matrix += np.bincount(truth * n + pred, minlength=n * n).reshape(n, n)

  def update_matrix(self, matrix) -> None:
    """Adds a confusion matrix computed on device (see `confusion_matrix`)."""
    matrix = np.asarray(matrix, np.int64)
    if matrix.shape != self.matrix.shape:
      raise ValueError(f"update_matrix: expected {self.matrix.shape}, got {matrix.shape}")
    self.matrix += matrix

  def merge(self, other: "DenseAccumulator") -> "DenseAccumulator":
    if other.num_classes != self.num_classes:
      raise ValueError(f"merge: {self.num_classes} vs {other.num_classes} classes")
    self.matrix += other.matrix
    return self

  def sum_across_processes(self) -> "DenseAccumulator":
    (self.matrix,) = sum_across_processes([self.matrix])
    return self

  allgather = sum_across_processes

  def result(self, class_names: Sequence[str] | Mapping[int, str] | None = None) -> dict:
    """Scores of the accumulated confusion matrix (detectron2's rule, see the module docstring).

    Returns:
      dict(miou, macc, fwiou, pixel_acc (all x 100), per_class_iou and per_class_acc
      {class index or name: x 100, nan for a class absent from the truth},
      n_classes_present (classes with truth pixels), predicted_not_present (classes predicted
      but absent from the truth: indices or names), n_pixels (counted truth pixels)).
      With no counted pixel at all every score is 0.
    """
    tp = np.diag(self.matrix).astype(np.float64)
    pos_truth = self.matrix.sum(axis=1).astype(np.float64)
    pos_pred = self.matrix.sum(axis=0).astype(np.float64)
    union = pos_truth + pos_pred - tp
    present = pos_truth > 0  # detectron2: acc_valid = pos_gt > 0; iou_valid = acc_valid & union > 0
    iou = np.full((self.num_classes,), np.nan)
    acc = np.full((self.num_classes,), np.nan)
    iou[present] = tp[present] / union[present]
    acc[present] = tp[present] / pos_truth[present]
    total = pos_truth.sum()
    keys = list(range(self.num_classes)) if class_names is None else [
        class_names[i] for i in range(self.num_classes)]
    if present.any():
      miou = float(iou[present].mean() * 100.0)
      macc = float(acc[present].mean() * 100.0)
      fwiou = float(np.sum(iou[present] * pos_truth[present] / total) * 100.0)
    else:
      miou = macc = fwiou = 0.0
    return dict(
        miou=miou,
        macc=macc,
        fwiou=fwiou,
        pixel_acc=float(tp.sum() / total * 100.0) if total else 0.0,
        per_class_iou={k: float(v * 100.0) for k, v in zip(keys, iou)},
        per_class_acc={k: float(v * 100.0) for k, v in zip(keys, acc)},
        n_classes_present=int(present.sum()),
        predicted_not_present=[keys[i] for i in np.flatnonzero((pos_pred > 0) & ~present)],
        n_pixels=int(total),
    )
