"""Parity of the resize ops with a direct per-pixel implementation of PyTorch's rules."""

import numpy as np
import pytest

from fssjax.nn import ops


def _reference_bilinear_1d(v, n_out, align_corners):
  n_in = len(v)
  out = np.zeros(n_out)
  for i in range(n_out):
    if align_corners:
      src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(np.floor(src)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    t = src - lo
    out[i] = (1 - t) * v[lo] + t * v[hi]
  return out


def _reference_bilinear_2d(img, size, align_corners):
  h = np.stack([_reference_bilinear_1d(col, size[0], align_corners) for col in img.T], axis=1)
  return np.stack([_reference_bilinear_1d(row, size[1], align_corners) for row in h], axis=0)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (13, 4)), ((8, 8), (3, 3)), ((1, 4), (3, 9))])
def test_resize_bilinear_matches_reference(align_corners, in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(ops.resize_bilinear(x, out_hw, align_corners=align_corners))
  for b in range(2):
    for c in range(3):
      want = _reference_bilinear_2d(x[b, :, :, c].astype(np.float64), out_hw, align_corners)
      np.testing.assert_allclose(got[b, :, :, c], want, atol=1e-5)


def test_align_corners_keeps_corners_and_differs_from_half_pixel():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  a = np.asarray(ops.resize_bilinear(x, (7, 7), align_corners=True))
  b = np.asarray(ops.resize_bilinear(x, (7, 7), align_corners=False))
  assert a[0, 0, 0, 0] == 0 and a[0, -1, -1, 0] == 15
  assert not np.allclose(a, b)


def test_resize_nearest_torch_rule():
  x = np.arange(5).reshape(1, 5, 1, 1)
  got = np.asarray(ops.resize_nearest(x, (3, 1)))[0, :, 0, 0]
  np.testing.assert_array_equal(got, [0, 1, 3])  # floor(i * 5/3) = 0, 1, 3


@pytest.mark.parametrize("n_in,n_out,align_corners,row,cols,want", [
    # Values printed by torch 2.13 (CPU) F.interpolate(mode='bilinear') on unit impulses.
    # 400 -> 50 aligned: row 21 samples 171.00002 in float32, not 171 (HSNet's 50x50 masks).
    (400, 50, True, 21, slice(170, 173), [0.0, 0.99998474, 1.5258789e-05]),
    # 64 -> 7 half-pixel: scale * 3.5 - 0.5 rounded once (fused multiply-add): 31.500002.
    (64, 7, False, 3, slice(30, 33), [0.0, 0.4999981, 0.5000019]),
    (128, 400, False, 200, slice(62, 65), [0.0, 0.34000015, 0.65999985]),
])
def test_interpolation_weights_round_like_pytorch(n_in, n_out, align_corners, row, cols, want):
  w = ops.interpolation_matrix(n_in, n_out, align_corners)
  np.testing.assert_array_equal(w[row, cols], np.asarray(want, np.float32))
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
