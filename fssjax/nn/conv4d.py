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
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp


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
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
    k, p = self.kernel_size, self.kernel_size // 2
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    (h0, h1), (w0, w1) = (_live_taps(n, k, p, stride) for n in x.shape[1:3])
    # Cropping the kernel to taps [h0, h1) shrinks the padding by h0 before and k - h1 after:
    # the output size and every output value are unchanged (the removed taps only read zeros).
    kernel = kernel[h0:h1, w0:w1]
    padding = ((p - h0, p - (k - h1)), (p - w0, p - (k - w1)))
    dtype = self.dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (stride, stride), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
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
    dtype: compute dtype (None: the input's).
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int
  support_stride: int = 1
  use_bias: bool = True
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
      return _Conv2d(self.features, k, use_bias=self.use_bias, dtype=self.dtype,
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
