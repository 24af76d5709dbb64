"""DSV-LFS dense matching: a visual prompt from 4D correlation of SAM encoder features, and the
geometry between a method's scored view and Segment Anything's padded input.

Dense matching (Karimi and Poullis, CVPR 2025; published code aminpdik/DSV-LFS,
model/DSVLFS.py `mask_feature`, `multilayer_correlation`, `encoder_layerFewshot`,
`decoderFewshot`), channels last:

  1. the outputs of all L blocks of the SAM image encoder, for the query and the support
     ([B, h, w, C] each; 32 blocks for ViT-H), the support's multiplied by the support mask
     resized to the feature map (bilinear, aligned corners);
  2. per block, cosine correlation (channel L2 normalisation with eps 1e-5), clamped at 0,
     computed in float32 and stacked over the blocks: [B, hq, wq, hs, ws, L];
  3. one squeeze block (`fssjax.nn.hsnet.SqueezeBlock`: center-pivot 4D conv -> GroupNorm(4)
     -> ReLU, channels 16, 128, 256, kernels 3, 3, 3, support strides 2, 2, 2);
  4. mean over the support dims -> [B, hq, wq, 256];
  5. conv3x3 256->256, ReLU, conv3x3 256->256, ReLU (bias, padding 1): the dense prompt
     [B, h, w, 256] that replaces SAM's dense (mask) embedding in the mask decoder.

The output width follows the mask decoder's prompt width (`channels[-1]`, 256 for every
published SAM). Parameter names are the published module names: `encoder_layerFewshot`
(`layers_{3i}` the i-th conv4d with `conv1` / `conv2`, `layers_{3i+1}` its GroupNorm) and
`decoderFewshot` (`layers_0`, `layers_2`: the two convs of the published `nn.Sequential`).

Geometry. The episode's masks live in the scored view (`data.image_size` S, the whole image
resized to S x S), SAM's input in its own view of size s: SAM's longest-side resize to
(h, w) <= s, placed top-left and zero padded (`fssjax.data.views`, 'longest_side'), or a
plain square resize ('square', h = w = s). `support_mask_at` gives the support mask as the
published code sees it (the mask in SAM's frame: nearest-resized into the (h, w) box, 0 in
the padding) sampled at a feature grid with aligned corners; `masks_to_scored_view` is SAM's
`postprocess_masks` (bilinear upsampling of the low-resolution masks to s, crop to (h, w),
bilinear resize to the scored size, both with half-pixel centres) landing on the S x S view.
Both are per-example matrices built from the traced (h, w), so one compiled program serves
every image shape.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.correlation import cosine_correlation
from fssjax.nn.hsnet import SqueezeBlock

PUBLISHED_CHANNELS = (16, 128, 256)
PUBLISHED_KERNELS = (3, 3, 3)
PUBLISHED_STRIDES = (2, 2, 2)


def block_correlation(query_feats: Sequence[jax.Array],
                      support_feats: Sequence[jax.Array]) -> jax.Array:
  """Clamped cosine correlation of every block pair, stacked: [B, hq, wq, hs, ws, L] float32.

  Args:
    query_feats: L maps [B, hq, wq, C_l].
    support_feats: L (masked) support maps [B, hs, ws, C_l].

  Raises:
    ValueError: different numbers of query and support maps, or none.
  """
  if len(query_feats) != len(support_feats) or not query_feats:
    raise ValueError(f"block_correlation: {len(query_feats)} query maps vs "
                     f"{len(support_feats)} support maps (need the same number, >= 1)")
  corrs = [cosine_correlation(q.astype(jnp.float32), s.astype(jnp.float32))
           for q, s in zip(query_feats, support_feats)]
  return jnp.stack(corrs, axis=-1)


class DenseMatching(nn.Module):
  """Correlation -> squeeze block -> support mean -> two 3x3 convs (the DSV-LFS visual prompt).

  Attributes:
    channels: squeeze-block channels; published (16, 128, 256); the last is the dense prompt
      width (the SAM mask decoder's hidden size).
    kernel_sizes: 4D kernel sizes per layer; published (3, 3, 3).
    support_strides: support-dim strides per layer; published (2, 2, 2).
    groups: GroupNorm groups (published 4).
    dtype: compute dtype of the squeeze block and convs (the correlation is float32).
  """

  channels: Sequence[int] = PUBLISHED_CHANNELS
  kernel_sizes: Sequence[int] = PUBLISHED_KERNELS
  support_strides: Sequence[int] = PUBLISHED_STRIDES
  groups: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, query_feats: Sequence[jax.Array], support_feats: Sequence[jax.Array]
               ) -> jax.Array:
    """Dense prompt [B, hq, wq, channels[-1]] (float32) from L query maps and L masked support
    maps ([B, h, w, C_l]; see `block_correlation`)."""
    corr = block_correlation(query_feats, support_feats)
    if self.dtype is not None:
      corr = corr.astype(self.dtype)
    x = SqueezeBlock(tuple(self.channels), tuple(self.kernel_sizes),
                     tuple(self.support_strides), groups=self.groups, dtype=self.dtype,
                     name="encoder_layerFewshot")(corr)
    x = jnp.mean(x.astype(jnp.float32), axis=(3, 4))
    x = _Decoder(int(self.channels[-1]), dtype=self.dtype, name="decoderFewshot")(x)
    return x.astype(jnp.float32)


class _Decoder(nn.Module):
  """conv3x3 -> ReLU -> conv3x3 -> ReLU (published `decoderFewshot`)."""

  width: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in (0, 2):
      x = nn.Conv(self.width, (3, 3), padding=1, dtype=self.dtype, name=f"layers_{i}")(x)
      x = nn.relu(x)
    return x


def mask_support_features(feats: Sequence[jax.Array], mask_at: Any) -> list[jax.Array]:
  """Each support map [B, h, w, C] times the support mask at its grid (`mask_at((h, w))` ->
  [B, h, w] float32), in the map's dtype."""
  out = []
  for f in feats:
    m = mask_at(tuple(f.shape[1:3]))
    out.append(f * m[..., None].astype(f.dtype))
  return out


# ----------------------------------------------------------------------------------------
# Geometry between the scored view and SAM's view (traced sizes).


def _linear_weights(src: jax.Array, in_size: jax.Array, n: int) -> jax.Array:
  """Rows of linear-interpolation weights [..., n] sampling positions `src` of a signal of
  `in_size` (<= n) valid samples, clamped to [0, in_size - 1] (PyTorch's edge rule)."""
  top = jnp.maximum(in_size - 1, 0).astype(jnp.float32)
  src = jnp.clip(src, 0.0, top)
  lo = jnp.floor(src)
  lam = src - lo
  lo_i = lo.astype(jnp.int32)
  hi_i = jnp.minimum(lo_i + 1, jnp.maximum(in_size - 1, 0).astype(jnp.int32))
  idx = jnp.arange(n)
  return ((idx == lo_i[..., None]) * (1.0 - lam)[..., None]
          + (idx == hi_i[..., None]) * lam[..., None]).astype(jnp.float32)


def _mask_rows(valid: jax.Array, view: int, scored: int, grid: int) -> jax.Array:
  """[B, grid, scored]: the support mask's rows at `grid` aligned-corner positions of a view
  axis of length `view` whose first `valid` pixels show the image (the rest is padding, 0);
  view pixel y shows scored row floor(y * scored / valid) (nearest resize)."""
  if grid > 1:
    pos = jnp.arange(grid, dtype=jnp.float32) * ((view - 1) / (grid - 1))
  else:
    pos = jnp.zeros((1,), jnp.float32)
  y0 = jnp.floor(pos).astype(jnp.int32)
  y1 = jnp.minimum(y0 + 1, view - 1)
  lam = pos - y0.astype(jnp.float32)
  valid = valid.astype(jnp.int32)[:, None]  # [B, 1]
  cols = jnp.arange(scored)

  def pick(y):  # [B, grid, scored] one-hot of the scored row shown at view row y (0: padding)
    src = jnp.minimum((y[None, :] * scored) // jnp.maximum(valid, 1), scored - 1)
    inside = (y[None, :] < valid)
    return (cols == src[..., None]) * inside[..., None]

  return (pick(y0) * (1.0 - lam)[None, :, None] + pick(y1) * lam[None, :, None]).astype(
      jnp.float32)


def support_mask_at(mask: jax.Array, view_hw: jax.Array, view_size: int,
                    grid: Sequence[int]) -> jax.Array:
  """The support mask in SAM's frame, resized to a feature grid (published `mask_feature`).

  Args:
    mask: [B, S, S] float in [0, 1]: the support mask in the scored view (whole image
      resized to S x S).
    view_hw: [B, 2] int: (h, w) of the image inside SAM's s x s view.
    view_size: s.
    grid: (gh, gw) of the feature map.

  Returns:
    [B, gh, gw] float32: the mask as nearest-resized into the (h, w) box of an s x s canvas
    (0 on the padding), then bilinearly resized with aligned corners to the grid. With a
    square view of size S this is `resize_bilinear(mask, grid, align_corners=True)`.
  """
  b, s_h, s_w = mask.shape
  ry = _mask_rows(view_hw[:, 0], view_size, s_h, int(grid[0]))
  rx = _mask_rows(view_hw[:, 1], view_size, s_w, int(grid[1]))
  m = mask.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  return jnp.einsum("bgy,byx,bhx->bgh", ry, m, rx, precision=hi)


def _post_rows(valid: jax.Array, low: int, view: int, out: int) -> jax.Array:
  """[B, out, low]: SAM's postprocess along one axis: low-res (size `low`) -> bilinear to
  `view` (half-pixel), crop to the first `valid`, bilinear to `out` (half-pixel)."""
  valid = valid.astype(jnp.float32)[:, None]  # [B, 1]
  dst = jnp.arange(out, dtype=jnp.float32)[None, :]
  # crop (size valid) -> out: source position in the cropped view.
  y = jnp.maximum((dst + 0.5) * (valid / out) - 0.5, 0.0)  # [B, out]
  # weights over view pixels 0..view-1 (clamped to the crop)
  w_view = _linear_weights(y, valid[..., 0][:, None], view)  # [B, out, view]
  # view -> low res: each view pixel is a bilinear sample of the low-res map.
  src = jnp.maximum((jnp.arange(view, dtype=jnp.float32) + 0.5) * (low / view) - 0.5, 0.0)
  w_low = _linear_weights(src, jnp.asarray(low), low)  # [view, low]
  return jnp.einsum("bov,vl->bol", w_view, w_low, precision=jax.lax.Precision.HIGHEST)


def masks_to_scored_view(low_res: jax.Array, view_hw: jax.Array, view_size: int,
                         out_size: Sequence[int]) -> jax.Array:
  """SAM's `postprocess_masks` onto the scored view.

  Args:
    low_res: [B, lh, lw] mask logits (the decoder's 4x-upsampled output; 256 x 256 for a
      1024 input).
    view_hw: [B, 2] int: (h, w) of the image inside SAM's view.
    view_size: s (SAM's input side).
    out_size: (H, W) of the scored view.

  Returns:
    [B, H, W] float32 logits: bilinear (half-pixel) to s x s, crop to (h, w), bilinear
    (half-pixel) to (H, W) -- as `F.interpolate` does it, with one composed matrix per axis.
  """
  _, lh, lw = low_res.shape
  ry = _post_rows(view_hw[:, 0], lh, view_size, int(out_size[0]))
  rx = _post_rows(view_hw[:, 1], lw, view_size, int(out_size[1]))
  return jnp.einsum("boy,byx,bpx->bop", ry, low_res.astype(jnp.float32), rx,
                    precision=jax.lax.Precision.HIGHEST)
