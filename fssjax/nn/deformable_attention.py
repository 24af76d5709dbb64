"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021) in pure JAX.

Two pieces, following transformers' Mask2Former code
(`transformers/models/mask2former/modeling_mask2former.py`: `multi_scale_deformable_attention`
and `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`, itself the PyTorch reference
of fundamentalvision/Deformable-DETR `ms_deform_attn_core_pytorch`):

  * `multi_scale_deformable_attention(value, spatial_shapes, sampling_locations,
    attention_weights)`: the sampling core. Each query, head, level and point reads the value
    map of its level at a fractional location by bilinear interpolation with PyTorch
    `grid_sample` semantics (`mode='bilinear', padding_mode='zeros', align_corners=False`:
    location (x, y) in [0, 1]^2 is pixel coordinate (x * W - 0.5, y * H - 0.5); each of the
    four neighbours outside the map contributes zero), and the samples are summed with the
    attention weights. Gathers only: no custom kernel, so it runs (and differentiates) on every
    backend; memory is O(B * heads * Q * levels * points * 4 * head_dim).
  * `MSDeformAttn`: the module around it with the HF parameter names `sampling_offsets`,
    `attention_weights`, `value_proj`, `output_proj` (nn.Dense; a PyTorch Linear weight [out, in]
    is the Flax kernel transposed), and Deformable DETR's initialisation (offsets' bias = one
    direction per head scaled by the point index, zero attention-weight projection, Xavier
    value / output projections), so a model trained from scratch starts as the paper's.

Multi-level inputs are NHWC feature maps [B, H_l, W_l, C] flattened level after level, row-major
(`flatten_levels`): `spatial_shapes` = ((H_0, W_0), ...) as static Python ints (they decide
array shapes under jit) and `level_start_index` = (0, H_0 W_0, H_0 W_0 + H_1 W_1, ...).
Reference points are (x, y) in [0, 1] per level (`reference_points`, the encoder's pixel
centres); offsets are in pixels of each level (divided by (W_l, H_l)), as in the paper.

Parity: tests/test_deformable_attention.py against fixtures made with transformers' PyTorch
code by scripts/make_mask2former_fixtures.py (float32, 1e-4).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Shapes = Tuple[Tuple[int, int], ...]


def _static_shapes(spatial_shapes) -> Shapes:
  try:
    shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2))
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError("spatial_shapes must be static (a tuple of (H, W) Python ints or a NumPy "
                    "array), not a traced array: the level sizes decide array shapes") from e
  if any(h < 1 or w < 1 for h, w in shapes):
    raise ValueError(f"spatial_shapes {shapes}: every level needs H, W >= 1")
  return shapes


def level_start_index(spatial_shapes) -> np.ndarray:
  """int64 [L]: the offset of each level in the flattened sequence (0, H0*W0, ...)."""
  shapes = _static_shapes(spatial_shapes)
  sizes = np.array([h * w for h, w in shapes], np.int64)
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def flatten_levels(features: Sequence[Array]) -> Tuple[Array, Shapes, np.ndarray]:
  """NHWC maps -> (flat [B, sum H_l W_l, C], spatial_shapes, level_start_index).

  Args:
    features: L arrays [B, H_l, W_l, C] (same B and C).

  Raises:
    ValueError: empty list, or batch / channel sizes that differ between levels.
  """
  if not features:
    raise ValueError("flatten_levels: no feature maps")
  b, c = features[0].shape[0], features[0].shape[-1]
  for i, f in enumerate(features):
    if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != c:
      raise ValueError(f"flatten_levels: level {i} has shape {tuple(f.shape)}; expected "
                       f"[B={b}, H, W, C={c}]")
  shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in features)
  flat = jnp.concatenate([f.reshape(b, -1, c) for f in features], axis=1)
  return flat, shapes, level_start_index(shapes)


def unflatten_levels(flat: Array, spatial_shapes) -> list[Array]:
  """Inverse of `flatten_levels`: [B, S, C] -> L arrays [B, H_l, W_l, C]."""
  shapes = _static_shapes(spatial_shapes)
  out, start = [], 0
  for h, w in shapes:
    out.append(flat[:, start:start + h * w].reshape(flat.shape[0], h, w, flat.shape[-1]))
    start += h * w
  return out


def reference_points(spatial_shapes, valid_ratios: Optional[Array] = None,
                     batch_size: int = 1, dtype=jnp.float32) -> Array:
  """Pixel-centre reference points of every level, for every level (the encoder's).

  transformers' `Mask2FormerPixelDecoderEncoderOnly.get_reference_points`: the centre
  ((j + 0.5) / (r_x W), (i + 0.5) / (r_y H)) of each pixel of each level, then multiplied by
  each level's valid ratio (r_x, r_y).

  Args:
    spatial_shapes: ((H_l, W_l), ...) static.
    valid_ratios: [B, L, 2] (x, y) fraction of each level that is not padding; None = all ones.
    batch_size: B when `valid_ratios` is None.

  Returns:
    [B, S, L, 2] (x, y) in [0, 1], S = sum H_l W_l.
  """
  shapes = _static_shapes(spatial_shapes)
  n_levels = len(shapes)
  if valid_ratios is None:
    valid_ratios = jnp.ones((batch_size, n_levels, 2), dtype)
  refs = []
  for lvl, (h, w) in enumerate(shapes):
    ry, rx = jnp.meshgrid(jnp.linspace(0.5, h - 0.5, h, dtype=dtype),
                          jnp.linspace(0.5, w - 0.5, w, dtype=dtype), indexing="ij")
    ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
    rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack([rx, ry], -1))
  ref = jnp.concatenate(refs, 1)
  return ref[:, :, None] * valid_ratios[:, None]


def multi_scale_deformable_attention(value: Array, spatial_shapes, sampling_locations: Array,
                                     attention_weights: Array) -> Array:
  """The sampling core of multi-scale deformable attention (bilinear, zero padding).

  Equivalent to transformers' `multi_scale_deformable_attention` (PyTorch `grid_sample` with
  `mode='bilinear', padding_mode='zeros', align_corners=False` per level, weighted sum over
  levels and points).

  Args:
    value: [B, S, N, D] values of all levels flattened (S = sum H_l W_l), N heads of D channels.
    spatial_shapes: ((H_l, W_l), ...) static (tuple of ints or NumPy array) for L levels.
    sampling_locations: [B, Q, N, L, P, 2] (x, y), 0..1 over each level (outside: zeros).
    attention_weights: [B, Q, N, L, P] (normally softmax-ed over L * P).

  Returns:
    [B, Q, N * D] in value's dtype (heads outer, channels inner, as the reference).

  Raises:
    ValueError: shapes that do not agree (S vs the spatial shapes, L, P, N).
  """
  shapes = _static_shapes(spatial_shapes)
  b, s, nh, dh = value.shape
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError(f"sampling_locations has shape {tuple(sampling_locations.shape)}; "
                     "expected [B, Q, heads, levels, points, 2]")
  _, q, nh2, nl, npt, _ = sampling_locations.shape
  if sum(h * w for h, w in shapes) != s:
    raise ValueError(f"value has {s} tokens but spatial_shapes {shapes} sum to "
                     f"{sum(h * w for h, w in shapes)}")
  if nl != len(shapes) or nh2 != nh:
    raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} has {nh2} heads and "
                     f"{nl} levels; value has {nh} heads and spatial_shapes {len(shapes)} levels")
  if tuple(attention_weights.shape) != (b, q, nh, nl, npt):
    raise ValueError(f"attention_weights has shape {tuple(attention_weights.shape)}; expected "
                     f"{(b, q, nh, nl, npt)}")
  dtype = value.dtype
  loc = sampling_locations.astype(jnp.float32)
  aw = attention_weights.astype(jnp.float32)
  out = jnp.zeros((b, nh, q, dh), jnp.float32)
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    v = value[:, start:start + h * w].transpose(0, 2, 1, 3).astype(jnp.float32)  # [B,N,HW,D]
    start += h * w
    # [B, Q, N, P] -> [B, N, Q, P]
    x = loc[:, :, :, lvl, :, 0].transpose(0, 2, 1, 3) * w - 0.5
    y = loc[:, :, :, lvl, :, 1].transpose(0, 2, 1, 3) * h - 0.5
    a = aw[:, :, :, lvl].transpose(0, 2, 1, 3)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    idx, wgt = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
      for dx, wx in ((0, 1.0 - fx), (1, fx)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        flat = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
        idx.append(flat)
        wgt.append(jnp.where(inside, wx * wy, 0.0) * a)
    idx = jnp.stack(idx, -1).reshape(b, nh, q * npt * 4)  # [B, N, Q*P*4]
    wgt = jnp.stack(wgt, -1).reshape(b, nh, q, npt * 4)
    g = jnp.take_along_axis(v, idx[..., None], axis=2).reshape(b, nh, q, npt * 4, dh)
    out = out + jnp.einsum("bnqk,bnqkd->bnqd", wgt, g, precision=jax.lax.Precision.HIGHEST)
  return out.transpose(0, 2, 1, 3).reshape(b, q, nh * dh).astype(dtype)


def point_sample(features: Array, points: Array) -> Array:
  """Bilinear samples of NHWC maps at normalised points (PyTorch `grid_sample` on `2 p - 1`,
  `align_corners=False`, zero padding): transformers' Mask2Former `sample_point`.

  Args:
    features: [R, H, W, C] (or [R, H, W]: one channel, squeezed back).
    points: [R, P, 2] (x, y) in [0, 1].

  Returns:
    [R, P, C] float32 ([R, P] for [R, H, W] input).
  """
  squeeze = features.ndim == 3
  f = features[..., None] if squeeze else features
  r, h, w, c = f.shape
  if points.ndim != 3 or points.shape[0] != r or points.shape[-1] != 2:
    raise ValueError(f"points has shape {tuple(points.shape)}; expected [R={r}, P, 2]")
  p = points.shape[1]
  f = f.reshape(r, h * w, c).astype(jnp.float32)
  x = points[..., 0].astype(jnp.float32) * w - 0.5
  y = points[..., 1].astype(jnp.float32) * h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  out = jnp.zeros((r, p, c), jnp.float32)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      flat = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
      g = jnp.take_along_axis(f, flat[..., None], axis=1)
      out = out + jnp.where(inside, wx * wy, 0.0)[..., None] * g
  return out[..., 0] if squeeze else out


def _sampling_offsets_bias(n_heads: int, n_levels: int, n_points: int):
  """Deformable DETR's initial offsets: head h points in direction 2*pi*h/N (scaled so the
  larger coordinate is 1), point p at distance p + 1; flattened [N * L * P * 2]."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * (np.arange(n_points, dtype=np.float32) + 1)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (HF `Mask2FormerPixelDecoderEncoderMultiscaleDeformable
  Attention` names and semantics).

  Attributes:
    embed_dim: model width C (divisible by num_heads).
    num_heads: heads N.
    n_levels: feature levels L.
    n_points: sampling points P per head and level.
    dtype: computation dtype of the projections (None: inputs'); sampling is float32.
    param_dtype: parameter dtype.
  """

  embed_dim: int = 256
  num_heads: int = 8
  n_levels: int = 3
  n_points: int = 4
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, reference_points: Array,
               spatial_shapes, *, position_embeddings: Optional[Array] = None,
               attention_mask: Optional[Array] = None,
               return_weights: bool = False):
    """Queries at `hidden_states` attend to `encoder_hidden_states` around reference points.

    Args:
      hidden_states: [B, Q, C] queries (the flattened maps themselves in the encoder).
      encoder_hidden_states: [B, S, C] the flattened multi-level maps (values).
      reference_points: [B, Q, L, 2] (x, y) in [0, 1] per level, or [B, Q, L, 4] boxes
        (cx, cy, w, h): offsets are then scaled by half the box size / P (Deformable DETR's
        two-stage form).
      spatial_shapes: ((H_l, W_l), ...) static, L levels, sum H_l W_l = S.
      position_embeddings: optional [B, Q, C] added to the queries (not to the values).
      attention_mask: optional bool [B, S], True = padding (the value there is zeroed), as HF.
      return_weights: also return the attention weights [B, Q, N, L, P].

    Returns:
      [B, Q, C] (and the weights when asked).

    Raises:
      ValueError: embed_dim not divisible by num_heads; shapes that disagree (hidden states
        not [B, Q, C], values not [B, S, C], reference points not [B, Q, L, 2 | 4], a mask
        not [B, S], spatial shapes not summing to S), each named with the expected shape.
    """
    c, nh, nl, npt = self.embed_dim, self.num_heads, self.n_levels, self.n_points
    if c % nh:
      raise ValueError(f"embed_dim={c} must be divisible by num_heads={nh}")
    shapes = _static_shapes(spatial_shapes)
    if len(shapes) != nl:
      raise ValueError(f"spatial_shapes has {len(shapes)} levels; the module has n_levels={nl}")
    dense = lambda n, name, k, bias: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=k, bias_init=bias,
        name=name)
    zeros = nn.initializers.zeros
    xavier = nn.initializers.xavier_uniform()
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != c:
      raise ValueError(f"MSDeformAttn: hidden_states has shape {tuple(hidden_states.shape)}; "
                       f"expected [B, Q, embed_dim={c}]")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != c
        or encoder_hidden_states.shape[0] != hidden_states.shape[0]):
      raise ValueError(f"MSDeformAttn: encoder_hidden_states has shape "
                       f"{tuple(encoder_hidden_states.shape)}; expected [B={hidden_states.shape[0]}"
                       f", S, embed_dim={c}]")
    if (reference_points.ndim != 4 or reference_points.shape[-1] not in (2, 4)
        or tuple(reference_points.shape[:3]) != (hidden_states.shape[0], hidden_states.shape[1],
                                                 nl)):
      raise ValueError(f"MSDeformAttn: reference_points has shape "
                       f"{tuple(reference_points.shape)}; expected [B={hidden_states.shape[0]}, "
                       f"Q={hidden_states.shape[1]}, L={nl}, 2] (x, y) or [..., 4] "
                       "(cx, cy, w, h)")
    if attention_mask is not None and (
        tuple(attention_mask.shape) != tuple(encoder_hidden_states.shape[:2])):
      raise ValueError(f"MSDeformAttn: attention_mask has shape {tuple(attention_mask.shape)}; "
                       f"expected [B, S] = {tuple(encoder_hidden_states.shape[:2])} "
                       "(True = padding)")
    q = hidden_states if position_embeddings is None else hidden_states + position_embeddings
    b, nq, _ = q.shape
    s = encoder_hidden_states.shape[1]
    value = dense(c, "value_proj", xavier, zeros)(encoder_hidden_states)
    if attention_mask is not None:
      value = jnp.where(attention_mask[..., None], 0.0, value).astype(value.dtype)
    value = value.reshape(b, s, nh, c // nh)
    offsets = dense(nh * nl * npt * 2, "sampling_offsets", zeros,
                    _sampling_offsets_bias(nh, nl, npt))(q).reshape(b, nq, nh, nl, npt, 2)
    weights = dense(nh * nl * npt, "attention_weights", zeros, zeros)(q)
    weights = jax.nn.softmax(weights.reshape(b, nq, nh, nl * npt).astype(jnp.float32), -1)
    weights = weights.reshape(b, nq, nh, nl, npt)
    ref = reference_points.astype(jnp.float32)
    offsets = offsets.astype(jnp.float32)
    if ref.shape[-1] == 2:
      norm = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)
      locations = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    elif ref.shape[-1] == 4:
      locations = (ref[:, :, None, :, None, :2]
                   + offsets / npt * ref[:, :, None, :, None, 2:] * 0.5)
    else:
      raise ValueError(f"reference_points has shape {tuple(reference_points.shape)}; the last "
                       "axis must be 2 (x, y) or 4 (cx, cy, w, h)")
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    out = dense(c, "output_proj", xavier, zeros)(out)
    if return_weights:
      return out, weights
    return out
