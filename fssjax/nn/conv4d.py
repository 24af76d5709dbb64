"""Center-pivot 4D convolution (HSNet, Min et al., ICCV 2021).

A 4D convolution over a correlation tensor `[B, Hq, Wq, Hs, Ws, C]` whose kernel is zero
everywhere except on the "center-pivot cross": the positions where either the query offset or
the support offset is zero. It is computed as the sum of two 2D convolutions:

  * `conv1` (kernel k x k over the query dims, query stride 1) applied at every support position
    kept by the support stride, i.e. the support dims are subsampled first by slicing
    `[::stride, ::stride]` (published `prune`);
  * `conv2` (kernel k x k over the support dims, stride `stride` on the support dims) applied at
    every query position.

Both convolutions have a bias and zero padding `k // 2`. With odd `k` and padding `k // 2`,
slicing and the strided convolution give the same support size `ceil(Hs / stride)`, so the two
outputs add elementwise. The result equals a dense 4D convolution with stride
`(1, 1, stride, stride)`, padding `k // 2` and a kernel that is nonzero only on the cross (the
centre tap receives both `conv1`'s and `conv2`'s centre weights; see tests/test_conv4d.py).

When a side is smaller than the kernel (e.g. the 1 x 1 support maps of the mixing blocks at small
input sizes), kernel taps that only ever read zero padding are skipped: same result, less work.

Small maps as one matrix product. HSNet's deeper squeeze layers and all mixing layers convolve
support maps of 2 x 2 to 4 x 4 positions with 3 x 3 kernels, at a batch of thousands (every
query position). XLA's CPU backend turns such kernel-larger-than-input convolutions into a slow
generic loop (3-7 GFLOP/s). For an input of at most `matmul_max_positions` positions the
convolution is computed instead as `x.reshape(N, h*w*C_in) @ M`, where
`M[(i, j, c), (o, p, d)] = kernel[i - s*o + pad, j - s*p + pad, c, d]` (zero outside the kernel)
is gathered from the kernel: the same sums of products, in another order (differences at float
rounding level, about 1e-7 relative). Which form runs is chosen by backend in one place,
`default_matmul_max_positions()`; both are tested to agree.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Largest input map (positions h * w) convolved as one matrix product, per backend. CPU: XLA's
# convolution emitter is slow for kernels as large as the map (see the module docstring), the
# matrix product runs at full speed. GPU / TPU: the vendor convolution kernels take these shapes
# well, so the convolution form stays (not yet measured there: change it here when it is).
MATMUL_MAX_POSITIONS = {"cpu": 16}


def default_matmul_max_positions() -> int:
  """The small-map threshold for the backend in use (jax.default_backend())."""
  return MATMUL_MAX_POSITIONS.get(jax.default_backend(), 0)


def _tap_index(n: int, k: int, p: int, stride: int) -> np.ndarray:
  """[n, n_out] kernel-tap index (k = outside the kernel) of input i for output o."""
  n_out = (n + 2 * p - k) // stride + 1
  tap = np.arange(n)[:, None] - stride * np.arange(n_out)[None, :] + p
  return np.where((tap >= 0) & (tap < k), tap, k)


def conv_as_matmul(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int,
                   precision=None) -> jnp.ndarray:
  """A zero-padded 2D convolution (cross-correlation) as one matrix product.

  Args:
    x: [N, h, w, C_in].
    kernel: [k, k, C_in, C_out] (HWIO).
    stride: stride on both sides.
    padding: symmetric zero padding on both sides.
    precision: the product's `jax.lax.Precision`.

  Returns:
    [N, h_out, w_out, C_out], h_out = (h + 2 padding - k) // stride + 1 (the same as
    `jax.lax.conv_general_dilated` with those arguments, no bias).
  """
  n, h, w, cin = x.shape
  k = kernel.shape[0]
  th, tw = _tap_index(h, k, padding, stride), _tap_index(w, k, padding, stride)
  ho, wo = th.shape[1], tw.shape[1]
  kp = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # tap k: the zero tap
  m = kp[th[:, None, :, None], tw[None, :, None, :]]  # [h, w, ho, wo, C_in, C_out]
  m = m.transpose(0, 1, 4, 2, 3, 5).reshape(h * w * cin, ho * wo * kernel.shape[-1])
  y = jnp.matmul(x.reshape(n, h * w * cin), m, precision=precision)
  return y.reshape(n, ho, wo, kernel.shape[-1])


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

def _live_taps(n: int, k: int, p: int, stride: int) -> tuple[int, int]:
  """Kernel taps [lo, hi) along one side of size n that can touch a real (non-padding) input.

  With stride 1 these are the taps within n - 1 of the centre; with a larger stride only the
  n == 1 case is reduced (one output, only the centre tap reads the input).
  """
  if stride == 1:
    return max(0, p - (n - 1)), min(k, p + n)
  if n == 1:
    return p, p + 1
  return 0, k


class _Conv2d(nn.Module):
  """A 2D conv (NHWC, bias, zero padding k // 2) that skips kernel taps which only ever see
  zero padding (a support or query side smaller than the kernel, e.g. 1 x 1 maps). The result
  is identical to the full convolution; the parameters keep the full k x k shape."""

  features: int
  kernel_size: int
  use_bias: bool = True
  matmul_max_positions: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
    k, p = self.kernel_size, self.kernel_size // 2
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    limit = self.matmul_max_positions
    if limit is None:
      limit = default_matmul_max_positions()
    if x.shape[1] * x.shape[2] <= limit:
      y = conv_as_matmul(x.astype(dtype), kernel.astype(dtype), stride, p)
      if self.use_bias:
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        y = y + bias.astype(dtype)
      return y
    (h0, h1), (w0, w1) = (_live_taps(n, k, p, stride) for n in x.shape[1:3])
    # Cropping the kernel to taps [h0, h1) shrinks the padding by h0 before and k - h1 after:
    # the output size and every output value are unchanged (the removed taps only read zeros).
    kernel = kernel[h0:h1, w0:w1]
    padding = ((p - h0, p - (k - h1)), (p - w0, p - (k - w1)))
    y = _conv(x.astype(dtype), kernel.astype(dtype), stride, padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class CenterPivotConv4d(nn.Module):
  """Center-pivot 4D convolution.

  Attributes:
    features: output channels.
    kernel_size: odd kernel size k, used for all four dims (as published).
    support_stride: stride on the support dims (query dims always stride 1).
    use_bias: whether both 2D convs have a bias (published: True).
    matmul_max_positions: maps of at most this many positions (h * w) are convolved as one
      matrix product (see the module docstring); None: `default_matmul_max_positions()` for the
      backend in use; 0: always the convolution form.
    dtype: compute dtype (None: the input's).
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int
  support_stride: int = 1
  use_bias: bool = True
  matmul_max_positions: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the 4D convolution.

    Args:
      x: [B, Hq, Wq, Hs, Ws, C].

    Returns:
      [B, Hq, Wq, ceil(Hs / s), ceil(Ws / s), features] with s = support_stride.
    """
    if x.ndim != 6:
      raise ValueError(f"CenterPivotConv4d expects [B, Hq, Wq, Hs, Ws, C], got shape {x.shape}")
    k, s = self.kernel_size, self.support_stride
    if k % 2 != 1:
      raise ValueError(f"CenterPivotConv4d needs an odd kernel size, got {k}")
    b, hq, wq, _, _, _ = x.shape

    def conv(name):
      return _Conv2d(self.features, k, use_bias=self.use_bias,
                     matmul_max_positions=self.matmul_max_positions,
                     dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

    # conv1: query-dim conv at the support positions kept by the stride.
    x1 = x[:, :, :, ::s, ::s, :] if s > 1 else x
    hs1, ws1 = x1.shape[3], x1.shape[4]
    y1 = einops.rearrange(x1, "b hq wq hs ws c -> (b hs ws) hq wq c")
    y1 = conv("conv1")(y1, 1)
    y1 = einops.rearrange(y1, "(b hs ws) hq wq c -> b hq wq hs ws c", b=b, hs=hs1, ws=ws1)

    # conv2: support-dim conv with the support stride at every query position.
    y2 = einops.rearrange(x, "b hq wq hs ws c -> (b hq wq) hs ws c")
    y2 = conv("conv2")(y2, s)
    y2 = einops.rearrange(y2, "(b hq wq) hs ws c -> b hq wq hs ws c", b=b, hq=hq, wq=wq)
    return y1 + y2
