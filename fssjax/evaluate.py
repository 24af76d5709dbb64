"""Episodic few-shot evaluation of any `fssjax.methods.base.Method`.

The published protocol of HSNet (Min et al., ICCV 2021; juhongm999/hsnet).

`evaluate` runs `method.predict` on a stream of episode batches, turns scores into masks
(`scores > method.threshold`), counts per-episode intersection / union on the device and sums
them per class on the host (`fssjax.metrics.SegmentationAccumulator`). Beside the method's
score it reports the trivial all-foreground prediction on the very same episodes
(`baseline_miou`, `baseline_fbiou`): a number a trained model must beat by a wide margin.

Two jitted stages per batch:
  1. `predict` (compiled once per method and batch shape): float32 scores [S, B, h, w] at the
     model's own output resolution; they are upsampled once, straight to the resolution that
     is scored, per `method.interpolation`: 'bilinear' with the method's `align_corners`
     (HSNet upsamples its quarter-resolution logits this way, never twice) or 'nearest'
     (PyTorch's nearest index rule; DiffewS's published evaluation resizes its masks so).
     `method.kshot == 'vote'`: S = K one-shot passes (supports `[:, k:k+1]`) run with
     `lax.scan`, so the model is traced once whatever K; `'joint'` (or K = 1): S = 1, one pass
     with all K supports.
  2. `_score` (small; compiled once per threshold and truth shape): threshold, HSNet's vote
     over the S maps when S > 1 (`fssjax.metrics.vote`), per-episode intersection / union of
     the prediction and of the all-foreground baseline. The scores stay on the device.

Resolution:
  * default: score at the batch's query resolution against `query_mask` (HSNet's 400x400);
  * when the batch holds `query_mask_orig [B, M, M]` (255 outside each image's true size) and
    `query_size [B, 2]` (h, w): every one-shot score map is upsampled to its own query's
    original size with bilinear interpolation (corner-aligned when `method.align_corners`, as
    HSNet's `F.interpolate(..., align_corners=True)`), thresholded, voted at the original size
    (as HSNet does) and scored against the original mask. Different sizes within a batch are
    handled on the device with per-sample interpolation matrices
    (`fssjax.nn.ops.interpolation_matrix`, the weights `resize_bilinear` uses) zero-padded to
    [Hb, H] and [Wb, W]: one batched einsum per axis at float32 HIGHEST precision, pixels
    outside the true size masked out. Hb, Wb = the batch's largest valid query size rounded up
    to a multiple of 64 (single process), which bounds the compilations of stage 2 and avoids
    computing on the whole M x M canvas.

The ground truth (`query_mask`, `query_mask_orig`) and the bookkeeping keys (`valid`,
`episode_index`, `support_empty`, `masks_resized`) never reach `method.predict`; every other
numeric key does. `support_empty` and `masks_resized` are summed over the valid episodes and
reported with the result.

Headline. `left_out` names the fold classes that could not be evaluated (fewer than K + 1
images, so no episode); `miou` averages over the other classes and `miou_all_classes` over
all fold classes (the published logger's number, in which a left-out class counts as 0).

Multi-device: with a `mesh`, each process's local batch becomes a global array sharded along
the mesh's 'data' axis (`jax.make_array_from_process_local_data`); params and frozen are
replicated unless already placed on the mesh. A local batch whose size is not a multiple of the
process's data shards is padded with invalid rows. Every process must feed the same number of
batches (the steps are collectives); sums are combined over processes at the end. The local
rows of the outputs are read back from the addressable shards, assuming (as for meshes built
by `jax.make_mesh`) that each process's shards form its local batch in order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from fssjax import metrics
from fssjax.data.base import IGNORE, DataError
from fssjax.methods.base import Method
from fssjax.nn import ops

PyTree = Any

# Keys the method never sees.
_TRUTH_KEYS = ("query_mask", "query_mask_orig")
_HOST_KEYS = ("valid", "episode_index", "support_empty", "masks_resized")
_REQUIRED = ("query_image", "query_mask", "support_images", "support_masks", "class_id")
_SIZE_BUCKET = 64

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------------
# The two jitted stages: predict, then score.


def _make_predict(method: Method):
  """Jitted (params, frozen, inputs) -> float32 scores [S, B, H, W] at query resolution.

  S = K one-shot passes (`lax.scan`, the model traced once) when `method.kshot == 'vote'` and
  K > 1, else S = 1 (one pass with all supports).
  """
  kshot = method.kshot
  if kshot not in ("vote", "joint"):
    raise ValueError(f"{type(method).__name__}.kshot must be 'vote' or 'joint', got {kshot!r}")

  def predict(params, frozen, inputs):
    scores = method.predict(params, frozen, inputs)
    b = inputs["query_image"].shape[0]
    if scores.ndim != 3 or scores.shape[0] != b:
      raise ValueError(f"{type(method).__name__}.predict returned scores of shape "
                       f"{scores.shape}; expected [B={b}, h, w]")
    return scores.astype(jnp.float32)

  def predict_all(params, frozen, inputs):
    k = inputs["support_images"].shape[1]
    if kshot == "joint" or k == 1:
      return predict(params, frozen, inputs)[None]
    shots = (jnp.moveaxis(inputs["support_images"], 1, 0)[:, :, None],
             jnp.moveaxis(inputs["support_masks"], 1, 0)[:, :, None])

    def one_shot(carry, shot):
      one = dict(inputs, support_images=shot[0], support_masks=shot[1])
      return carry, predict(params, frozen, one)

    return jax.lax.scan(one_shot, None, shots)[1]

  return jax.jit(predict_all)


@functools.partial(jax.jit, static_argnames=("threshold", "original"))
def _score(scores, truth, interp_h, interp_w, query_size, *, threshold: float, original: bool):
  """Scores [S, B, H, W] -> masks (voted when S > 1) and per-episode counts.

  With `original`, every shot's scores are upsampled per sample with the zero-padded
  interpolation matrices interp_h [B, Hb, H], interp_w [B, Wb, W] (float32, HIGHEST
  precision: TF32 / bf16 passes would move the mask boundary), and pixels outside
  `query_size` [B, 2] are neither predicted nor counted.
  """
  if original:
    hb, wb = truth.shape[1:]
    rows = jnp.arange(hb)[None, :, None] < query_size[:, 0, None, None]
    cols = jnp.arange(wb)[None, None, :] < query_size[:, 1, None, None]
    region = rows & cols
    truth = jnp.where(region, truth, jnp.asarray(IGNORE, truth.dtype))
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bih,sbhw->sbiw", interp_h, scores, precision=hi)
    scores = jnp.einsum("sbiw,bjw->sbij", scores, interp_w, precision=hi)
    fg = (scores > threshold) & region[None]
  else:
    region = jnp.ones(truth.shape, bool)
    fg = scores > threshold
  if fg.shape[0] == 1:
    pred = fg[0]
  else:
    pred = metrics.vote(jnp.moveaxis(fg, 0, 1))
  inter, union = metrics.intersection_union(pred, truth)
  base_inter, base_union = metrics.intersection_union(region, truth)
  return dict(inter=inter, union=union, base_inter=base_inter, base_union=base_union,
              pred=pred)


@functools.partial(jax.jit, static_argnames=("size", "align_corners", "mode"))
def _resize_scores(scores, size, align_corners: bool, mode: str = "bilinear"):
  """[S, B, h, w] scores -> [S, B, H, W] by bilinear interpolation or, with mode='nearest',
  nearest neighbours (PyTorch semantics for both)."""
  if mode == "nearest":
    rows = _nearest_indices(scores.shape[2], size[0])
    cols = _nearest_indices(scores.shape[3], size[1])
    return scores[:, :, rows[:, None], cols[None, :]]
  return ops.resize_bilinear(scores, size, axes=(2, 3), align_corners=align_corners)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch `F.interpolate(mode='nearest')` source indices: min(floor(dst * (in / out)),
  in - 1), the scale computed in float32 as its CPU kernel does."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


_PREDICT_CACHE: "weakref.WeakKeyDictionary[Method, dict]" = weakref.WeakKeyDictionary()


def _get_predict(method: Method):
  """The jitted predict of `method`, cached so that repeated evaluations do not recompile."""
  per_method = _PREDICT_CACHE.setdefault(method, {})
  key = method.kshot
  if key not in per_method:
    per_method[key] = _make_predict(method)
  return per_method[key]


# ----------------------------------------------------------------------------------------
# Host-side batch preparation.


@functools.lru_cache(maxsize=4096)
def _interp(in_size: int, out_size: int, align_corners: bool,
            mode: str = "bilinear") -> np.ndarray:
  """[out_size, in_size] weights with out = W @ in: bilinear (PyTorch semantics) or, with
  mode='nearest', one-hot rows at PyTorch's nearest source index."""
  if mode == "nearest":
    w = np.zeros((out_size, in_size), np.float32)
    w[np.arange(out_size), _nearest_indices(in_size, out_size)] = 1.0
    return w
  return ops.interpolation_matrix(in_size, out_size, align_corners)


def padded_interp(in_size: int, sizes: np.ndarray, out_max: int,
                  align_corners: bool, mode: str = "bilinear") -> np.ndarray:
  """[B, out_max, in_size] interpolation matrices, rows beyond each out size zero."""
  out = np.zeros((len(sizes), out_max, in_size), np.float32)
  for b, n in enumerate(sizes):
    if n > 0:
      out[b, :n] = _interp(in_size, int(n), align_corners, mode)
  return out


def round_up(n: int, m: int) -> int:
  return int(math.ceil(n / m) * m)


def _check_batch(batch: Mapping[str, Any], index: int) -> None:
  missing = [k for k in _REQUIRED if k not in batch]
  if missing:
    raise DataError(f"evaluate: batch {index} lacks keys {missing}; has {sorted(batch)}")
  q, m = batch["query_image"], batch["query_mask"]
  s, sm = batch["support_images"], batch["support_masks"]
  b = q.shape[0]
  if q.ndim != 4 or m.shape != q.shape[:3]:
    raise DataError(f"evaluate: batch {index}: query_image {q.shape} must be [B,H,W,C] and "
                    f"query_mask {m.shape} [B,H,W]")
  if s.ndim != 5 or s.shape[0] != b or sm.shape != s.shape[:4]:
    raise DataError(f"evaluate: batch {index}: support_images {s.shape} must be [B,K,H,W,C] "
                    f"and support_masks {sm.shape} [B,K,H,W]")
  for key in ("class_id", "valid", "episode_index"):
    if key in batch and np.shape(batch[key]) != (b,):
      raise DataError(f"evaluate: batch {index}: {key} has shape {np.shape(batch[key])}, "
                      f"expected [{b}]")
  truth_keys = ["query_mask"]
  if "query_mask_orig" in batch:
    if "query_size" not in batch:
      raise DataError(f"evaluate: batch {index} has query_mask_orig but no query_size")
    mo, qs = batch["query_mask_orig"], np.asarray(batch["query_size"])
    if mo.ndim != 3 or mo.shape[0] != b or qs.shape != (b, 2):
      raise DataError(f"evaluate: batch {index}: query_mask_orig {mo.shape} must be "
                      f"[B,Hmax,Wmax] and query_size {qs.shape} [B,2]")
    valid = np.asarray(batch.get("valid", np.ones((b,), bool)), bool)
    qv = qs[valid]
    if np.any(qv < 1) or np.any(qv[:, 0] > mo.shape[1]) or np.any(qv[:, 1] > mo.shape[2]):
      raise DataError(f"evaluate: batch {index}: query_size {qs.tolist()} of valid episodes "
                      f"outside [1, {mo.shape[1:]}]")
    truth_keys.append("query_mask_orig")
  for key in truth_keys:
    mask = np.asarray(batch[key])
    bad = (mask > 1) & (mask != IGNORE)
    if bad.any():
      where = np.argwhere(bad)[0]
      raise DataError(f"evaluate: batch {index}: {key}{tuple(where.tolist())} = "
                      f"{mask[tuple(where)]}; masks must hold 0, 1 or {IGNORE}")


def _original_truth(batch: Mapping[str, Any], valid: np.ndarray, hw: tuple[int, int],
                    align_corners: bool,
                    mode: str = "bilinear") -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  """Cropped original-size truth [B, Hb, Wb] and interpolation inputs for `_score`.

  The padded canvas (for example 1024 x 1024) is cropped to the batch's largest valid query
  rounded up to a multiple of 64 (fewer compilations of the small scoring function, far less
  work and transfer than the full canvas). With several processes every process must use the
  same shape, so the full canvas (rounded up) is kept there.
  """
  mo = np.asarray(batch["query_mask_orig"])
  qs = np.asarray(batch["query_size"]).astype(np.int32).copy()
  qs[~valid] = 0  # padding rows: nothing predicted, nothing counted
  if jax.process_count() > 1 or not valid.any():
    hb, wb = mo.shape[1], mo.shape[2]
  else:
    hb, wb = qs[:, 0].max(), qs[:, 1].max()
  hb, wb = round_up(hb, _SIZE_BUCKET), round_up(wb, _SIZE_BUCKET)
  truth = np.full((mo.shape[0], hb, wb), IGNORE, mo.dtype)
  h, w = min(hb, mo.shape[1]), min(wb, mo.shape[2])
  truth[:, :h, :w] = mo[:, :h, :w]
  return truth, (padded_interp(hw[0], qs[:, 0], hb, align_corners, mode),
                 padded_interp(hw[1], qs[:, 1], wb, align_corners, mode), qs)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if n == 0:
    return x
  return np.concatenate([x, np.repeat(x[:1], n, axis=0)], axis=0)


def local_data_shards(mesh) -> int:
  """Number of distinct 'data' shards of a batch held by this process's devices."""
  sharding = NamedSharding(mesh, P("data"))
  n_data = mesh.shape["data"]
  index_map = sharding.addressable_devices_indices_map((n_data,))
  return len({idx[0].start for idx in index_map.values()})


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in local batch order."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def place_params(tree: PyTree, mesh) -> PyTree:
  if mesh is None:
    return tree
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and (
        x.sharding.mesh == mesh):
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, tree)


def _denormalize(image: np.ndarray, normalization: str) -> np.ndarray:
  """[H, W, 3] network-input image -> float32 [0, 1] for display."""
  image = np.asarray(image, np.float32)
  if normalization == "imagenet":
    image = image * _IMAGENET_STD + _IMAGENET_MEAN
  elif normalization == "minus_one_one":
    image = (image + 1.0) / 2.0
  elif image.max() > 1.5:
    image = image / 255.0
  return np.clip(image, 0.0, 1.0)


def _is_numeric(v) -> bool:
  return np.asarray(v).dtype.kind in "biuf"


def _collect_summaries(summaries: list, num: int, method: Method, host: dict,
                       pred: np.ndarray, iou: np.ndarray) -> None:
  """Appends display examples from one finished batch (valid rows only); `iou` [B] is each
  episode's foreground IoU x 100."""
  batch = host["batch"]
  if batch is None:
    return
  for i in np.flatnonzero(host["valid"]):
    if len(summaries) >= num:
      return
    if host["original"]:
      h, w = (int(v) for v in np.asarray(batch["query_size"])[i])
      truth = np.asarray(batch["query_mask_orig"])[i, :h, :w]
      prediction = pred[i, :h, :w]
    else:
      truth = np.asarray(batch["query_mask"])[i]
      prediction = pred[i]
    summaries.append(dict(
        query=_denormalize(batch["query_image"][i], method.normalization),
        truth=np.asarray(truth, np.uint8),
        prediction=np.asarray(prediction, np.uint8),
        support=_denormalize(batch["support_images"][i, 0], method.normalization),
        support_mask=np.asarray(batch["support_masks"][i, 0], np.uint8),
        class_id=int(np.asarray(batch["class_id"])[i]),
        episode_index=int(np.asarray(batch["episode_index"])[i])
        if "episode_index" in batch else -1,
        iou=float(iou[i]),
    ))


def _log_progress(index: int, counted: int, total: int | None, start: float,
                  first_done: tuple[float, int], acc: metrics.SegmentationAccumulator) -> None:
  now = time.perf_counter()
  t0, n0 = first_done
  if counted > n0 and now > t0:
    rate = (counted - n0) / (now - t0)
  else:
    rate = counted / max(now - start, 1e-9)
  eta = ""
  if total:
    eta = f", ETA {_format_seconds(max(total - counted, 0) / max(rate, 1e-9))}"
  logging.info("eval: batch %d, %d/%s episodes, %.1f episodes/s%s, running mIoU %.2f "
               "(this process)", index + 1, counted, total if total else "?", rate, eta,
               acc.result()["miou"])


def _format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------
# The evaluator.


def evaluate(method: Method, params: PyTree, frozen: PyTree,
             batches: Iterable[Mapping[str, np.ndarray]], class_ids: Sequence[int], *,
             mesh: jax.sharding.Mesh | None = None,
             class_names: Sequence[str] | Mapping[int, str] | None = None,
             num_summary: int = 0, progress: bool = True,
             total_episodes: int | None = None, log_every: int = 10,
             left_out: Sequence[int] = ()) -> dict:
  """Evaluates `method` on episode batches with the published class-wise protocol.

  Args:
    method: the method; `predict` gives fg scores [B, H, W], fg = scores > method.threshold.
    params, frozen: the method's parameter pytrees.
    batches: iterable of dicts of numpy arrays (this process's local batches): query_image
      [B,H,W,3], query_mask [B,H,W] uint8, support_images [B,K,H,W,3], support_masks
      [B,K,H,W], class_id [B]; optional valid [B] bool (False rows are padding and do not
      count), episode_index [B], support_empty [B,K] bool (a support whose mask is empty at
      the data pipeline's check size: counted and reported, never passed to the method),
      masks_resized [B] int (masks of the episode resized to their image: summed and
      reported), and
      query_mask_orig [B,Hmax,Wmax] + query_size [B,2] to score at the original query
      resolution.
    class_ids: the fold's test classes; `miou_all_classes` averages over all of them.
    mesh: optional device mesh with a 'data' axis; batches are sharded along it.
    class_names: optional names, indexed by class id.
    num_summary: number of (query, truth, prediction, support) examples to return.
    progress: log episodes/s, ETA and the running (process-local) mIoU every `log_every`
      batches.
    total_episodes: total number of episodes for the ETA (default: len(batches) x batch size
      when `batches` has a length).
    log_every: progress cadence in batches.
    left_out: fold classes without episodes (fewer than K + 1 images); `miou` (the
      headline) averages over the other classes, `miou_all_classes` over all of them (the
      published logger's number, which counts a left-out class with IoU 0).

  Returns:
    dict with miou, miou_all_classes, left_out_classes, fbiou, per_class_iou
    {class_id: IoU x 100}, per_class_episodes,
    n_episodes, support_empty (number of valid episodes' supports flagged empty; 0 when the
    batches carry no `support_empty`), masks_resized (sum over valid episodes; 0 when
    absent), baseline_miou (over the same classes as miou),
    baseline_miou_all_classes, baseline_fbiou, baseline_per_class_iou, resolution
    ('original' or 'HxW'), shots, kshot, seconds, episodes_per_second (after the first
    batch, i.e. without compilation), class_names {class_id: name} when given, and summaries
    (a list of dicts with query [H,W,3] float in [0,1], truth and prediction [h,w] uint8 at
    the scoring resolution, support [H,W,3], support_mask [H,W], class_id, class_name (when
    names are given), episode_index, iou: the episode's foreground IoU x 100).
  """
  class_ids = [int(c) for c in class_ids]
  interpolation = str(getattr(method, "interpolation", "bilinear"))
  if interpolation not in ("bilinear", "nearest"):
    raise ValueError(f"{type(method).__name__}.interpolation={interpolation!r}; expected "
                     "'bilinear' or 'nearest'")
  acc = metrics.SegmentationAccumulator(class_ids)
  base = metrics.SegmentationAccumulator(class_ids)
  params = place_params(params, mesh)
  frozen = place_params(frozen, mesh)
  if mesh is not None:
    if "data" not in mesh.shape:
      raise ValueError(f"evaluate: the mesh needs a 'data' axis; has {dict(mesh.shape)}")
    batch_sharding = NamedSharding(mesh, P("data"))
    local_multiple = local_data_shards(mesh)
  else:
    batch_sharding, local_multiple = None, 1
  if total_episodes is None and hasattr(batches, "__len__"):
    total_episodes = -len(batches)  # negative: a number of batches, resolved on batch 1.

  summaries: list[dict] = []
  info = dict(resolution=None, shots=None)
  start = time.perf_counter()
  first_done = None  # (time, episodes) after the first batch (compilation).
  counted = 0
  support_empty = 0
  masks_resized = 0
  pending = None

  def finish(pend):
    nonlocal counted, first_done
    out, host = pend
    b = host["b"]
    inter = _local_rows(out["inter"])[:b]
    union = _local_rows(out["union"])[:b]
    acc.update(host["class_id"], inter, union, host["valid"])
    base.update(host["class_id"], _local_rows(out["base_inter"])[:b],
                _local_rows(out["base_union"])[:b], host["valid"])
    counted += int(host["valid"].sum())
    if len(summaries) < num_summary:
      episode_iou = inter[:, 1] / np.maximum(union[:, 1], 1) * 100.0
      _collect_summaries(summaries, num_summary, method, host, _local_rows(out["pred"])[:b],
                         episode_iou)
    if first_done is None:
      first_done = (time.perf_counter(), counted)
    if progress and (host["index"] + 1) % log_every == 0:
      _log_progress(host["index"], counted, total_episodes, start, first_done, acc)

  predict = _get_predict(method)
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx:
    for index, batch in enumerate(batches):
      _check_batch(batch, index)
      b = int(batch["query_image"].shape[0])
      if total_episodes is not None and total_episodes < 0:
        total_episodes = -total_episodes * b
      valid = np.asarray(batch.get("valid", np.ones((b,), bool)), bool)
      if "support_empty" in batch:
        support_empty += int(np.asarray(batch["support_empty"], bool)[valid].sum())
      if "masks_resized" in batch:
        masks_resized += int(np.asarray(batch["masks_resized"], np.int64)[valid].sum())
      original = "query_mask_orig" in batch
      hw = tuple(batch["query_image"].shape[1:3])
      k = int(batch["support_images"].shape[1])
      resolution = "original" if original else f"{hw[0]}x{hw[1]}"
      for name, value in (("resolution", resolution), ("shots", k)):
        if info[name] is None:
          info[name] = value
        elif info[name] != value:
          raise DataError(f"evaluate: batch {index} has {name} {value}, earlier batches "
                          f"{info[name]}; one evaluation uses one setting")

      inputs = {key: np.asarray(v) for key, v in batch.items()
                if key not in _TRUTH_KEYS + _HOST_KEYS and _is_numeric(v)}
      # Pad to a multiple of this process's data shards with rows that are never counted.
      pad = (-b) % local_multiple
      inputs = jax.tree.map(lambda x: _pad_rows(x, pad), inputs)
      to_global = None
      if batch_sharding is not None:
        to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
        inputs = jax.tree.map(to_global, inputs)

      # Scores may come at the model's own resolution (HSNet: a quarter of the input); they
      # are upsampled once, straight to the resolution that is scored, as published.
      scores = predict(params, frozen, inputs)
      score_hw = tuple(scores.shape[-2:])
      if original:
        truth, extras = _original_truth(batch, valid, score_hw, bool(method.align_corners),
                                        interpolation)
      else:
        truth, extras = np.asarray(batch["query_mask"]), (None, None, None)
        if score_hw != hw:
          scores = _resize_scores(scores, hw, bool(method.align_corners), interpolation)
      scoring = jax.tree.map(lambda x: _pad_rows(x, pad), (truth,) + extras)
      if to_global is not None:
        scoring = jax.tree.map(to_global, scoring)
      out = _score(scores, *scoring, threshold=float(method.threshold), original=original)
      host = dict(b=b, index=index, class_id=np.asarray(batch["class_id"]), valid=valid,
                  batch=batch if len(summaries) < num_summary else None,
                  original=original)
      if pending is not None:
        finish(pending)
      pending = (out, host)
    if pending is not None:
      finish(pending)

  acc.sum_across_processes()
  base.sum_across_processes()
  support_empty, masks_resized = (int(v) for v in metrics.sum_across_processes(
      [np.asarray(support_empty, np.int64), np.asarray(masks_resized, np.int64)]))
  elapsed = time.perf_counter() - start
  res = acc.result(left_out)
  base_res = base.result(left_out)
  steady = None
  if first_done is not None and counted > first_done[1]:
    steady = (counted - first_done[1]) / max(time.perf_counter() - first_done[0], 1e-9)
  results = dict(
      miou=res["miou"], miou_all_classes=res["miou_all_classes"],
      left_out_classes=res["left_out_classes"], fbiou=res["fbiou"],
      per_class_iou=res["per_class_iou"], per_class_episodes=res["per_class_episodes"],
      n_episodes=res["n_episodes"], support_empty=support_empty, masks_resized=masks_resized,
      baseline_miou=base_res["miou"], baseline_miou_all_classes=base_res["miou_all_classes"],
      baseline_fbiou=base_res["fbiou"], baseline_per_class_iou=base_res["per_class_iou"],
      resolution=info["resolution"], shots=info["shots"], kshot=method.kshot,
      seconds=elapsed, episodes_per_second=steady, summaries=summaries)
  if class_names is not None:
    results["class_names"] = {c: str(class_names[c]) for c in acc.class_ids}
    for s in summaries:
      s["class_name"] = results["class_names"].get(s["class_id"], "")
  if progress:
    logging.info("eval done: %d episodes in %s, mIoU %.2f, FB-IoU %.2f (all-fg baseline "
                 "%.2f / %.2f)", res["n_episodes"], _format_seconds(elapsed), res["miou"],
                 res["fbiou"], base_res["miou"], base_res["fbiou"])
    if res["left_out_classes"]:
      logging.info("eval: mIoU %.2f over the %d evaluated classes; %.2f over all %d fold "
                   "classes (the published logger's number: the left-out classes %s count "
                   "with IoU 0)", res["miou"], len(acc.class_ids) - len(res["left_out_classes"]),
                   res["miou_all_classes"], len(acc.class_ids), res["left_out_classes"])
  return results


def format_results(results: Mapping[str, Any]) -> str:
  """A console table: mIoU, FB-IoU, the all-foreground baseline and per-class IoU (for the
  results of `fssjax.evaluators`' dense evaluator: mIoU, mAcc, fwIoU, pixel accuracy and the
  IoU of each class present in the truth)."""
  names = results.get("class_names") or {}
  if results.get("evaluator") == "dense":
    lines = [f"Dense evaluation: {results['n_images']} images, {results['resolution']}, "
             f"ignore label {results['ignore_label']}"]
    for key, label in (("miou", "mIoU"), ("macc", "mAcc"), ("fwiou", "fwIoU"),
                       ("pixel_acc", "pixel acc")):
      lines.append(f"{label:14s}{results[key]:10.2f}")
    lines.append(f"classes in the truth: {results['n_classes_present']} of "
                 f"{len(results['per_class_iou'])} (mIoU and mAcc average over them)")
    lines.append(f"{'class':>6s}  {'name':24s}{'IoU':>8s}")
    for c, iou in results["per_class_iou"].items():
      if iou == iou:  # not NaN: present in the truth
        lines.append(f"{c:6d}  {names.get(c, '')[:24]:24s}{iou:8.2f}")
    return "\n".join(lines)
  lines = [
      f"Few-shot evaluation: {results['n_episodes']} episodes, {results['shots']}-shot "
      f"({results['kshot']}), scored at {results['resolution']} resolution",
      f"{'':14s}{'method':>10s}{'all-fg':>10s}",
      f"{'mIoU':14s}{results['miou']:10.2f}{results['baseline_miou']:10.2f}",
      f"{'FB-IoU':14s}{results['fbiou']:10.2f}{results['baseline_fbiou']:10.2f}",
  ]
  left_out = results.get("left_out_classes") or []
  if left_out:
    n = len(results["per_class_iou"])
    lines[2] += f"   (mean over the {n - len(left_out)} evaluated of {n} fold classes)"
    lines.insert(3, f"{'mIoU, all':14s}{results['miou_all_classes']:10.2f}"
                    f"{results['baseline_miou_all_classes']:10.2f}   (all {n} fold classes, "
                    f"left-out ones as 0: the published logger's number)")
    lines.append(f"left out (fewer than K + 1 images): "
                 + ", ".join(f"{c} {names.get(c, '')}".strip() for c in left_out))
  if results.get("support_empty"):
    lines.append(f"{'empty supports':14s}{results['support_empty']:10d}   (support masks empty "
                 f"at the check size)")
  if results.get("masks_resized"):
    lines.append(f"{'resized masks':14s}{results['masks_resized']:10d}   (masks whose size "
                 f"differed from their image, resized nearest)")
  if results.get("episodes_per_second"):
    lines.append(f"{'episodes/s':14s}{results['episodes_per_second']:10.1f}")
  lines.append(f"{'class':>6s}  {'name':24s}{'IoU':>8s}{'all-fg':>8s}{'episodes':>10s}")
  for c, iou in results["per_class_iou"].items():
    if c in left_out:
      lines.append(f"{c:6d}  {names.get(c, '')[:24]:24s}{'left out':>8s}")
      continue
    lines.append(f"{c:6d}  {names.get(c, '')[:24]:24s}{iou:8.2f}"
                 f"{results['baseline_per_class_iou'][c]:8.2f}"
                 f"{results['per_class_episodes'][c]:10d}")
  return "\n".join(lines)
