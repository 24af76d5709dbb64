"""Stable-Diffusion VAE (diffusers' `AutoencoderKL`) in Flax Linen, NHWC.

The layout comes from a diffusers `vae/config.json` dict (`VAEConfig.from_diffusers`).
Parameter paths mirror diffusers' (`encoder.down_blocks.0.resnets.1.conv1.weight` ->
`encoder/down_blocks_0/resnets_1/conv1/kernel`).

Methods (call with `vae.apply({'params': p}, x, method=vae.encode)` etc.):
  encode(x [B, H, W, in_channels]) -> (mean, logvar), each [B, H/f, W/f, latent_channels]
    with f = 2 ** (len(block_out_channels) - 1); logvar is clamped to [-30, 20] like diffusers'
    DiagonalGaussianDistribution.
  decode(z [B, h, w, latent_channels]) -> [B, h*f, w*f, out_channels].
  encode_latents(x, rng=None) -> the scaled latent the diffusion model sees:
    (mean, or mean + std * N(0, 1) with `rng`) minus shift_factor (if set), times
    scaling_factor (0.18215 for SD 1.x/2.x).
  decode_latents(z) -> decode(z / scaling_factor + shift_factor).
  __call__(x, rng=None) -> decode(posterior sample or mean): the reconstruction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.attention import dot_product_attention
from fssjax.nn.unet_blocks import (Downsample2D, ResnetBlock2D, Upsample2D, conv, get_activation,
                                   group_norm)

Array = jax.Array
Dtype = Any

_KNOWN = ("in_channels", "out_channels", "down_block_types", "up_block_types",
          "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
          "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
          "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
          "mid_block_add_attention")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL layout (diffusers field names and defaults)."""

  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = "silu"
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[Tuple[float, ...]] = None
  latents_std: Optional[Tuple[float, ...]] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any],
                     ignore_fields: Sequence[str] = ()) -> "VAEConfig":
    """Parses a diffusers `AutoencoderKL` config dict; ValueError names bad fields."""
    for key in config:
      if key.startswith("_") or key in ignore_fields:
        continue
      if key not in _KNOWN:
        raise ValueError(f"VAE config field {key!r} = {config[key]!r} is not a supported "
                         "AutoencoderKL field")
    channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
    n = len(channels)
    down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",) * n))
    up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",) * n))
    for field, types, allowed in (("down_block_types", down, "DownEncoderBlock2D"),
                                  ("up_block_types", up, "UpDecoderBlock2D")):
      if len(types) != n:
        raise ValueError(f"VAE config field {field!r} has {len(types)} entries; "
                         f"block_out_channels has {n}")
      for t in types:
        if t != allowed:
          raise ValueError(f"VAE config field {field!r} contains {t!r}; only {allowed!r} is "
                           "supported")
    layers = config.get("layers_per_block", 1)
    if not isinstance(layers, int):
      raise ValueError(f"VAE config field 'layers_per_block' = {layers!r}: expected an int")
    groups = config.get("norm_num_groups", 32)
    for c in channels:
      if c % groups:
        raise ValueError(f"VAE config: block_out_channels {channels} not divisible by "
                         f"norm_num_groups={groups}")
    act = config.get("act_fn", "silu")
    get_activation(act, "act_fn")
    as_tuple = lambda v: None if v is None else tuple(float(a) for a in v)  # noqa: E731
    sample_size = config.get("sample_size", 32)
    return cls(
        block_out_channels=channels,
        layers_per_block=layers,
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        latent_channels=int(config.get("latent_channels", 4)),
        norm_num_groups=int(groups),
        act_fn=act,
        sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=(None if config.get("shift_factor") is None
                      else float(config["shift_factor"])),
        latents_mean=as_tuple(config.get("latents_mean")),
        latents_std=as_tuple(config.get("latents_std")),
        force_upcast=bool(config.get("force_upcast", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
    )


class VAEAttention(nn.Module):
  """The VAE mid-block attention: GN, single-head attention over pixels, residual.

  x [B, H, W, C] -> [B, H, W, C]. Parameters: group_norm, to_q, to_k, to_v, to_out.
  """

  groups: int
  eps: float = 1e-6
  head_dim: Optional[int] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    head_dim = self.head_dim or c
    heads = c // head_dim
    dense = lambda feats, name: nn.Dense(feats, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
    t = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "group_norm")(x)
    t = t.reshape(b, h * w, c)
    split = lambda a: a.reshape(b, h * w, heads, head_dim)  # noqa: E731
    q = split(dense(heads * head_dim, "to_q")(t))
    k = split(dense(heads * head_dim, "to_k")(t))
    v = split(dense(heads * head_dim, "to_v")(t))
    y = dot_product_attention(q, k, v, upcast=True).reshape(b, h * w, heads * head_dim)
    y = dense(c, "to_out")(y).reshape(b, h, w, c)
    return y + x


class _MidBlock(nn.Module):
  """resnets_0, attentions_0 (optional), resnets_1 (no time embedding)."""

  channels: int
  groups: int
  act_fn: str
  add_attention: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    res = lambda name: ResnetBlock2D(self.channels, groups=self.groups, eps=1e-6,  # noqa: E731
                                     act_fn=self.act_fn, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = res("resnets_0")(x)
    if self.add_attention:
      x = VAEAttention(self.groups, 1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="attentions_0")(x)
    return res("resnets_1")(x)


class _ResnetStack(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down/up sampler."""

  out_channels: int
  num_layers: int
  groups: int
  act_fn: str
  sampler: Optional[str] = None  # 'down', 'up' or None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{j}")(x)
    if self.sampler == "down":
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="downsamplers_0")(x)
    elif self.sampler == "up":
      x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """x [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean ++ logvar)."""

  config: VAEConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    ch = cfg.block_out_channels
    x = conv(ch[0], 3, dt, pdt, "conv_in")(x)
    for i, c in enumerate(ch):
      x = _ResnetStack(c, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                       sampler="down" if i < len(ch) - 1 else None, dtype=dt, param_dtype=pdt,
                       name=f"down_blocks_{i}")(x)
    x = _MidBlock(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                  dtype=dt, param_dtype=pdt, name="mid_block")(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, dt, pdt, "conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, 3, dt, pdt, "conv_out")(x)


class Decoder(nn.Module):
  """z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""

  config: VAEConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    ch = cfg.block_out_channels
    x = conv(ch[-1], 3, dt, pdt, "conv_in")(z)
    x = _MidBlock(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                  dtype=dt, param_dtype=pdt, name="mid_block")(x)
    for i, c in enumerate(reversed(ch)):
      x = _ResnetStack(c, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                       sampler="up" if i < len(ch) - 1 else None, dtype=dt, param_dtype=pdt,
                       name=f"up_blocks_{i}")(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, dt, pdt, "conv_norm_out")(x))
    return conv(cfg.out_channels, 3, dt, pdt, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """Stable-Diffusion VAE. See the module docstring for the methods."""

  config: VAEConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    self.encoder = Encoder(cfg, dtype=dt, param_dtype=pdt)
    self.decoder = Decoder(cfg, dtype=dt, param_dtype=pdt)
    lc = cfg.latent_channels
    self.quant_conv = conv(2 * lc, 1, dt, pdt, None) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(lc, 1, dt, pdt, None) if cfg.use_post_quant_conv else None

  def encode(self, x: Array) -> Tuple[Array, Array]:
    """x [B, H, W, C] -> (mean, logvar) [B, H/f, W/f, latent_channels], logvar in [-30, 20]."""
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f"VAE input has shape {tuple(x.shape)}; expected "
                       f"[B, H, W, {self.config.in_channels}]")
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"VAE latent has shape {tuple(z.shape)}; expected "
                       f"[B, h, w, {self.config.latent_channels}]")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def encode_latents(self, x: Array, rng: Optional[jax.Array] = None) -> Array:
    """Scaled latent: ((mean or posterior sample) - shift_factor) * scaling_factor."""
    mean, logvar = self.encode(x)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    if self.config.shift_factor is not None:
      z = z - self.config.shift_factor
    return z * self.config.scaling_factor

  def decode_latents(self, z: Array) -> Array:
    """Inverse of `encode_latents`: decode(z / scaling_factor + shift_factor)."""
    z = z / self.config.scaling_factor
    if self.config.shift_factor is not None:
      z = z + self.config.shift_factor
    return self.decode(z)

  def __call__(self, x: Array, rng: Optional[jax.Array] = None) -> Array:
    """Reconstruction: decode(posterior sample with `rng`, else the posterior mean)."""
    mean, logvar = self.encode(x)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z)
