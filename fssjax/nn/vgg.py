"""VGG16 (torchvision `vgg16`, no batch norm) returning HSNet's feature taps.

torchvision's `vgg16().features` is a flat list of modules; HSNet taps indices
[17, 19, 21, 24, 26, 28, 30]: conv4_1, conv4_2, conv4_3, conv5_1, conv5_2, conv5_3 (each cloned
right after the conv, i.e. BEFORE its in-place ReLU) and pool5 (max-pool of relu(conv5_3)).
Convs are 3x3, padding 1, with bias; pools are 2x2 stride 2 (floor). Parameter names mirror the
torchvision keys: `features_{index}` for the conv at `features.{index}`.

Pyramid levels for HSNet (shallowest first): conv4_x (3 maps, stride 8), conv5_x (3, stride 16),
pool5 (1, stride 32).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision "D" configuration; "M" = max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
             "M")
VGG16_TAPS = (17, 19, 21, 24, 26, 28, 30)


def vgg16_conv_indices() -> list[tuple[int, int, int]]:
  """(features index, in channels, out channels) of every conv of torchvision's vgg16."""
  out, idx, in_ch = [], 0, 3
  for v in VGG16_CFG:
    if v == "M":
      idx += 1
    else:
      out.append((idx, in_ch, v))
      in_ch = v
      idx += 2  # conv, ReLU
  return out


class VGG16(nn.Module):
  """VGG16 feature extractor up to pool5."""

  dtype: Any = None
  param_dtype: Any = jnp.float32

  @property
  def level_sizes(self) -> tuple[int, ...]:
    return (3, 3, 1)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """Feature taps.

    Args:
      x: images [B, H, W, 3], ImageNet-normalised.

    Returns:
      7 maps: conv4_1..3 [B, H/8, W/8, 512], conv5_1..3 [B, H/16, W/16, 512] (pre-ReLU) and
      pool5 [B, H/32, W/32, 512] (floor sizes).
    """
    x = x.astype(self.dtype) if self.dtype is not None else x
    feats = []
    idx = 0
    for v in VGG16_CFG:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        if idx in VGG16_TAPS:
          feats.append(x)
        idx += 1
        if idx > VGG16_TAPS[-1]:
          break
      else:
        x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"features_{idx}")(x)
        if idx in VGG16_TAPS:
          feats.append(x)
        x = nn.relu(x)
        idx += 2
    return feats


def vgg16(dtype: Any = None) -> VGG16:
  return VGG16(dtype=dtype)
