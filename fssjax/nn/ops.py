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
  """Linear interpolation weights W [out_size, in_size] with out = W @ in (PyTorch semantics)."""
  w = np.zeros((out_size, in_size), np.float64)
  if in_size == 1:
    w[:, 0] = 1.0
    return w.astype(np.float32)
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  rows = np.arange(out_size)
  np.add.at(w, (rows, lo), 1.0 - frac)
  np.add.at(w, (rows, hi), frac)
  return w.astype(np.float32)


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
