"""Bottleneck ResNets (torchvision v1.5 layout) that return HSNet's feature taps.

Layout as torchvision's `resnet50` / `resnet101`: stem conv 7x7 stride 2 (no bias) -> BN ->
ReLU -> max-pool 3x3 stride 2 (padding 1); four stages of bottlenecks (1x1 -> 3x3 -> 1x1,
expansion 4) with the stride on the 3x3 conv (v1.5) and a 1x1 conv + BN projection shortcut on
the first block of each stage. BatchNorm epsilon 1e-5.

`__call__` returns, as HSNet extracts them, every bottleneck output of stages 2, 3 and 4 taken
after the residual add and before the block's final ReLU (ResNet-50: 4 + 6 + 3 = 13 maps at
strides 8, 16, 32).

Normalisation: `norm='batch'` is BatchNorm in inference mode (running statistics in the
`batch_stats` collection: pretrained, frozen backbones as in HSNet, whose backbone always stays
in `eval()`); `norm='group'` is GroupNorm (for the small from-scratch `resnet_tiny`, which trains
without batch statistics to update).

Parameter names mirror torchvision's state-dict keys (see fssjax.weights.torchvision):
`conv1`, `bn1`, `layer{i}_{j}/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_conv,downsample_bn}`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

BN_EPS = 1e-5


def _norm(kind: str, channels: int, name: str, dtype: Any, param_dtype: Any) -> nn.Module:
  if kind == "batch":
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  if kind == "group":
    return nn.GroupNorm(num_groups=min(32, max(1, channels // 2)), epsilon=BN_EPS, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  raise ValueError(f"Unknown norm {kind!r}; expected 'batch' or 'group'")


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5); returns the output BEFORE the final ReLU.

  Attributes:
    width: channels of the 1x1 / 3x3 convs; the output has `width * expansion` channels.
    stride: stride of the 3x3 conv (and of the projection shortcut).
    expansion: output channel multiplier (4).
    norm: 'batch' or 'group'.
  """

  width: int
  stride: int = 1
  expansion: int = 4
  norm: str = "batch"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H / stride, W / stride, width * expansion] (pre-ReLU)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(_norm, self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    out_ch = self.width * self.expansion
    y = conv(self.width, (1, 1), name="conv1")(x)
    y = nn.relu(norm(self.width, "bn1")(y))
    y = conv(self.width, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
             name="conv2")(y)
    y = nn.relu(norm(self.width, "bn2")(y))
    y = conv(out_ch, (1, 1), name="conv3")(y)
    y = norm(out_ch, "bn3")(y)
    residual = x
    if self.stride != 1 or x.shape[-1] != out_ch:
      residual = conv(out_ch, (1, 1), strides=(self.stride, self.stride),
                      name="downsample_conv")(x)
      residual = norm(out_ch, "downsample_bn")(residual)
    return y + residual


class ResNet(nn.Module):
  """Bottleneck ResNet returning HSNet's taps (stages 2..4, every block, pre-ReLU).

  Attributes:
    stage_sizes: bottlenecks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    widths: bottleneck widths per stage (torchvision: 64, 128, 256, 512).
    stem_width: channels of the stem conv (torchvision: 64).
    norm: 'batch' (inference-mode BN, statistics in `batch_stats`) or 'group'.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = "batch"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @property
  def level_sizes(self) -> tuple[int, ...]:
    """Number of tapped maps per pyramid level, shallowest first (stages 2, 3, 4)."""
    return tuple(self.stage_sizes[1:])

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """Feature taps.

    Args:
      x: images [B, H, W, 3], ImageNet-normalised.

    Returns:
      sum(stage_sizes[1:]) maps [B, H/s, W/s, 4 * width] with s = 8 (stage 2), 16, 32
      (sizes follow PyTorch's floor arithmetic for odd inputs).
    """
    if len(self.stage_sizes) != 4 or len(self.widths) != 4:
      raise ValueError("ResNet expects 4 stages")
    x = x.astype(self.dtype) if self.dtype is not None else x
    x = nn.Conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv1")(x)
    x = nn.relu(_norm(self.norm, self.stem_width, "bn1", self.dtype, self.param_dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = []
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = Bottleneck(self.widths[i], stride=stride, norm=self.norm, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"layer{i + 1}_{j}")(x)
        if i >= 1:
          feats.append(x)
        x = nn.relu(x)
    return feats


def resnet50(dtype: Any = None) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 6, 3), dtype=dtype)


def resnet101(dtype: Any = None) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 23, 3), dtype=dtype)


def resnet_tiny(dtype: Any = None) -> ResNet:
  """A small trainable bottleneck ResNet for from-scratch CPU demos (GroupNorm, 147,696 params;
  blocks (1, 1, 2, 1), widths 8/16/32/64, taps: 1 + 2 + 1 maps of 64, 128, 256 channels)."""
  return ResNet(stage_sizes=(1, 1, 2, 1), widths=(8, 16, 32, 64), stem_width=16, norm="group",
                dtype=dtype)
