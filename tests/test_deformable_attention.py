"""Multi-scale deformable attention (fixtures by scripts/make_mask2former_fixtures.py).

Parity with transformers' PyTorch `multi_scale_deformable_attention` (grid_sample bilinear,
zero padding, align_corners=False) and `Mask2FormerPixelDecoderEncoderMultiscaleDeformable
Attention` in float32: max |ours - reference| <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn import deformable_attention as da
from fssjax.weights.diffusers import convert_state_dict
from parity import assert_close  # tests/parity.py

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mask2former")
SHAPES = ((6, 5), (3, 4), (2, 2))


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    # float16 entries are float16-exact inputs / parameters: the reference used them as float32.
    return {k: f[k].astype(np.float32) if f[k].dtype == np.float16 else f[k] for k in f.files}


@pytest.fixture(scope="module")
def msda(ref):
  module = da.MSDeformAttn(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
  h = ref["msda/hidden_states"]
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), h, h, ref["msda/reference_points"], SHAPES))
  state = {k[len("msda/param/"):]: v for k, v in ref.items() if k.startswith("msda/param/")}
  params = convert_state_dict(state, shapes["params"], component="msda")
  return module, params


def test_core_matches_pytorch_reference(ref):
  loc = ref["core/sampling_locations"]
  assert (loc < 0).any() and (loc > 1).any()  # zero padding is exercised
  out = jax.jit(da.multi_scale_deformable_attention, static_argnums=1)(
      ref["core/value"], SHAPES, loc, ref["core/attention_weights"])
  assert_close(out, ref["core/output"], what="core")
  # spatial_shapes as a NumPy array works too; a wrong level size is refused.
  out2 = da.multi_scale_deformable_attention(ref["core/value"], np.array(SHAPES), loc,
                                             ref["core/attention_weights"])
  assert_close(out2, ref["core/output"], what="core (array shapes)")
  with pytest.raises(ValueError, match="sum to"):
    da.multi_scale_deformable_attention(ref["core/value"], ((6, 5), (3, 4), (2, 3)), loc,
                                        ref["core/attention_weights"])


def test_module_matches_transformers(ref, msda):
  module, params = msda
  # HF names, PyTorch Linear [out, in] -> Flax kernel [in, out].
  assert set(params) == {"sampling_offsets", "attention_weights", "value_proj", "output_proj"}
  assert params["sampling_offsets"]["kernel"].shape == (32, 4 * 3 * 4 * 2)
  h = ref["msda/hidden_states"]
  assert ref["msda/attention_mask"].any()
  apply = jax.jit(module.apply, static_argnums=4, static_argnames="return_weights")
  out, weights = apply({"params": params}, h, h, ref["msda/reference_points"], SHAPES,
                       position_embeddings=ref["msda/position_embeddings"],
                       attention_mask=ref["msda/attention_mask"], return_weights=True)
  assert_close(out, ref["msda/output"], what="msda")
  assert_close(np.asarray(weights)[:, :8], ref["msda/attention_weights"], what="msda weights")
  # Box reference points (cx, cy, w, h).
  out4 = apply({"params": params}, h, h, ref["msda/ref4"], SHAPES)
  assert_close(out4, ref["msda/output4"], what="msda boxes")
  # The padding mask matters (value zeroed at padding tokens).
  unmasked = apply({"params": params}, h, h, ref["msda/reference_points"], SHAPES,
                   position_embeddings=ref["msda/position_embeddings"])
  assert np.abs(np.asarray(unmasked)[1] - ref["msda/output"][1]).max() > 1e-3
  assert_close(np.asarray(unmasked)[0], ref["msda/output"][0], what="unpadded image")


def test_reference_points_and_levels(ref):
  got = da.reference_points(SHAPES, jnp.asarray(ref["msda/valid_ratios"]))
  assert_close(got, ref["msda/reference_points"], what="reference points")
  maps = [jnp.arange(2 * h * w * 3, dtype=jnp.float32).reshape(2, h, w, 3) + 1000 * i
          for i, (h, w) in enumerate(SHAPES)]
  flat, shapes, start = da.flatten_levels(maps)
  assert shapes == SHAPES and list(start) == [0, 30, 42]
  assert flat.shape == (2, 46, 3)
  # Row-major NHWC flattening: token start[l] + i * W + j is pixel (i, j) of level l.
  np.testing.assert_array_equal(flat[:, 30 + 1 * 4 + 2], maps[1][:, 1, 2])
  for a, b in zip(da.unflatten_levels(flat, shapes), maps):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="level 1"):
    da.flatten_levels([maps[0], maps[1][..., :2]])


def test_published_initialisation(ref):
  module = da.MSDeformAttn(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
  x = jnp.zeros((1, 46, 32))
  init = jax.jit(module.init, static_argnums=4)
  params = init(jax.random.key(0), x, x, jnp.full((1, 46, 3, 2), 0.5), SHAPES)["params"]
  assert_close(params["sampling_offsets"]["bias"], ref["msda/init/sampling_offsets.bias"],
               what="offset bias")
  assert not np.asarray(params["sampling_offsets"]["kernel"]).any()
  assert not np.asarray(params["attention_weights"]["kernel"]).any()


def test_point_sample_and_gradients(ref):
  # point_sample is the same bilinear rule: level 0 of the core, one head, equals a gather.
  feat = jnp.asarray(np.random.RandomState(0).randn(2, 6, 5, 3), jnp.float32)
  pts = jnp.asarray([[[0.1, 0.1], [0.5, 0.5], [1.1, 0.3]], [[0.0, 0.0], [0.99, 0.99],
                                                           [0.3, 0.7]]], jnp.float32)
  got = np.asarray(da.point_sample(feat, pts))
  # (0.5, 0.5) on a 6x5 map is pixel (x=2.0, y=2.5): the mean of rows 2 and 3 at column 2.
  np.testing.assert_allclose(got[0, 1], (feat[0, 2, 2] + feat[0, 3, 2]) / 2, rtol=1e-6)
  # (0, 0) is pixel (-0.5, -0.5): a quarter of pixel (0, 0), the rest is zero padding.
  np.testing.assert_allclose(got[1, 0], feat[1, 0, 0] / 4, rtol=1e-6)
  # Gradients flow to the values and the sampling locations (central differences).
  value, loc, w = (jnp.asarray(ref[k]) for k in
                   ("core/value", "core/sampling_locations", "core/attention_weights"))
  f = jax.jit(lambda v, l: da.multi_scale_deformable_attention(v, SHAPES, l, w).sum())
  gv, gl = jax.jit(jax.grad(f, argnums=(0, 1)))(value, loc)
  d = jnp.asarray(np.random.RandomState(1).randn(*loc.shape), jnp.float32) * 1e-3
  fd = (f(value, loc + d) - f(value, loc - d)) / 2
  assert abs(float(fd) - float((gl * d).sum())) <= 0.02 * abs(float(fd)) + 1e-4
  assert float(jnp.abs(gl).max()) > 0 and float(jnp.abs(gv).max()) > 0
