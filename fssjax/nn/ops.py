"""Small numerical ops shared by modules, methods and the evaluator.

`resize_bilinear` reproduces PyTorch's `F.interpolate(mode='bilinear')` exactly, both with
`align_corners=True` (HSNet's choice for masks, 4D-level upsampling and logits) and with
half-pixel centres (`align_corners=False`). Unlike `jax.image.resize` it never antialiases
when downsampling, which is what the published PyTorch code does.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """Linear interpolation weights W [out_size, in_size] with out = W @ in (PyTorch semantics).

  The source positions and weights are computed in float32 with the operations of PyTorch's
  CPU kernel (aten/src/ATen/native/UpSample.h `area_pixel_compute_scale` /
  `area_pixel_compute_source_index`, UpSampleKernel.cpp `compute_indices_weights_linear`):
  scale = (in - 1) / (out - 1) (aligned corners) or in / out, src = scale * dst or
  max(scale * (dst + 0.5) - 0.5, 0) (one rounding: a fused multiply-add), lo = floor(src), lambda = clamp(src - lo, 0, 1). The float32
  rounding matters: at 400 -> 50 with aligned corners, output row 21 samples source 171.00002,
  not 171, so a row next to an all-zero one gets a weight of 2e-5 -- and HSNet L2-normalises
  the masked support features, which turns such a tiny masked value into a unit vector.
  """
  f32 = np.float32
  if in_size == 1 or out_size == 0:
    w = np.zeros((out_size, in_size), np.float32)
    w[:, 0] = 1.0
    return w
  dst = np.arange(out_size).astype(f32)
  if align_corners:
    scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
    src = (scale * dst).astype(f32)
  else:
    scale = f32(in_size) / f32(out_size)
    # One rounding after the multiply-add, as PyTorch's compiled kernel (a fused multiply-add):
    # the float64 product of two float32 values is exact.
    src = (np.float64(scale) * (dst + f32(0.5)).astype(np.float64) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(f32)
  hi = lo + (lo < in_size - 1)
  w = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(w, (rows, lo), f32(1) - lam)
  np.add.at(w, (rows, hi), lam)
  return w


def resize_bilinear(x: jnp.ndarray, size: Sequence[int], axes: Sequence[int] = (1, 2),
                    align_corners: bool = True) -> jnp.ndarray:
  """Bilinear resize of `x` along two spatial axes (default NHWC's H and W).

  Args:
    x: array with spatial dims at `axes`, for example [B, H, W, C].
    size: (out_h, out_w).
    axes: the two axes to resize.
    align_corners: corner-aligned sampling (HSNet) or half-pixel centres.

  Returns:
    x resized to `size` along `axes`, same dtype.
  """
  out = x
  for axis, n_out in zip(axes, size):
    axis = axis % x.ndim
    n_in = out.shape[axis]
    if n_in == n_out:
      continue
    w = jnp.asarray(interpolation_matrix(n_in, n_out, align_corners), dtype=jnp.float32)
    moved = jnp.moveaxis(out, axis, -1).astype(jnp.float32)
    # HIGHEST: exact float32 on TPU (bf16 passes by default) and GPU (TF32), as in PyTorch.
    moved = jnp.matmul(moved, w.T, precision=jax.lax.Precision.HIGHEST)
    out = jnp.moveaxis(moved, -1, axis).astype(x.dtype)
  return out


def resize_nearest(x: jnp.ndarray, size: Sequence[int], axes: Sequence[int] = (1, 2)) -> jnp.ndarray:
  """Nearest-neighbour resize with PyTorch's `mode='nearest'` index rule: src = floor(dst * in/out)."""
  out = x
  for axis, n_out in zip(axes, size):
    axis = axis % x.ndim
    n_in = out.shape[axis]
    idx = np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)
    out = jnp.take(out, jnp.asarray(idx), axis=axis)
  return out
