"""Hungarian matching and Mask2Former losses (fixtures by scripts/make_mask2former_fixtures.py).

Parity with transformers' `Mask2FormerHungarianMatcher` / `Mask2FormerLoss` in float32 on a
fixture whose random points were recorded from the reference run (so the JAX code is fed the
same points); the assignment on a hand-made cost whose optimum is known (and which a greedy
assignment gets wrong); the uncertainty sampler statistically.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn import matching as mt
from parity import assert_close  # tests/parity.py

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mask2former")


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    # float16 entries are float16-exact inputs / parameters: the reference used them as float32.
    return {k: f[k].astype(np.float32) if f[k].dtype == np.float16 else f[k] for k in f.files}


def _targets(ref):
  labels = [ref["loss/labels_0"], ref["loss/labels_1"]]
  classes = np.full((2, 3), -1, np.int32)
  masks = np.zeros((2, 3, 16, 16), np.float32)
  for i, lab in enumerate(labels):
    classes[i, :len(lab)] = lab
    masks[i, :len(lab)] = ref[f"loss/masks_{i}"]
  return classes, masks


def test_hungarian_on_known_cost():
  # Optimum: query 0 -> target 1, 1 -> 0, 2 -> 2 (total 5); greedy (smallest entry first)
  # would take (1, 1) = 0 and end at 6. Query 3 is left unmatched; column 3 is padding (its
  # cost -100 must be ignored) and a NaN is treated as the largest cost.
  cost = np.array([[[4.0, 1.0, 3.0, -100.0],
                    [2.0, 0.0, 5.0, -100.0],
                    [3.0, 2.0, 2.0, -100.0],
                    [np.nan, 7.0, 9.0, -100.0]],
                   [[0.0] * 4] * 4], np.float32)
  cost[1, :, 0] = [5.0, 1.0, 9.0, 9.0]  # image 1: one target, query 1 is best
  want = np.array([[1, 0, 2, -1], [-1, 0, -1, -1]], np.int32)
  np.testing.assert_array_equal(mt.hungarian_match(cost, [3, 1]), want)
  jitted = jax.jit(mt.hungarian_match_jax)(jnp.asarray(cost), jnp.array([3, 1]))
  np.testing.assert_array_equal(np.asarray(jitted), want)
  # vmap over an extra axis (the callback runs per element).
  both = jax.vmap(mt.hungarian_match_jax)(jnp.stack([cost, cost]), jnp.array([[3, 1], [3, 1]]))
  np.testing.assert_array_equal(np.asarray(both), np.stack([want, want]))
  np.testing.assert_array_equal(mt.hungarian_match(cost, [0, 0]), -np.ones((2, 4), np.int32))
  with pytest.raises(ValueError, match="num_targets"):
    mt.hungarian_match(cost, [5, 1])


def test_cost_and_losses_match_transformers(ref):
  cl, ml = ref["loss/class_logits"], ref["loss/mask_logits"]
  classes, masks = _targets(ref)
  costs = []
  cost_fn = jax.jit(mt.matching_cost)
  for i, n in enumerate((3, 2)):
    c = cost_fn(cl[i], ml[i], classes[i], masks[i], ref[f"loss/matcher_points_{i}"][0])
    assert_close(np.asarray(c)[:, :n], ref[f"loss/cost_{i}"], what=f"cost {i}")
    costs.append(np.asarray(c))
  assignment = mt.hungarian_match(np.stack(costs), [3, 2])
  for i in range(2):
    rows = np.nonzero(assignment[i] >= 0)[0]
    np.testing.assert_array_equal(rows, ref[f"loss/rows_{i}"])
    np.testing.assert_array_equal(assignment[i, rows], ref[f"loss/cols_{i}"])
  # The reference's loss points, drawn for the matched pairs in (image, query) order.
  pairs = [(b, q) for b in range(2) for q in np.nonzero(assignment[b] >= 0)[0]]
  chosen = mt.sample_points_using_uncertainty(
      jnp.stack([ml[b, q] for b, q in pairs]), ref["loss/over"], ref["loss/random"], 16, 0.75)
  points = np.zeros((2, 6, 16, 2), np.float32)
  for k, (b, q) in enumerate(pairs):
    points[b, q] = np.asarray(chosen[k])
  loss_fn = jax.jit(mt.mask2former_losses, static_argnames="no_object_weight")
  losses = loss_fn(cl, ml, classes, masks, assignment, points)
  for name in ("loss_cross_entropy", "loss_mask", "loss_dice"):
    assert_close(losses[name], ref[f"loss/{name}"], what=name)
  # The no-object weight matters: 1.0 instead of 0.1 changes the cross-entropy.
  other = loss_fn(cl, ml, classes, masks, assignment, points, no_object_weight=1.0)
  assert abs(float(other["loss_cross_entropy"]) - float(ref["loss/loss_cross_entropy"])) > 1e-3


def test_uncertainty_sampler_statistics():
  # Logits x - 0.5 over the image: the uncertain points are those near the line x = 0.5.
  h = w = 32
  xs = (np.arange(w) + 0.5) / w
  logits = jnp.asarray(np.broadcast_to(xs - 0.5, (h, w))[None].repeat(2, 0) * 8, jnp.float32)
  pts = np.asarray(mt.sample_uncertain_points(jax.random.key(0), logits, 400, 3.0, 0.75))
  assert pts.shape == (2, 400, 2) and (pts >= 0).all() and (pts <= 1).all()
  unc, rnd = pts[:, :300], pts[:, 300:]
  # 300 of 1200 uniform candidates closest to x = 0.5: |x - 0.5| below ~1/8 (+ margin),
  # except within half a pixel of the border, where zero padding pulls the sampled logit to 0
  # (as grid_sample does in the reference).
  inner = ((unc > 1 / 64) & (unc < 1 - 1 / 64)).all(-1)
  assert inner.mean() > 0.8
  assert np.abs(unc[..., 0][inner] - 0.5).max() < 0.16
  # The other 100 are uniform: spread like U(0, 1) (std 0.289), in x and y.
  assert 0.22 < rnd[..., 0].std() < 0.36 and 0.22 < rnd[..., 1].std() < 0.36
  assert np.abs(rnd[..., 0] - 0.5).max() > 0.3
  assert 0.22 < unc[..., 1].std() < 0.36  # y is unconstrained for the uncertain points


def test_set_criterion_recovers_a_permutation():
  # Query perm[j] predicts target j exactly (mask and class); the matcher must find perm.
  rng = np.random.RandomState(0)
  t, q, c = 3, 5, 4
  masks = np.zeros((1, t, 16, 16), np.float32)
  masks[0, 0, :8, :8] = masks[0, 1, 8:, :] = masks[0, 2, :8, 8:] = 1
  classes = np.array([[2, 0, 3]], np.int32)
  perm = np.array([4, 0, 2])  # target j is predicted by query perm[j]
  ml = np.full((1, q, 16, 16), -8.0, np.float32)
  cl = np.full((1, q, c + 1), -5.0, np.float32)
  cl[0, :, c] = 5.0
  for j in range(t):
    ml[0, perm[j]] = np.where(masks[0, j] > 0, 8.0, -8.0)
    cl[0, perm[j], classes[0, j]] = 5.0
    cl[0, perm[j], c] = -5.0

  def loss(mask_logits, class_logits):
    out = mt.set_criterion(jax.random.key(1), class_logits, mask_logits, classes, masks,
                           num_points=64)
    return out["loss"], out

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compilation for all calls below
  (_, out), grad = run(jnp.asarray(ml), jnp.asarray(cl))
  want = -np.ones(q, np.int32)
  want[perm] = np.arange(t)
  np.testing.assert_array_equal(np.asarray(out["assignment"])[0], want)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
  # Permuting the queries permutes the assignment.
  order = rng.permutation(q)
  (_, permuted), _ = run(jnp.asarray(ml[:, order]), jnp.asarray(cl[:, order]))
  np.testing.assert_array_equal(np.asarray(permuted["assignment"])[0], want[order])
  # Inverted masks cost far more than the right ones (Dice on boundary-heavy points stays
  # above 0 even for exact masks: there the bilinear labels and logits are both ~0.5).
  (_, wrong), _ = run(jnp.asarray(-ml), jnp.asarray(cl))
  assert float(out["loss_dice"]) < 0.5 * float(wrong["loss_dice"])
  assert float(out["loss_mask"]) < 0.5 * float(wrong["loss_mask"])


# ------------------------------------------------------------------------------------------
# Pixel decoder and masked-attention transformer decoder.


@pytest.fixture(scope="module")
def tiny():
  from fssjax.nn import mask2former as m2  # pylint: disable=import-outside-toplevel
  with open(os.path.join(FIXTURES, "README.json")) as f:
    meta = json.load(f)
  return m2, m2.Mask2FormerConfig.from_dict(meta["tiny_config"]), tuple(meta["feature_channels"])


def _params(m2, module, ref, prefix, *args):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  state = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
  return m2.params_from_state_dict(state, shapes)


def test_pixel_decoder_matches_transformers(ref, tiny):
  m2, cfg, channels = tiny
  module = m2.Mask2FormerPixelDecoder(cfg, channels)
  feats = [ref[f"pixel/features_{i}"] for i in range(4)]
  params = _params(m2, module, ref, "pixel/param/", feats)
  # HF names: level_embed kept as a raw [3, C] parameter, FPN adapter / layer, encoder layers.
  assert params["level_embed"].shape == (3, 32)
  assert {"adapter_1_0", "adapter_1_1", "layer_1_0", "layer_1_1", "mask_projection",
          "input_projections_2_1"} <= set(params)
  assert set(params["encoder"]["layers_1"]["self_attn"]) == {
      "sampling_offsets", "attention_weights", "value_proj", "output_proj"}
  mask_features, multi_scale, hidden = jax.jit(module.apply)({"params": params}, feats)
  assert_close(mask_features, ref["pixel/mask_features"], what="mask_features")
  for i in range(3):
    assert_close(multi_scale[i], ref[f"pixel/multi_scale_{i}"], what=f"multi_scale[{i}]")
  assert hidden.shape == (2, 1 * 1 + 2 * 2 + 4 * 3, 32)
  with pytest.raises(ValueError, match="expected 4"):
    module.apply({"params": params}, feats[:3])


def test_transformer_decoder_matches_transformers(ref, tiny):
  m2, cfg, _ = tiny
  module = m2.Mask2FormerTransformerModule(cfg, 32)
  # The reference ran on the pixel decoder's outputs rounded to float16.
  ms = [ref[f"pixel/multi_scale_{i}"].astype(np.float16).astype(np.float32) for i in range(3)]
  mf = ref["pixel/mask_features"].astype(np.float16).astype(np.float32)
  params = _params(m2, module, ref, "decoder/param/", ms, mf)
  cross = params["decoder"]["layers_0"]["cross_attn"]
  assert cross["in_proj_weight"].shape == (96, 32)  # nn.MultiheadAttention's name and layout
  run = jax.jit(lambda p, q, bias: module.apply({"params": p}, ms, mf, query_features=q,
                                                self_attn_bias=bias))
  learned = np.broadcast_to(params["queries_features"]["embedding"], (2, 5, 32))
  no_bias = np.zeros((1, 1, 5, 5), np.float32)
  out = run(params, learned, no_bias)  # learned content queries, zero bias: Mask2Former
  assert len(out["masks_queries_logits"]) == cfg.decoder_layers == 4
  for i in range(4):
    assert_close(out["intermediate_hidden_states"][i], ref[f"decoder/intermediate_{i}"],
                 what=f"intermediate[{i}]")
    assert_close(out["masks_queries_logits"][i], ref[f"decoder/masks_{i}"], what=f"masks[{i}]")
  assert_close(out["last_hidden_state"], ref["decoder/last_hidden_state"], what="last")
  # Masked attention is exercised: the first masks are partly positive, partly negative.
  m0 = ref["decoder/masks_0"].reshape(2, 5, -1)
  assert ((m0 > 0).any(-1) & (m0 < 0).any(-1)).any()
  # Replacing the learned content queries changes the result (the LLM-prior hook).
  other = run(params, np.zeros((2, 5, 32), np.float32), no_bias)
  diff = np.asarray(other["last_hidden_state"]) - ref["decoder/last_hidden_state"]
  assert np.abs(diff).max() > 1e-3
  # The self-attention bias hook (relation attention): keeping each query to itself changes
  # the result.
  alone = run(params, learned,
              np.where(np.eye(5, dtype=bool), 0.0, -1e9).astype(np.float32)[None, None])
  diff = np.asarray(alone["last_hidden_state"]) - ref["decoder/last_hidden_state"]
  assert np.abs(diff).max() > 1e-3

def test_semantic_inference(tiny):
  m2 = tiny[0]
  # Query 0: class 1 with certainty, mask on the left column; query 1: no object everywhere.
  cl = np.array([[[-20.0, 20.0, -20.0], [-20.0, -20.0, 20.0]]], np.float32)  # C = 2 + no-object
  ml = np.full((1, 2, 2, 2), -20.0, np.float32)
  ml[0, 0, :, 0] = 20.0
  ml[0, 1] = 20.0
  out = np.asarray(m2.semantic_inference(cl, ml))
  assert out.shape == (1, 2, 2, 2)
  np.testing.assert_allclose(out[0, :, 0], [[0.0, 1.0], [0.0, 1.0]], atol=1e-6)
  np.testing.assert_allclose(out[0, :, 1], 0.0, atol=1e-6)  # the no-object query adds nothing


def test_load_hf_checkpoint_heads(ref, tiny, tmp_path):
  """A Mask2FormerForUniversalSegmentation-style directory: backbone keys ignored, config
  inferred from the tensors (and checked against config.json)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from fssjax.weights import mask2former as w  # pylint: disable=import-outside-toplevel
  load_mask2former_heads = w.load_mask2former_heads
  m2, cfg, channels = tiny
  state = {"model.pixel_level_module.encoder.embeddings.norm.weight": np.ones(8, np.float32),
           "class_predictor.weight": np.arange(7 * 32, dtype=np.float32).reshape(7, 32),
           "class_predictor.bias": np.zeros(7, np.float32)}
  for k, v in ref.items():
    if k.startswith("pixel/param/"):
      state["model.pixel_level_module.decoder." + k[len("pixel/param/"):]] = v
    elif k.startswith("decoder/param/"):
      state["model.transformer_module." + k[len("decoder/param/"):]] = v
  save_file(state, str(tmp_path / "model.safetensors"))
  out = load_mask2former_heads(str(tmp_path))
  assert out["config"] == cfg and out["feature_channels"] == channels
  np.testing.assert_array_equal(out["class_predictor"]["kernel"], state["class_predictor.weight"].T)
  got = jax.tree_util.tree_leaves_with_path(out["pixel_decoder"])
  want = _params(m2, m2.Mask2FormerPixelDecoder(cfg, channels), ref, "pixel/param/",
                 [ref[f"pixel/features_{i}"] for i in range(4)])
  for (path, leaf), (_, leaf2) in zip(got, jax.tree_util.tree_leaves_with_path(want)):
    np.testing.assert_array_equal(leaf, leaf2, err_msg=str(path))
  assert out["transformer_module"]["decoder"]["layers_2"]["cross_attn"]["in_proj_weight"].shape \
      == (96, 32)
  # A config.json that disagrees with the tensors is refused, naming the field.
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "mask2former", "hidden_dim": 32, "dim_feedforward": 64}, f)
  with pytest.raises(ValueError, match="dim_feedforward=64"):
    load_mask2former_heads(str(tmp_path))
  with pytest.raises(ValueError, match="no Mask2Former decoder tensors"):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    load_mask2former_heads(str(tmp_path))
