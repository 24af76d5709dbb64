"""End-to-end checks of the generic evaluator against a direct numpy computation.

`ThresholdMethod` is a real (tiny) `Method`: its foreground score is the query's first channel
minus the mean first channel of the support image(s), times a scalar parameter. It is simple
enough that the expected masks are computed here by hand with numpy.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fssjax import evaluate as ev
from fssjax.data.base import DataError
from fssjax.methods.base import Method
from fssjax.nn import ops

I = 255
CLASS_IDS = [1, 3, 5, 7]  # class 7 is never drawn below


class ThresholdMethod(Method):
  normalization = "minus_one_one"

  def __init__(self, kshot="vote", threshold=0.0, align_corners=True):
    super().__init__(ml_collections.ConfigDict())
    self.kshot = kshot
    self.threshold = threshold
    self.align_corners = align_corners

  def init(self, rng, batch):
    return {"scale": jnp.ones(())}, {"offset": jnp.zeros(())}

  def loss(self, params, frozen, batch, rng):
    fg = (batch["query_mask"] == 1).astype(jnp.float32)
    loss = jnp.mean((self.predict(params, frozen, batch) - fg) ** 2)
    return loss, {"loss": loss}

  def predict(self, params, frozen, batch):
    support_mean = jnp.mean(batch["support_images"][..., 0], axis=(1, 2, 3))  # [B]
    return (batch["query_image"][..., 0] - support_mean[:, None, None]) * params["scale"] + (
        frozen["offset"])


def make_batches(n_batches=3, b=4, k=3, hw=(8, 8), seed=0, original=False, orig_max=(13, 11)):
  rng = np.random.default_rng(seed)
  batches = []
  for i in range(n_batches):
    h, w = hw
    batch = dict(
        query_image=rng.normal(size=(b, h, w, 3)).astype(np.float32),
        query_mask=rng.choice(np.array([0, 1, I], np.uint8), size=(b, h, w), p=[.5, .4, .1]),
        support_images=rng.normal(size=(b, k, h, w, 3)).astype(np.float32),
        support_masks=(rng.random((b, k, h, w)) > 0.5).astype(np.uint8),
        class_id=rng.choice(np.array(CLASS_IDS[:3], np.int32), size=(b,)),
        valid=np.ones((b,), bool),
        episode_index=np.arange(i * b, (i + 1) * b, dtype=np.int64),
    )
    if original:
      sizes = np.stack([rng.integers(3, orig_max[0] + 1, b), rng.integers(3, orig_max[1] + 1, b)],
                       axis=1).astype(np.int32)
      sizes[0] = orig_max  # one query at the batch's maximum size
      sizes[1] = (5, 4)  # one query downsampled from the network resolution
      mo = np.full((b, *orig_max), I, np.uint8)
      for j, (oh, ow) in enumerate(sizes):
        mo[j, :oh, :ow] = rng.choice(np.array([0, 1, I], np.uint8), size=(oh, ow),
                                     p=[.5, .4, .1])
      batch["query_mask_orig"] = mo
      batch["query_size"] = sizes
    batches.append(batch)
  return batches


def reference_predictions(method, batch):
  """Per-episode boolean masks computed with numpy (+ ops.resize_bilinear for original size)."""
  preds = []
  for j in range(batch["query_image"].shape[0]):
    q = batch["query_image"][j, ..., 0]
    means = batch["support_images"][j, ..., 0].mean(axis=(1, 2))  # [K]
    groups = [means.mean()] if method.kshot == "joint" else list(means)
    shots = []
    for m in groups:
      s = (q - np.float32(m)).astype(np.float32)
      if "query_mask_orig" in batch:
        size = tuple(int(v) for v in batch["query_size"][j])
        s = np.asarray(ops.resize_bilinear(s[None, :, :, None], size,
                                           align_corners=method.align_corners))[0, :, :, 0]
      shots.append(s > method.threshold)
    if len(shots) == 1:
      preds.append(shots[0])
    else:
      votes = np.sum(shots, axis=0).astype(np.float32)
      preds.append(votes / max(votes.max(), 1) >= 0.5)  # HSNet's K-shot vote
  return preds


def reference_results(method, batches, class_ids, all_foreground=False):
  inter = {c: np.zeros(2) for c in class_ids}
  union = {c: np.zeros(2) for c in class_ids}
  for batch in batches:
    preds = reference_predictions(method, batch)
    for j, pred in enumerate(preds):
      if not batch["valid"][j]:
        continue
      if "query_mask_orig" in batch:
        h, w = batch["query_size"][j]
        truth = batch["query_mask_orig"][j, :h, :w]
      else:
        truth = batch["query_mask"][j]
      if all_foreground:
        pred = np.ones_like(pred)
      assert pred.shape == truth.shape
      for c_idx, c_val in enumerate((0, 1)):
        keep = truth != I
        p, t = (pred[keep] == c_val), (truth[keep] == c_val)
        inter[int(batch["class_id"][j])][c_idx] += np.sum(p & t)
        union[int(batch["class_id"][j])][c_idx] += np.sum(p | t)
  iou = {c: inter[c][1] / max(union[c][1], 1) * 100 for c in class_ids}
  tot_i = sum(inter.values())
  tot_u = sum(union.values())
  return dict(miou=np.mean(list(iou.values())), fbiou=np.mean(tot_i / np.maximum(tot_u, 1)) * 100,
              per_class_iou=iou)


def run_eval(method, batches, **kwargs):
  params, frozen = method.init(jax.random.key(0), batches[0])
  kwargs.setdefault("progress", False)
  return ev.evaluate(method, params, frozen, batches, CLASS_IDS, **kwargs)


@pytest.mark.parametrize("kshot,k", [("vote", 3), ("joint", 3), ("vote", 1)])
def test_evaluate_matches_numpy(kshot, k):
  method = ThresholdMethod(kshot=kshot, threshold=0.1)
  batches = make_batches(k=k, seed=k)
  res = run_eval(method, batches)
  want = reference_results(method, batches, CLASS_IDS)
  assert res["miou"] == pytest.approx(want["miou"], abs=1e-9)
  assert res["fbiou"] == pytest.approx(want["fbiou"], abs=1e-9)
  assert res["per_class_iou"] == pytest.approx(want["per_class_iou"], abs=1e-9)
  assert res["per_class_iou"][7] == 0.0  # never drawn, still in the mean
  assert res["n_episodes"] == 12 and res["shots"] == k and res["resolution"] == "8x8"
  base = reference_results(method, batches, CLASS_IDS, all_foreground=True)
  assert res["baseline_miou"] == pytest.approx(base["miou"], abs=1e-9)
  assert res["baseline_fbiou"] == pytest.approx(base["fbiou"], abs=1e-9)
  assert 0 < res["miou"] < 100 and res["miou"] != res["baseline_miou"]


def test_support_empty_and_resized_masks_are_counted_and_never_reach_the_method():
  batches = make_batches(k=2, seed=8)
  flagged = []
  for i, batch in enumerate(batches):
    b = dict(batch)
    empty = np.zeros((4, 2), bool)
    empty[0, 1] = True
    empty[2] = True
    b["support_empty"] = empty
    b["masks_resized"] = np.array([0, 2, 5, 1], np.int32)
    if i == 0:
      b["valid"] = np.array([True, True, False, True])  # the flags of padding rows do not count
    flagged.append(b)

  class Strict(ThresholdMethod):

    def predict(self, params, frozen, batch):
      assert "support_empty" not in batch and "masks_resized" not in batch
      return super().predict(params, frozen, batch)

  res = run_eval(Strict("vote", 0.1), flagged)
  assert res["support_empty"] == 1 + 3 * 2  # batch 0: row 2 is padding
  assert res["masks_resized"] == 3 + 8 + 8
  table = ev.format_results(res)
  assert "empty supports" in table and "resized masks" in table
  plain = run_eval(Strict("vote", 0.1), batches)
  assert plain["support_empty"] == 0 and plain["masks_resized"] == 0
  assert res["miou"] != plain["miou"]  # a padding row changed what was counted
  unpadded = [dict(b, valid=np.ones((4,), bool)) for b in flagged]
  assert run_eval(Strict("vote", 0.1), unpadded)["miou"] == plain["miou"]


def test_vote_differs_from_joint_on_these_episodes():
  batches = make_batches(k=3, seed=3)
  vote = run_eval(ThresholdMethod("vote", 0.1), batches)
  joint = run_eval(ThresholdMethod("joint", 0.1), batches)
  assert vote["miou"] != joint["miou"]


def test_original_resolution_scoring_matches_per_sample_resize():
  for align in (True, False):
    method = ThresholdMethod(kshot="vote", threshold=0.0, align_corners=align)
    batches = make_batches(n_batches=2, k=2, seed=11, original=True)
    res = run_eval(method, batches, num_summary=8)
    want = reference_results(method, batches, CLASS_IDS)
    assert res["resolution"] == "original"
    assert res["miou"] == pytest.approx(want["miou"], abs=1e-9)
    assert res["fbiou"] == pytest.approx(want["fbiou"], abs=1e-9)
    base = reference_results(method, batches, CLASS_IDS, all_foreground=True)
    assert res["baseline_miou"] == pytest.approx(base["miou"], abs=1e-9)
    # The returned predictions are exactly the thresholded per-sample resize.
    ref = reference_predictions(method, batches[0]) + reference_predictions(method, batches[1])
    assert len(res["summaries"]) == 8
    for s, r in zip(res["summaries"], ref):
      np.testing.assert_array_equal(s["prediction"], r.astype(np.uint8))
    assert res["summaries"][1]["prediction"].shape == (5, 4)
  # Scoring at the original size is a different number from scoring at 8x8.
  resized = [{k: v for k, v in b.items() if k not in ("query_mask_orig", "query_size")}
             for b in batches]
  assert run_eval(method, resized)["miou"] != res["miou"]


def test_padding_rows_change_nothing():
  method = ThresholdMethod("vote", 0.1)
  batches = make_batches(k=2, seed=5)
  ref = run_eval(method, batches)
  padded = []
  for batch in batches:
    p = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
    p["valid"][-2:] = False
    p["class_id"][-2:] = 99  # junk class, not a test class
    padded.append(p)
  got = run_eval(method, padded)
  for key in ("miou", "fbiou", "per_class_iou", "n_episodes", "baseline_miou", "baseline_fbiou"):
    assert got[key] == ref[key]


def test_original_resolution_padding_rows_and_large_canvas():
  # As the pipeline pads: invalid rows with query_size (0, 0) and an all-255 mask, on a canvas
  # larger than any query (cropped by the evaluator to the 64-rounded batch maximum).
  method = ThresholdMethod("vote", 0.0)
  batches = make_batches(n_batches=2, k=2, seed=12, original=True)
  ref = run_eval(method, batches)
  padded = []
  for batch in batches:
    p = {k: np.concatenate([v, v[:3]]) for k, v in batch.items() if k != "query_mask_orig"}
    canvas = np.full((7, 70, 90), I, np.uint8)
    canvas[:4, :13, :11] = batch["query_mask_orig"]
    p["query_mask_orig"] = canvas
    p["valid"][4:] = False
    p["query_size"][4:] = 0
    p["episode_index"][4:] = -1
    padded.append(p)
  got = run_eval(method, padded)
  for key in ("miou", "fbiou", "per_class_iou", "n_episodes", "baseline_miou", "baseline_fbiou"):
    assert got[key] == ref[key]


def test_summaries_format_and_errors():
  method = ThresholdMethod("vote", 0.1)
  batches = make_batches(k=2, seed=6)
  names = {c: f"class{c}" for c in CLASS_IDS}
  res = run_eval(method, batches, num_summary=3, class_names=names, progress=True)
  assert len(res["summaries"]) == 3
  s = res["summaries"][0]
  assert s["query"].shape == (8, 8, 3) and s["query"].min() >= 0 and s["query"].max() <= 1
  assert s["prediction"].shape == (8, 8) and s["episode_index"] == 0
  assert s["class_name"] == f"class{s['class_id']}"
  # Each summary carries its episode's foreground IoU (x 100).
  pred, truth = s["prediction"] == 1, s["truth"] == 1
  keep = s["truth"] != I
  want_iou = np.sum(pred & truth & keep) / max(np.sum((pred | truth) & keep), 1) * 100
  assert s["iou"] == pytest.approx(want_iou)
  table = ev.format_results(res)
  assert "mIoU" in table and "FB-IoU" in table and "class7" in table and "all-fg" in table
  assert f"{res['miou']:.2f}" in table
  bad = [dict(batches[0])]
  bad[0]["query_mask"] = bad[0]["query_mask"].copy()
  bad[0]["query_mask"][1, 2, 3] = 4
  with pytest.raises(DataError, match=r"query_mask\(1, 2, 3\) = 4"):
    run_eval(method, bad)

  class WrongShape(ThresholdMethod):

    def predict(self, params, frozen, batch):
      return super().predict(params, frozen, batch)[:, 0]  # [B, W]: no spatial map

  with pytest.raises(ValueError, match="expected"):
    run_eval(WrongShape("joint"), batches)

  # Scores at a lower resolution are upsampled once (align_corners bilinear) to the query size:
  # the same result as a method that does that upsampling itself.
  from fssjax.nn import ops

  class HalfRes(ThresholdMethod):

    def predict(self, params, frozen, batch):
      return super().predict(params, frozen, batch)[:, ::2, ::2]

  class HalfResUpsampled(HalfRes):

    def predict(self, params, frozen, batch):
      half = super().predict(params, frozen, batch)
      return ops.resize_bilinear(half, batch["query_image"].shape[1:3], align_corners=True)

  low = run_eval(HalfRes("vote"), batches)
  full = run_eval(HalfResUpsampled("vote"), batches)
  assert low["miou"] == full["miou"] and low["fbiou"] == full["fbiou"]


_SUBPROCESS = r"""
import json, os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import jax
import numpy as np
import test_evaluate as t
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
out = {}
for name, kwargs in t.mesh_cases().items():
  method, batches = t.ThresholdMethod(kwargs["kshot"], 0.1), kwargs["batches"]
  out[name] = dict(mesh=t.comparable(t.run_eval(method, batches, mesh=mesh)),
                   single=t.comparable(t.run_eval(method, batches)))
print("RESULT" + json.dumps(out))
"""


def mesh_cases():
  return {
      "vote_b8": dict(kshot="vote", batches=make_batches(n_batches=2, b=8, k=2, seed=21)),
      "joint_b6_padded_to_8": dict(kshot="joint", batches=make_batches(n_batches=2, b=6, k=2,
                                                                        seed=22)),
      "original_b8": dict(kshot="vote", batches=make_batches(n_batches=1, b=8, k=2, seed=23,
                                                             original=True)),
  }


def comparable(res):
  keep = ("miou", "fbiou", "per_class_iou", "per_class_episodes", "n_episodes", "baseline_miou",
          "baseline_fbiou", "resolution", "shots")
  return json.loads(json.dumps({k: res[k] for k in keep}))


def test_eight_device_mesh_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TESTS_DIR=os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  for name, kwargs in mesh_cases().items():
    here = comparable(run_eval(ThresholdMethod(kwargs["kshot"], 0.1), kwargs["batches"]))
    assert out[name]["mesh"] == here, name
    assert out[name]["single"] == here, name
    assert here["n_episodes"] == len(kwargs["batches"]) * len(kwargs["batches"][0]["class_id"])


def test_nearest_interpolation_follows_pytorch_index_rule():
  # PyTorch F.interpolate(mode='nearest'), 3 -> 7: source index floor(dst * 3 / 7).
  np.testing.assert_array_equal(ev._nearest_indices(3, 7), [0, 0, 0, 1, 1, 2, 2])
  # 4 -> 2: every other source row, starting at 0.
  np.testing.assert_array_equal(ev._nearest_indices(4, 2), [0, 2])
  scores = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
  out = np.asarray(ev._resize_scores(scores, (4, 3), False, "nearest"))
  np.testing.assert_array_equal(out[0, 0], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
  # The matrix form (original-size scoring) gives the same one-hot rows.
  w = ev._interp(3, 7, False, "nearest")
  np.testing.assert_array_equal(w.argmax(1), ev._nearest_indices(3, 7))
  np.testing.assert_array_equal(w.sum(1), np.ones(7))
