"""CenterPivotConv4d equals a dense 4D convolution whose kernel lives on the center-pivot cross."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn.conv4d import CenterPivotConv4d


def dense_conv4d(x, kernel, bias, stride):
  """Direct 4D convolution (cross-correlation, zero padding k // 2, stride (1, 1, s, s)).

  x: [B, A, B', C, D, Cin]; kernel: [k, k, k, k, Cin, Cout]; loops over every kernel tap.
  """
  k = kernel.shape[0]
  p = k // 2
  b, h1, w1, h2, w2, _ = x.shape
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (p, p), (p, p), (0, 0)))
  o2 = (h2 + 2 * p - k) // stride + 1
  o3 = (w2 + 2 * p - k) // stride + 1
  out = np.zeros((b, h1, w1, o2, o3, kernel.shape[-1]), np.float64)
  for i, j, u, v in itertools.product(range(k), repeat=4):
    patch = xp[:, i:i + h1, j:j + w1, u:u + stride * (o2 - 1) + 1:stride,
               v:v + stride * (o3 - 1) + 1:stride, :]
    out += np.einsum("...c,cd->...d", patch, kernel[i, j, u, v])
  return out + bias


def cross_kernel(params, k):
  """The dense 4D kernel equivalent to the two 2D convs: zero off the center-pivot cross."""
  c = k // 2
  k1 = np.asarray(params["conv1"]["kernel"], np.float64)  # [k, k, Cin, Cout] over query dims
  k2 = np.asarray(params["conv2"]["kernel"], np.float64)  # [k, k, Cin, Cout] over support dims
  dense = np.zeros((k, k, k, k) + k1.shape[2:], np.float64)
  dense[:, :, c, c] += k1
  dense[c, c, :, :] += k2
  bias = np.asarray(params["conv1"]["bias"]) + np.asarray(params["conv2"]["bias"])
  return dense, bias


@pytest.mark.parametrize("k,stride,shape", [
    (3, 1, (2, 4, 5, 6, 5, 3)),
    (3, 2, (2, 5, 4, 7, 6, 3)),
    (5, 4, (1, 4, 3, 9, 7, 2)),
    (5, 2, (1, 3, 4, 6, 5, 2)),
    (3, 1, (1, 1, 4, 1, 2, 3)),  # sides smaller than the kernel: dead taps are skipped
    (5, 1, (1, 2, 1, 3, 1, 2)),
    (3, 2, (1, 2, 3, 1, 3, 2)),  # a 1-pixel support side with stride 2
])
def test_center_pivot_equals_dense_cross_kernel(k, stride, shape):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.standard_normal(shape).astype(np.float32)
  module = CenterPivotConv4d(features=4, kernel_size=k, support_stride=stride)
  variables = module.init(jax.random.key(0), jnp.asarray(x))
  # Non-trivial biases so that both are checked.
  params = jax.tree.map(np.asarray, variables["params"])
  params["conv1"]["bias"] = rng.standard_normal(4).astype(np.float32)
  params["conv2"]["bias"] = rng.standard_normal(4).astype(np.float32)
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))

  dense, bias = cross_kernel(params, k)
  want = dense_conv4d(x.astype(np.float64), dense, bias, stride)
  assert got.shape == want.shape
  expected_support = tuple(-(-n // stride) for n in shape[3:5])
  assert got.shape[3:5] == expected_support
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_off_cross_taps_do_not_contribute():
  """A dense kernel with an off-cross tap differs: the module is not a full 4D conv."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 3, 3, 3, 2)).astype(np.float32)
  module = CenterPivotConv4d(features=2, kernel_size=3)
  params = jax.tree.map(np.asarray, module.init(jax.random.key(1), jnp.asarray(x))["params"])
  dense, bias = cross_kernel(params, 3)
  dense[0, 0, 0, 0] = 1.0  # off the cross
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  assert np.abs(got - dense_conv4d(x, dense, bias, 1)).max() > 1e-2


def test_rejects_even_kernel_and_bad_rank():
  with pytest.raises(ValueError, match="odd"):
    CenterPivotConv4d(2, 4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, 2, 1)))
  with pytest.raises(ValueError, match="Hq, Wq, Hs, Ws"):
    CenterPivotConv4d(2, 3).init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))


@pytest.mark.parametrize("k,stride,shape", [
    (3, 1, (1, 3, 2, 2, 2, 5)),   # HSNet's mixing layers: 2 x 2 support maps, kernel 3
    (3, 2, (1, 2, 3, 4, 4, 3)),   # the last squeeze layer: 4 x 4 -> 2 x 2
    (5, 4, (1, 2, 2, 3, 4, 2)),
    (3, 1, (1, 4, 4, 1, 3, 2)),
])
def test_matmul_form_equals_convolution_form(k, stride, shape):
  """The small-map matrix-product form (CPU default) and the convolution form agree, outputs
  and gradients (parameters and input)."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  as_conv = CenterPivotConv4d(6, k, stride, matmul_max_positions=0)
  as_matmul = CenterPivotConv4d(6, k, stride, matmul_max_positions=64)
  variables = as_conv.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # non-zero biases
  np.testing.assert_allclose(as_matmul.apply(variables, x), as_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: (lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))))  # noqa: E731
  g_conv = jax.grad(loss(as_conv), argnums=(0, 1))(variables, x)
  g_matmul = jax.grad(loss(as_matmul), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_conv), jax.tree.leaves(g_matmul)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_backend_choice_in_one_place(monkeypatch):
  from fssjax.nn import conv4d  # pylint: disable=import-outside-toplevel
  assert conv4d.default_matmul_max_positions() == conv4d.MATMUL_MAX_POSITIONS.get(
      jax.default_backend(), 0)
  monkeypatch.setitem(conv4d.MATMUL_MAX_POSITIONS, jax.default_backend(), 0)
  assert conv4d.default_matmul_max_positions() == 0
