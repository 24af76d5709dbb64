"""Hungarian matching and the Mask2Former set losses (Cheng et al., Mask2Former, CVPR 2022).

Follows transformers' `Mask2FormerHungarianMatcher` and `Mask2FormerLoss`
(`transformers/models/mask2former/modeling_mask2former.py`, adapted there from
facebookresearch/Mask2Former `modeling/matcher.py` and `modeling/criterion.py`), in fixed-size
arrays so that everything but the assignment itself runs under `jit`:

  * Targets of a batch are padded to T per image: `target_classes` int [B, T] (-1 = padding) and
    `target_masks` [B, T, H, W] in {0, 1} (all images at one size H x W: pad them before, as
    the reference pads its targets to the largest image of the batch).
  * Cost (per image, [Q, T]): `class_weight * (-softmax(class_logits)[:, class])
    + mask_weight * mean_points BCE(sigmoid) + dice_weight * Dice`, the masks compared on P
    points drawn uniformly in [0, 1]^2 once per image and shared by every pair
    (`matching_cost`). Weights 2 / 5 / 5 and P = 12544 are the published defaults.
  * Assignment: `scipy.optimize.linear_sum_assignment` on the host (`hungarian_match`, NumPy
    in / out: call it outside jit), or inside jit through `jax.pure_callback`
    (`hungarian_match_jax`; the callback blocks on the host, every device's cost is gathered to
    it). NaN / inf costs are replaced by the largest float first (the reference's rule), so
    such pairs are chosen only when nothing else is left. The result is `assignment` int32
    [B, Q]: the matched target of each query, -1 for unmatched queries (no object).
  * Losses (`mask2former_losses`): classification cross-entropy over C + 1 classes (the last
    is "no object", weight `no_object_weight` = 0.1, mean weighted by the class weights as
    PyTorch's `CrossEntropyLoss(weight=...)`), mask sigmoid BCE (mean over points) and Dice,
    summed over matched pairs and divided by `num_masks` (the number of targets, at least 1;
    pass the all-device total when the batch is sharded), on points chosen by uncertainty
    (`sample_points_using_uncertainty`: of `oversample_ratio * P` uniform candidates the
    `importance_sample_ratio * P` whose mask logit is closest to 0, plus uniform points for
    the rest; 3 and 0.75 are the published values).
  * `set_criterion(key, ...)`: all of it (points drawn from `key`), jit-able, for a train step.

Random draws are explicit arguments of the lower-level functions, so tests feed the points the
PyTorch reference drew (tests/test_mask2former.py, fixtures by
scripts/make_mask2former_fixtures.py).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment as _scipy_lsa

from fssjax.nn.deformable_attention import point_sample

Array = jax.Array


def pairwise_sigmoid_ce(pred_logits: Array, targets: Array) -> Array:
  """Mean over points of BCE-with-logits between every prediction and every target.

  Args:
    pred_logits: [Q, P] mask logits at P points. targets: [T, P] target values in [0, 1].

  Returns:
    [Q, T] float32.
  """
  x = pred_logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = x.shape[-1]
  pos = jax.nn.softplus(-x)  # BCE(x, 1)
  neg = jax.nn.softplus(x)   # BCE(x, 0)
  hi = jax.lax.Precision.HIGHEST
  return (jnp.matmul(pos / p, t.T, precision=hi) + jnp.matmul(neg / p, (1.0 - t).T, precision=hi))


def pairwise_dice(pred_logits: Array, targets: Array) -> Array:
  """Dice loss 1 - (2 sum(s t) + 1) / (sum s + sum t + 1), s = sigmoid(pred), for every pair.

  Args:
    pred_logits: [Q, P]. targets: [T, P].

  Returns:
    [Q, T] float32.
  """
  s = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  num = 2.0 * jnp.matmul(s, t.T, precision=jax.lax.Precision.HIGHEST)
  den = s.sum(-1)[:, None] + t.sum(-1)[None, :]
  return 1.0 - (num + 1.0) / (den + 1.0)


def matching_cost(class_logits: Array, mask_logits: Array, target_classes: Array,
                  target_masks: Array, points: Array, *, class_weight: float = 2.0,
                  mask_weight: float = 5.0, dice_weight: float = 5.0) -> Array:
  """Mask2Former's matching cost of one image.

  Args:
    class_logits: [Q, C + 1] (last = no object).
    mask_logits: [Q, h, w] mask logits (any resolution: points are normalised).
    target_classes: int [T] (entries < 0 are padding; their columns are meaningless).
    target_masks: [T, H, W] in {0, 1}.
    points: [P, 2] (x, y) in [0, 1], shared by all pairs.

  Returns:
    [Q, T] float32.
  """
  q, t = mask_logits.shape[0], target_masks.shape[0]
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)
  cost_class = -jnp.take(probs, jnp.clip(target_classes, 0, None), axis=1)
  pred = point_sample(mask_logits, jnp.broadcast_to(points, (q,) + points.shape))
  tgt = point_sample(target_masks, jnp.broadcast_to(points, (t,) + points.shape))
  return (mask_weight * pairwise_sigmoid_ce(pred, tgt) + class_weight * cost_class
          + dice_weight * pairwise_dice(pred, tgt))


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
  """scipy's `linear_sum_assignment` on a [Q, T] cost, NaN / +-inf replaced by the dtype's max
  (transformers' rule). Host only. Returns (rows, cols) int64, rows ascending."""
  c = np.asarray(cost)
  big = np.finfo(c.dtype).max if np.issubdtype(c.dtype, np.floating) else np.finfo(np.float64).max
  c = np.nan_to_num(c, nan=big, posinf=big, neginf=big)
  return _scipy_lsa(c)


def hungarian_match(cost, num_targets) -> np.ndarray:
  """Optimal one-to-one assignment per image on the host (NumPy; call outside jit).

  Args:
    cost: [B, Q, T] matching costs (columns >= num_targets[b] are padding and ignored).
    num_targets: int [B] targets per image (0..T).

  Returns:
    int32 [B, Q]: the target matched to each query, -1 where none (min(Q, T_b) matches).

  Raises:
    ValueError: bad shapes or counts.
  """
  cost = np.asarray(cost)
  n = np.asarray(num_targets).reshape(-1)
  if cost.ndim != 3 or n.shape[0] != cost.shape[0]:
    raise ValueError(f"cost {cost.shape} must be [B, Q, T] and num_targets [B]; got "
                     f"num_targets of shape {np.shape(num_targets)}")
  if (n < 0).any() or (n > cost.shape[2]).any():
    raise ValueError(f"num_targets {n.tolist()} must lie in 0..T={cost.shape[2]}")
  out = np.full(cost.shape[:2], -1, np.int32)
  for b in range(cost.shape[0]):
    if n[b] == 0:
      continue
    rows, cols = linear_sum_assignment(cost[b, :, :int(n[b])])
    out[b, rows] = cols
  return out


def hungarian_match_jax(cost: Array, num_targets: Array) -> Array:
  """`hungarian_match` callable inside jit (a `jax.pure_callback` to the host; no gradient).

  Args / returns as `hungarian_match` (cost [B, Q, T] float, num_targets int [B]; int32 [B, Q]).
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  out = jax.ShapeDtypeStruct(cost.shape[:2], jnp.int32)
  return jax.pure_callback(hungarian_match, out, cost, num_targets.astype(jnp.int32),
                           vmap_method="sequential")


def sample_points_using_uncertainty(logits: Array, candidates: Array, random_points: Array,
                                    num_points: int, importance_sample_ratio: float = 0.75
                                    ) -> Array:
  """Points where the masks are least certain, plus uniform ones (Mask2Former / PointRend).

  Of the candidates, the int(importance_sample_ratio * num_points) with the largest
  uncertainty -|logit| (the logit sampled bilinearly there) are kept, then `random_points`
  are appended.

  Args:
    logits: [R, h, w] mask logits.
    candidates: [R, K, 2] uniform points in [0, 1]^2 (K = oversample_ratio * num_points).
    random_points: [R, num_points - n_uncertain, 2] uniform points.
    num_points: P.
    importance_sample_ratio: fraction of P chosen by uncertainty.

  Returns:
    [R, P, 2] (uncertain points first, in decreasing uncertainty).
  """
  n_unc = int(importance_sample_ratio * num_points)
  if random_points.shape[1] != num_points - n_unc:
    raise ValueError(f"random_points has {random_points.shape[1]} points per mask; expected "
                     f"num_points - int(importance_sample_ratio * num_points) = "
                     f"{num_points - n_unc}")
  uncertainty = -jnp.abs(point_sample(jax.lax.stop_gradient(logits), candidates))
  _, idx = jax.lax.top_k(uncertainty, n_unc)
  chosen = jnp.take_along_axis(candidates, idx[..., None], axis=1)
  return jnp.concatenate([chosen, random_points.astype(chosen.dtype)], axis=1)


def sample_uncertain_points(key: Array, logits: Array, num_points: int,
                            oversample_ratio: float = 3.0,
                            importance_sample_ratio: float = 0.75) -> Array:
  """`sample_points_using_uncertainty` with the uniform draws taken from `key`.

  Args:
    logits: [R, h, w]. Returns [R, num_points, 2].
  """
  r = logits.shape[0]
  k1, k2 = jax.random.split(key)
  n_over = int(num_points * oversample_ratio)
  n_rand = num_points - int(importance_sample_ratio * num_points)
  candidates = jax.random.uniform(k1, (r, n_over, 2))
  rand = jax.random.uniform(k2, (r, n_rand, 2))
  return sample_points_using_uncertainty(logits, candidates, rand, num_points,
                                         importance_sample_ratio)


def mask2former_losses(class_logits: Array, mask_logits: Array, target_classes: Array,
                       target_masks: Array, assignment: Array, points: Array, *,
                       no_object_weight: float = 0.1,
                       num_masks: Optional[Array] = None) -> dict[str, Array]:
  """The three Mask2Former losses given an assignment and the loss points.

  Args:
    class_logits: [B, Q, C + 1] (last class = no object).
    mask_logits: [B, Q, h, w].
    target_classes: int [B, T] (-1 = padding).
    target_masks: [B, T, H, W] in {0, 1}.
    assignment: int [B, Q] matched target per query, -1 = unmatched (`hungarian_match*`).
    points: [B, Q, P, 2] loss points of each query's mask (only matched queries' are used;
      `sample_points_using_uncertainty` on the matched masks).
    no_object_weight: class weight of the no-object class in the cross-entropy.
    num_masks: normaliser of the mask losses; default max(number of targets, 1).

  Returns:
    {'loss_cross_entropy', 'loss_mask', 'loss_dice'}: float32 scalars (unweighted; the
    published weights are 2, 5, 5).
  """
  b, q, c1 = class_logits.shape
  matched = assignment >= 0
  safe = jnp.clip(assignment, 0, None)
  cls = jnp.take_along_axis(target_classes, safe, axis=1)
  target = jnp.where(matched, cls, c1 - 1)
  weight = jnp.ones((c1,), jnp.float32).at[-1].set(no_object_weight)[target]
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  loss_ce = (weight * nll).sum() / weight.sum()
  if num_masks is None:
    num_masks = jnp.maximum((target_classes >= 0).sum(), 1).astype(jnp.float32)
  tm = jnp.take_along_axis(target_masks, safe[:, :, None, None], axis=1)  # [B, Q, H, W]
  pts = points.reshape(b * q, -1, 2)
  logit_pts = point_sample(mask_logits.reshape((b * q,) + mask_logits.shape[2:]), pts)
  label_pts = jax.lax.stop_gradient(point_sample(tm.reshape((b * q,) + tm.shape[2:]), pts))
  logit_pts = logit_pts.reshape(b, q, -1)
  label_pts = label_pts.reshape(b, q, -1)
  bce = (jax.nn.softplus(logit_pts) - logit_pts * label_pts).mean(-1)
  s = jax.nn.sigmoid(logit_pts)
  dice = 1.0 - (2.0 * (s * label_pts).sum(-1) + 1.0) / (s.sum(-1) + label_pts.sum(-1) + 1.0)
  m = matched.astype(jnp.float32)
  return {"loss_cross_entropy": loss_ce,
          "loss_mask": (bce * m).sum() / num_masks,
          "loss_dice": (dice * m).sum() / num_masks}


@functools.partial(jax.jit, static_argnames=(
    "num_points", "oversample_ratio", "importance_sample_ratio", "class_weight", "mask_weight",
    "dice_weight", "no_object_weight"))
def set_criterion(key: Array, class_logits: Array, mask_logits: Array, target_classes: Array,
                  target_masks: Array, *, num_points: int = 12544,
                  oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                  class_weight: float = 2.0, mask_weight: float = 5.0,
                  dice_weight: float = 5.0, no_object_weight: float = 0.1,
                  num_masks: Optional[Array] = None) -> dict[str, Array]:
  """Match (Hungarian, host callback) and compute the losses, as `Mask2FormerLoss.forward`
  without auxiliary layers (call it per decoder layer for those).

  Args: as `matching_cost` / `mask2former_losses`, batched ([B, ...]); `key` draws the matcher's
  and the loss's points.

  Returns:
    the loss dict of `mask2former_losses` plus 'loss' (weighted sum with class_weight,
    mask_weight, dice_weight) and 'assignment' int32 [B, Q].
  """
  b, q = mask_logits.shape[:2]
  k_match, k_loss = jax.random.split(key)
  match_points = jax.random.uniform(k_match, (b, num_points, 2))
  cost = jax.vmap(functools.partial(matching_cost, class_weight=class_weight,
                                    mask_weight=mask_weight, dice_weight=dice_weight))(
      class_logits, mask_logits, target_classes, target_masks, match_points)
  assignment = hungarian_match_jax(cost, (target_classes >= 0).sum(-1))
  points = sample_uncertain_points(
      k_loss, mask_logits.reshape((b * q,) + mask_logits.shape[2:]), num_points,
      oversample_ratio, importance_sample_ratio).reshape(b, q, num_points, 2)
  losses = mask2former_losses(class_logits, mask_logits, target_classes, target_masks,
                              assignment, points, no_object_weight=no_object_weight,
                              num_masks=num_masks)
  losses["loss"] = (class_weight * losses["loss_cross_entropy"]
                    + mask_weight * losses["loss_mask"] + dice_weight * losses["loss_dice"])
  losses["assignment"] = assignment
  return losses
