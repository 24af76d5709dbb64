"""Building blocks of the Stable-Diffusion UNet and VAE (diffusers' layers), Flax Linen, NHWC.

Activations by diffusers name, torch-equivalent GroupNorm / LayerNorm (two-pass variance), convs
with PyTorch's symmetric padding, diffusers' sinusoidal timestep embedding, `ResnetBlock2D`,
`Downsample2D`, `Upsample2D` and the GEGLU `FeedForward`. Parameter names mirror diffusers'
module names (see fssjax.nn.unet). Used by fssjax.nn.unet, fssjax.nn.unet_attention and
fssjax.nn.vae.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.ops import resize_nearest

Array = jax.Array
Dtype = Any

ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


def get_activation(name: str, field: str = "act_fn"):
  """Activation by diffusers name (silu/swish, mish, gelu (exact), relu)."""
  key = name.lower()
  if key not in ACTIVATIONS:
    raise ValueError(f"{field}={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[key]




def group_norm(groups: int, eps: float, dtype, param_dtype, name: str) -> nn.GroupNorm:
  """torch.nn.GroupNorm equivalent on NHWC / NTC (two-pass variance for parity)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      name=name)


def conv(features: int, kernel: int, dtype, param_dtype, name: Optional[str], stride: int = 1,
         padding: Any = None) -> nn.Conv:
  """Conv with PyTorch's symmetric padding (kernel-1)//2 unless `padding` is given."""
  if padding is None:
    p = (kernel - 1) // 2
    padding = ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> Array:
  """diffusers' `get_timestep_embedding`: [B] -> [B, dim] float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D: GN-act-conv, (+ time embedding), GN-act-conv, skip.

  x [B, H, W, C_in], temb [B, T] or None -> [B, H, W, out_channels].
  """

  out_channels: int
  groups: int = 32
  groups_out: Optional[int] = None
  eps: float = 1e-6
  act_fn: str = "silu"
  time_embedding_norm: str = "default"
  output_scale_factor: float = 1.0
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
    act = get_activation(self.act_fn)
    dt, pdt = self.dtype, self.param_dtype
    h = act(group_norm(self.groups, self.eps, dt, pdt, "norm1")(x))
    h = conv(self.out_channels, 3, dt, pdt, "conv1")(h)
    scale_shift = None
    if temb is not None:
      width = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
      t = nn.Dense(width, dtype=dt, param_dtype=pdt, name="time_emb_proj")(act(temb))
      t = t[:, None, None, :]
      if self.time_embedding_norm == "scale_shift":
        scale_shift = jnp.split(t, 2, axis=-1)
      else:
        h = h + t
    h = group_norm(self.groups_out or self.groups, self.eps, dt, pdt, "norm2")(h)
    if scale_shift is not None:
      scale, shift = scale_shift
      h = h * (1 + scale) + shift
    h = act(h)
    h = conv(self.out_channels, 3, dt, pdt, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, dt, pdt, "conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Strided 3x3 conv. padding=p pads symmetrically; padding=0 pads (0,1) bottom/right (VAE)."""

  out_channels: int
  padding: int = 1
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                padding=pad)(x)


class Upsample2D(nn.Module):
  """Nearest upsampling (x2, or to `size` with PyTorch's nearest rule) then a 3x3 conv."""

  out_channels: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: Optional[Tuple[int, int]] = None) -> Array:
    if size is None:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:
      x = resize_nearest(x, size)
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)


class FeedForward(nn.Module):
  """GEGLU feed-forward: net_0/proj (dim -> 2*inner), h * gelu(gate), net_2 (inner -> dim)."""

  dim: int
  mult: int = 4
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    inner = self.dim * self.mult
    h = _GegluProj(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class _GegluProj(nn.Module):
  inner: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(2 * self.inner, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)
