"""HSNet: Hypercorrelation Squeeze Network (Min, Kang, Cho; ICCV 2021) as Flax Linen modules.

Pipeline (published juhongm999/hsnet, model/hsnet.py and model/learner.py), NHWC / channels last:

1. Backbone taps (fssjax.nn.resnet / fssjax.nn.vgg) of query and support images.
2. Support features multiplied by the support mask, resized to each feature map with bilinear
   interpolation with aligned corners.
3. Multi-layer cosine correlation (fssjax.nn.correlation), one 4D tensor per pyramid level
   `[B, Hq, Wq, Hs, Ws, n_level]`, deepest level first.
4. HPN learner:
   * squeeze blocks, each layer CenterPivotConv4d -> GroupNorm(4 groups) -> ReLU, channels
     16, 64, 128: level 4 kernels 3,3,3 support strides 2,2,2; level 3 kernels 5,3,3 strides
     4,2,2; level 2 kernels 5,5,3 strides 4,4,2;
   * mix: upsample the coarser level along its QUERY dims to the finer level's query size
     (bilinear, aligned corners; the support dims already agree), add, and apply a 3-layer
     128-channel block (kernels 3, stride 1) -- once 4->3, once 3->2;
   * mean over the support dims -> [B, Hq2, Wq2, 128];
   * decoder: conv3x3 128->128, ReLU, conv3x3 128->64, ReLU; bilinear (aligned corners) x2
     upsample; conv3x3 64->64, ReLU, conv3x3 64->2 (all convs with bias, padding 1).
5. Logits upsampled (bilinear, aligned corners) to the support image size (= query size).

Published decoder upsampling uses `(W * 2,) * 2` (square inputs); this module uses
`(2 H, 2 W)`, identical for square inputs and correct for non-square ones.

Parameter names mirror the published module names (`encoder_layer4`, `encoder_layer4to3`,
`decoder1`, ...; inside a block `layers_{3i}` is the i-th conv4d and `layers_{3i+1}` its
GroupNorm, as in the published `nn.Sequential`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn import resnet as resnet_lib
from fssjax.nn import vgg as vgg_lib
from fssjax.nn.conv4d import CenterPivotConv4d
from fssjax.nn.correlation import multilayer_correlation
from fssjax.nn.ops import resize_bilinear

BACKBONES = ("resnet50", "resnet101", "vgg16", "resnet_tiny")


def make_backbone(name: str, dtype: Any = None) -> nn.Module:
  """Backbone module by name; it has a `level_sizes` property (maps per level, shallowest first)."""
  if name == "resnet50":
    return resnet_lib.resnet50(dtype)
  if name == "resnet101":
    return resnet_lib.resnet101(dtype)
  if name == "resnet_tiny":
    return resnet_lib.resnet_tiny(dtype)
  if name == "vgg16":
    return vgg_lib.vgg16(dtype)
  raise ValueError(f"Unknown HSNet backbone {name!r}; expected one of {BACKBONES}")


def mask_features(feats: Sequence[jnp.ndarray], mask: jnp.ndarray) -> list[jnp.ndarray]:
  """Multiplies each feature map by the mask resized to it (bilinear, aligned corners).

  Args:
    feats: list of [B, h, w, C].
    mask: [B, H, W] float in [0, 1].

  Returns:
    list of [B, h, w, C].
  """
  out = []
  for f in feats:
    m = resize_bilinear(mask[..., None].astype(jnp.float32), f.shape[1:3], axes=(1, 2),
                        align_corners=True)
    out.append(f * m.astype(f.dtype))
  return out


class SqueezeBlock(nn.Module):
  """A stack of (CenterPivotConv4d -> GroupNorm -> ReLU) layers on [B, Hq, Wq, Hs, Ws, C]."""

  features: Sequence[int]
  kernel_sizes: Sequence[int]
  support_strides: Sequence[int]
  groups: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, Hq, Wq, Hs, Ws, C] -> [B, Hq, Wq, Hs', Ws', features[-1]]."""
    if not len(self.features) == len(self.kernel_sizes) == len(self.support_strides):
      raise ValueError("SqueezeBlock: features, kernel_sizes and support_strides differ in length")
    for i, (ch, k, s) in enumerate(zip(self.features, self.kernel_sizes, self.support_strides)):
      x = CenterPivotConv4d(ch, k, s, dtype=self.dtype, name=f"layers_{3 * i}")(x)
      x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, use_fast_variance=False,
                       dtype=self.dtype, name=f"layers_{3 * i + 1}")(x)
      x = nn.relu(x)
    return x


def _upsample_query_dims(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """Bilinear (aligned corners) resize of [B, Hq, Wq, Hs, Ws, C] along Hq, Wq."""
  return resize_bilinear(x, size, axes=(1, 2), align_corners=True)


class HPNLearner(nn.Module):
  """The hypercorrelation pyramid learner: squeeze, mix, support-mean, decode.

  Attributes:
    channels: (outch1, outch2, outch3), published (16, 64, 128).
    groups: GroupNorm groups (published 4).
  """

  channels: Sequence[int] = (16, 64, 128)
  groups: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, corr_pyramid: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Logits from the correlation pyramid.

    Args:
      corr_pyramid: [corr_l4, corr_l3, corr_l2] (deepest first), each
        [B, Hq_l, Wq_l, Hs_l, Ws_l, n_l].

    Returns:
      logits [B, 2 Hq_2, 2 Wq_2, 2] (channel 0 background, 1 foreground), float32.
    """
    c1, c2, c3 = self.channels
    block = lambda name, feats, ks, ss: SqueezeBlock(feats, ks, ss, self.groups, self.dtype,
                                                     name=name)
    corr4, corr3, corr2 = corr_pyramid
    if self.dtype is not None:
      corr4, corr3, corr2 = (c.astype(self.dtype) for c in (corr4, corr3, corr2))
    sqz4 = block("encoder_layer4", (c1, c2, c3), (3, 3, 3), (2, 2, 2))(corr4)
    sqz3 = block("encoder_layer3", (c1, c2, c3), (5, 3, 3), (4, 2, 2))(corr3)
    sqz2 = block("encoder_layer2", (c1, c2, c3), (5, 5, 3), (4, 4, 2))(corr2)

    def mix(name, coarse, fine):
      if coarse.shape[3:5] != fine.shape[3:5]:
        raise ValueError(f"HSNet support dims disagree between levels: {coarse.shape} vs "
                         f"{fine.shape}; use an input size where they match (e.g. 400)")
      x = _upsample_query_dims(coarse, fine.shape[1:3]) + fine
      return block(name, (c3, c3, c3), (3, 3, 3), (1, 1, 1))(x)

    mix43 = mix("encoder_layer4to3", sqz4, sqz3)
    mix432 = mix("encoder_layer3to2", mix43, sqz2)

    encoded = jnp.mean(mix432, axis=(3, 4))  # [B, Hq2, Wq2, c3]

    conv = lambda name, ch: nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                    name=name)
    y = nn.relu(conv("decoder1_0", c3)(encoded))
    y = nn.relu(conv("decoder1_2", c2)(y))
    y = resize_bilinear(y, (2 * y.shape[1], 2 * y.shape[2]), axes=(1, 2), align_corners=True)
    y = nn.relu(conv("decoder2_0", c2)(y))
    y = conv("decoder2_2", 2)(y)
    return y.astype(jnp.float32)


class HSNet(nn.Module):
  """Backbone + hypercorrelation + HPN learner.

  Attributes:
    backbone_name: 'resnet50' | 'resnet101' | 'vgg16' | 'resnet_tiny'.
    learner_channels: HPN channels (published (16, 64, 128)).
    backbone_trainable: if False, backbone features are wrapped in stop_gradient.
    dtype: compute dtype (None = float32); parameters stay float32.
  """

  backbone_name: str = "resnet50"
  learner_channels: Sequence[int] = (16, 64, 128)
  backbone_trainable: bool = False
  dtype: Any = None

  def setup(self):
    self.backbone = make_backbone(self.backbone_name, self.dtype)
    self.learner = HPNLearner(tuple(self.learner_channels), dtype=self.dtype)

  def features(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    """Backbone taps of [B, H, W, 3] images."""
    feats = self.backbone(images)
    if not self.backbone_trainable:
      feats = [jax.lax.stop_gradient(f) for f in feats]
    return feats

  def __call__(self, query_image: jnp.ndarray, support_image: jnp.ndarray,
               support_mask: jnp.ndarray) -> jnp.ndarray:
    """One-shot forward.

    Args:
      query_image: [B, H, W, 3].
      support_image: [B, H, W, 3].
      support_mask: [B, Hm, Wm] float, 1 foreground, 0 elsewhere.

    Returns:
      logits [B, H, W, 2] float32 (bilinear, aligned corners, to the support image size).
    """
    b = query_image.shape[0]
    feats = self.features(jnp.concatenate([query_image, support_image], axis=0))
    query_feats = [f[:b] for f in feats]
    support_feats = mask_features([f[b:] for f in feats], support_mask)
    corr = multilayer_correlation(query_feats, support_feats, self.backbone.level_sizes)
    logits = self.learner(corr)
    return resize_bilinear(logits, support_image.shape[1:3], axes=(1, 2), align_corners=True)
