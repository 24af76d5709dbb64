"""Stable-Diffusion UNet (diffusers' `UNet2DConditionModel`) in Flax Linen, NHWC.

The layout comes from a diffusers `unet/config.json` dict, parsed by `UNetConfig.from_diffusers`
(unsupported values raise ValueError naming the field). Parameter paths mirror diffusers'
module paths (`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`),
so `fssjax.weights.diffusers` converts checkpoints by renaming and transposing.

Call:
  out = unet.apply({'params': p}, sample, timesteps, encoder_hidden_states)
    sample [B, H, W, C_in], timesteps [B] or scalar, encoder_hidden_states [B, T, D]
    -> [B, H, W, C_out] in the compute dtype.

DiffewS K/V bank. `return_kv=True` returns `(out, kv)` where `kv` is a dict from the diffusers
path of every self-attention (`attn1`) of every transformer block, e.g.
`'down_blocks.0.attentions.0.transformer_blocks.0.attn1'`, to its own `(k, v)`, each
[B, H*W, heads*head_dim] (the `to_k`/`to_v` outputs before the head split). `kv_bank=` takes a
dict with exactly the same keys (see `kv_bank_keys(config)`); each attn1 then attends to
`concat([own, bank])` keys/values. With K supports per query, run the support pass on the
[B*K] batch (supports of query b at rows b*K .. b*K+K-1) and merge with
`merge_support_bank(kv, K)` -> [B, K*H*W, C] per entry. Transformer blocks built with
`only_cross_attention` have no self-attention and no bank entry (as in DiffewS).

conv_in hook. DiffewS feeds the support branch through its own 8-channel input conv. Pass
`conv_in_override=features` ([B, H, W, block_out_channels[0]], already embedded) to skip the
UNet's own `conv_in` (and `center_input_sample`); `sample` is then ignored and may be None.

Options: `dtype` (compute dtype, e.g. bf16; params stay `param_dtype`), `remat` (rematerialise
every resnet and transformer block on the backward pass), `attention_implementation`
(`jax.nn.dot_product_attention`'s `implementation`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.attention import KV, MultiHeadAttention
from fssjax.nn.ops import resize_nearest

Array = jax.Array
Dtype = Any
KVDict = Dict[str, KV]

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


# ----------------------------------------------------------------------------------------------
# Config.

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# Fields that must keep diffusers' default value (the feature is not implemented here).
_MUST_BE_DEFAULT = {
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
# Fields diffusers accepts that have no effect on the supported block types (they only reach
# Simple*/ResnetDownsample* blocks or the additional-embedding heads).
_NO_EFFECT = ("resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
              "cross_attention_norm", "addition_embed_type_num_heads")
_HANDLED = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
            "freq_shift", "down_block_types", "mid_block_type", "up_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
            "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "attention_head_dim", "num_attention_heads", "use_linear_projection",
            "upcast_attention", "resnet_time_scale_shift", "time_embedding_dim",
            "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel", "conv_out_kernel")


def _per_block(field: str, value: Any, n: int, kind: type) -> tuple:
  """Expands an int/bool/float to n copies, or checks a list has n entries of `kind`."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config field {field!r} = {list(value)} has {len(value)} entries; "
                       f"expected one per down block ({n})")
    items = tuple(value)
  else:
    items = (value,) * n
  for item in items:
    if isinstance(item, (list, tuple)):
      raise ValueError(f"UNet config field {field!r} = {value!r}: nested lists "
                       "(asymmetric UNets) are not supported")
    if kind is bool:
      if not isinstance(item, bool):
        raise ValueError(f"UNet config field {field!r} = {value!r}: expected booleans")
    elif not isinstance(item, (int, float)) or isinstance(item, bool):
      raise ValueError(f"UNet config field {field!r} = {value!r}: expected numbers")
    elif kind is int and int(item) != item:
      raise ValueError(f"UNet config field {field!r} = {value!r}: expected integers")
  return tuple(kind(i) for i in items)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Resolved UNet layout (per-down-block tuples; the up path uses them reversed).

  `num_heads` is the resolved number of attention heads per down block: diffusers'
  `num_attention_heads` when set, else `attention_head_dim` (diffusers' naming quirk: in
  `UNet2DConditionModel` configs `attention_head_dim` is the number of heads; head width =
  channels // heads, e.g. SD 2.1's [5, 10, 20, 20] gives 64-wide heads).
  """

  block_out_channels: Tuple[int, ...]
  down_block_types: Tuple[str, ...]
  up_block_types: Tuple[str, ...]
  layers_per_block: Tuple[int, ...]
  transformer_layers_per_block: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  cross_attention_dim: Tuple[int, ...]
  only_cross_attention: Tuple[bool, ...]
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  in_channels: int = 4
  out_channels: int = 4
  sample_size: Any = None
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None
  time_embedding_act_fn: Optional[str] = None
  timestep_post_act: Optional[str] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any],
                     ignore_fields: Sequence[str] = ()) -> "UNetConfig":
    """Parses a diffusers `UNet2DConditionModel` config dict.

    Args:
      config: the dict of `unet/config.json`.
      ignore_fields: extra field names to skip (for example DiffewS's `in_channels_ref`).
        Fields starting with '_' (`_class_name`, `_diffusers_version`) are always skipped.

    Raises:
      ValueError: naming the field and value for anything unknown or unsupported.
    """
    known = set(_HANDLED) | set(_MUST_BE_DEFAULT) | set(_NO_EFFECT)
    for key in config:
      if key.startswith("_") or key in ignore_fields:
        continue
      if key not in known:
        raise ValueError(f"UNet config field {key!r} = {config[key]!r} is not a supported "
                         "UNet2DConditionModel field")
    for key, default in _MUST_BE_DEFAULT.items():
      if key in config and config[key] != default:
        raise ValueError(f"UNet config field {key!r} = {config[key]!r} is not supported "
                         f"(only {default!r})")
    get = lambda k, d: config.get(k, d)  # noqa: E731

    down = tuple(get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = tuple(get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    for field, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                                  ("up_block_types", up, UP_BLOCKS)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"UNet config field {field!r} contains {t!r}; supported: {allowed}")
    mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
      raise ValueError(f"UNet config field 'mid_block_type' = {mid!r} is not supported; "
                       f"supported: {MID_BLOCKS}")
    channels = tuple(int(c) for c in get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(down)
    if len(up) != n or len(channels) != n:
      raise ValueError(f"UNet config: down_block_types ({n}), up_block_types ({len(up)}) and "
                       f"block_out_channels ({len(channels)}) must have the same length")
    heads_src = get("num_attention_heads", None)
    heads_field = "num_attention_heads"
    if heads_src is None:
      heads_src, heads_field = get("attention_head_dim", 8), "attention_head_dim"
    heads = _per_block(heads_field, heads_src, n, int)
    if get("attention_head_dim", 8) is not None:
      _per_block("attention_head_dim", get("attention_head_dim", 8), n, int)
    norm_groups = get("norm_num_groups", 32)
    if norm_groups is None:
      raise ValueError("UNet config field 'norm_num_groups' = None is not supported")
    for c in channels:
      if c % norm_groups:
        raise ValueError(f"UNet config: block_out_channels {channels} not divisible by "
                         f"norm_num_groups={norm_groups}")
    shift = get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
      raise ValueError(f"UNet config field 'resnet_time_scale_shift' = {shift!r} is not "
                       "supported; expected 'default' or 'scale_shift'")
    act = get("act_fn", "silu")
    get_activation(act, "act_fn")
    for field in ("time_embedding_act_fn", "timestep_post_act"):
      if get(field, None) is not None:
        get_activation(get(field, None), field)
    for field in ("conv_in_kernel", "conv_out_kernel"):
      k = get(field, 3)
      if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"UNet config field {field!r} = {k!r}: expected an odd positive int")
    only_cross = _per_block("only_cross_attention", get("only_cross_attention", False), n, bool)
    cross_dims = _per_block("cross_attention_dim", get("cross_attention_dim", 1280), n, int)
    if len(set(cross_dims)) != 1:
      raise ValueError(f"UNet config field 'cross_attention_dim' = {list(cross_dims)}: per-block "
                       "values must be equal (one encoder_hidden_states feeds every block)")
    return cls(
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=_per_block("layers_per_block", get("layers_per_block", 2), n, int),
        transformer_layers_per_block=_per_block(
            "transformer_layers_per_block", get("transformer_layers_per_block", 1), n, int),
        num_heads=heads,
        cross_attention_dim=cross_dims,
        only_cross_attention=only_cross,
        mid_block_type=mid,
        in_channels=int(get("in_channels", 4)),
        out_channels=int(get("out_channels", 4)),
        sample_size=(tuple(get("sample_size", None)) if isinstance(get("sample_size", None), list)
                     else get("sample_size", None)),
        center_input_sample=bool(get("center_input_sample", False)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)),
        downsample_padding=int(get("downsample_padding", 1)),
        mid_block_scale_factor=float(get("mid_block_scale_factor", 1.0)),
        act_fn=act,
        norm_num_groups=int(norm_groups),
        norm_eps=float(get("norm_eps", 1e-5)),
        use_linear_projection=bool(get("use_linear_projection", False)),
        upcast_attention=bool(get("upcast_attention", False)),
        resnet_time_scale_shift=shift,
        time_embedding_dim=get("time_embedding_dim", None),
        time_embedding_act_fn=get("time_embedding_act_fn", None),
        timestep_post_act=get("timestep_post_act", None),
        conv_in_kernel=int(get("conv_in_kernel", 3)),
        conv_out_kernel=int(get("conv_out_kernel", 3)),
    )


# ----------------------------------------------------------------------------------------------
# Building blocks (shared with the VAE).


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


class BasicTransformerBlock(nn.Module):
  """LN-self-attn, LN-cross-attn, LN-GEGLU, each residual. x [B, N, D], context [B, T, Dc].

  With `only_cross_attention`, attn1 attends to the context too (no self-attention, no bank).
  Returns (x, own (k, v) of attn1 or None).
  """

  dim: int
  num_heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast: bool = False
  norm_eps: float = 1e-5
  collect_kv: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, kv_bank: Optional[KV] = None):
    dt, pdt = self.dtype, self.param_dtype
    attn = lambda name: MultiHeadAttention(  # noqa: E731
        self.num_heads, self.head_dim, self.dim, qkv_bias=False, out_bias=True,
        upcast=self.upcast, implementation=self.implementation, dtype=dt, param_dtype=pdt,
        name=name)
    h = layer_norm(self.norm_eps, dt, pdt, "norm1")(x)
    kv = None
    if self.only_cross_attention:
      if kv_bank is not None:
        raise ValueError("a K/V bank was given to a block with only_cross_attention")
      h = attn("attn1")(h, context)
    elif self.collect_kv:
      h, kv = attn("attn1")(h, kv_bank=kv_bank, return_kv=True)
    else:
      h = attn("attn1")(h, kv_bank=kv_bank)
    x = x + h
    h = layer_norm(self.norm_eps, dt, pdt, "norm2")(x)
    x = x + attn("attn2")(h, context)
    h = layer_norm(self.norm_eps, dt, pdt, "norm3")(x)
    x = x + FeedForward(self.dim, dtype=dt, param_dtype=pdt, name="ff")(h)
    return x, kv


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel (continuous input): GN, proj_in, blocks, proj_out, residual.

  x [B, H, W, C], context [B, T, Dc]; kv_bank: tuple of per-block (k, v) or None.
  Returns (x, tuple of per-block (k, v) or None).
  """

  num_heads: int
  head_dim: int
  num_layers: int = 1
  norm_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  collect_kv: bool = False
  remat: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, kv_bank: Optional[Tuple[KV, ...]] = None):
    dt, pdt = self.dtype, self.param_dtype
    b, hh, ww, c = x.shape
    inner = self.num_heads * self.head_dim
    residual = x
    h = group_norm(self.norm_groups, 1e-6, dt, pdt, "norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=dt, param_dtype=pdt, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = conv(inner, 1, dt, pdt, "proj_in")(h).reshape(b, hh * ww, inner)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    kvs = []
    for i in range(self.num_layers):
      h, kv = block_cls(inner, self.num_heads, self.head_dim,
                        only_cross_attention=self.only_cross_attention, upcast=self.upcast,
                        collect_kv=self.collect_kv, implementation=self.implementation,
                        dtype=dt, param_dtype=pdt, name=f"transformer_blocks_{i}")(
                            h, context, None if kv_bank is None else kv_bank[i])
      kvs.append(kv)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=dt, param_dtype=pdt, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = conv(c, 1, dt, pdt, "proj_out")(h.reshape(b, hh, ww, inner))
    return h + residual, (tuple(kvs) if self.collect_kv else None)


# ----------------------------------------------------------------------------------------------
# The UNet.


def _transformer_specs(config: UNetConfig):
  """Yields (block_path, n_attentions, n_layers, only_cross) for every cross-attn block."""
  n = len(config.block_out_channels)
  for i, t in enumerate(config.down_block_types):
    if t == "CrossAttnDownBlock2D":
      yield (f"down_blocks.{i}", config.layers_per_block[i],
             config.transformer_layers_per_block[i], config.only_cross_attention[i])
  if config.mid_block_type == "UNetMidBlock2DCrossAttn":
    yield ("mid_block", 1, config.transformer_layers_per_block[-1], False)
  for i, t in enumerate(config.up_block_types):
    r = n - 1 - i
    if t == "CrossAttnUpBlock2D":
      yield (f"up_blocks.{i}", config.layers_per_block[r] + 1,
             config.transformer_layers_per_block[r], config.only_cross_attention[r])


def kv_bank_keys(config: UNetConfig) -> Tuple[str, ...]:
  """The diffusers paths of every attn1 that records / takes a K/V bank, in forward order."""
  keys = []
  for path, n_attn, n_layers, only_cross in _transformer_specs(config):
    if only_cross:
      continue
    for j in range(n_attn):
      for l in range(n_layers):
        keys.append(f"{path}.attentions.{j}.transformer_blocks.{l}.attn1")
  return tuple(keys)


def merge_support_bank(kv: Mapping[str, KV], num_shots: int) -> KVDict:
  """[B*K, S, C] support K/V (supports of query b at rows b*K..b*K+K-1) -> [B, K*S, C]."""
  out = {}
  for key, (k, v) in kv.items():
    if k.shape[0] % num_shots:
      raise ValueError(f"K/V bank entry {key!r} has batch {k.shape[0]}, not a multiple of "
                       f"num_shots={num_shots}")
    out[key] = tuple(a.reshape(a.shape[0] // num_shots, num_shots * a.shape[1], a.shape[2])
                     for a in (k, v))
  return out


class _TimestepEmbedding(nn.Module):
  """linear_1 -> act -> linear_2 (-> post act): [B, C0] -> [B, features]."""

  features: int
  act_fn: str = "silu"
  post_act_fn: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="linear_1")(x)
    x = get_activation(self.act_fn)(x)
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="linear_2")(x)
    if self.post_act_fn is not None:
      x = get_activation(self.post_act_fn, "timestep_post_act")(x)
    return x


class _UNetBlock(nn.Module):
  """One down / mid / up block of the UNet (diffusers' CrossAttn*/Down*/Up*/Mid* blocks).

  kind: 'down', 'mid' or 'up'; index: position in down_blocks / up_blocks. Banks and recorded
  K/V are tuples over the block's attentions of tuples over their transformer blocks.
  """

  config: UNetConfig
  kind: str
  index: int = 0
  collect_kv: bool = False
  remat: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def _resnet(self, out_ch: int, name: str, scale: float = 1.0):
    cfg = self.config
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(out_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
               time_embedding_norm=cfg.resnet_time_scale_shift, output_scale_factor=scale,
               dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _transformer(self, channels: int, heads: int, n_layers: int, only_cross: bool,
                   name: str) -> Transformer2D:
    cfg = self.config
    return Transformer2D(heads, channels // heads, num_layers=n_layers,
                         norm_groups=cfg.norm_num_groups,
                         use_linear_projection=cfg.use_linear_projection,
                         only_cross_attention=only_cross, upcast=cfg.upcast_attention,
                         collect_kv=self.collect_kv and not only_cross, remat=self.remat,
                         implementation=self.implementation, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, emb: Array, context: Array, skips: Tuple[Array, ...] = (),
               bank: Optional[tuple] = None, upsample_size: Optional[Tuple[int, int]] = None):
    """Returns (x, new skip tensors (down), recorded K/V tuple or None)."""
    cfg = self.config
    n = len(cfg.block_out_channels)
    kvs = []
    outputs = []
    if self.kind == "mid":
      # UNetMidBlock2DCrossAttn: resnet, transformer, resnet. UNetMidBlock2D: diffusers builds
      # it with num_layers=0 in UNet2DConditionModel, i.e. a single resnet.
      ch = cfg.block_out_channels[-1]
      x = self._resnet(ch, "resnets_0", cfg.mid_block_scale_factor)(x, emb)
      if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        x, kv = self._transformer(ch, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1],
                                  False, "attentions_0")(
                                      x, context, None if bank is None else bank[0])
        kvs.append(kv)
        x = self._resnet(ch, "resnets_1", cfg.mid_block_scale_factor)(x, emb)
      return x, (), (tuple(kvs) if self.collect_kv and kvs else None)

    i = self.index
    r = i if self.kind == "down" else n - 1 - i
    out_ch = cfg.block_out_channels[r]
    block_type = (cfg.down_block_types if self.kind == "down" else cfg.up_block_types)[i]
    has_attn = block_type.startswith("CrossAttn")
    only_cross = cfg.only_cross_attention[r]
    n_layers = cfg.layers_per_block[r] + (1 if self.kind == "up" else 0)
    skips = list(skips)
    for j in range(n_layers):
      if self.kind == "up":
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._resnet(out_ch, f"resnets_{j}")(x, emb)
      if has_attn:
        x, kv = self._transformer(out_ch, cfg.num_heads[r], cfg.transformer_layers_per_block[r],
                                  only_cross, f"attentions_{j}")(
                                      x, context, None if bank is None else bank[j])
        kvs.append(kv)
      outputs.append(x)
    if i < n - 1:
      if self.kind == "down":
        x = Downsample2D(out_ch, cfg.downsample_padding, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="downsamplers_0")(x)
        outputs.append(x)
      else:
        x = Upsample2D(out_ch, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="upsamplers_0")(x, upsample_size)
    recorded = tuple(kvs) if (self.collect_kv and has_attn and not only_cross) else None
    return x, (tuple(outputs) if self.kind == "down" else ()), recorded


class UNet2DConditionModel(nn.Module):
  """Stable-Diffusion UNet. See the module docstring for the call and the K/V bank."""

  config: UNetConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, sample: Optional[Array], timesteps: Any, encoder_hidden_states: Array, *,
               kv_bank: Optional[Mapping[str, KV]] = None, return_kv: bool = False,
               conv_in_override: Optional[Array] = None):
    """Runs the UNet.

    Args:
      sample: [B, H, W, in_channels] (ignored when `conv_in_override` is given).
      timesteps: [B] or scalar (int or float).
      encoder_hidden_states: [B, T, cross_attention_dim].
      kv_bank: optional dict {attn1 path: (k [B, S_extra, C], v [B, S_extra, C])} with
        exactly the keys of `kv_bank_keys(config)`.
      return_kv: also return the dict of every attn1's own (k, v), each [B, H_l*W_l, C_l].
      conv_in_override: optional [B, H, W, block_out_channels[0]] features used instead of
        `conv_in(sample)`.

    Returns:
      [B, H, W, out_channels] in the compute dtype, or (that, kv dict) when `return_kv`.
    """
    cfg = self.config
    dt, pdt = self.dtype, self.param_dtype
    ch0 = cfg.block_out_channels[0]
    bank_keys = kv_bank_keys(cfg)
    if kv_bank is not None and set(kv_bank) != set(bank_keys):
      missing = sorted(set(bank_keys) - set(kv_bank))
      extra = sorted(set(kv_bank) - set(bank_keys))
      raise ValueError(f"kv_bank keys do not match the UNet's self-attentions: missing "
                       f"{missing}, unexpected {extra}")

    # Input.
    if conv_in_override is not None:
      x = conv_in_override if dt is None else conv_in_override.astype(dt)
      if x.ndim != 4 or x.shape[-1] != ch0:
        raise ValueError(f"conv_in_override has shape {tuple(x.shape)}; expected "
                         f"[B, H, W, {ch0}]")
    else:
      if sample is None or sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        shape = None if sample is None else tuple(sample.shape)
        raise ValueError(f"sample has shape {shape}; expected [B, H, W, {cfg.in_channels}]")
      if cfg.center_input_sample:
        sample = 2 * sample - 1.0
      x = conv(ch0, cfg.conv_in_kernel, dt, pdt, "conv_in")(sample)
    batch = x.shape[0]
    d = cfg.cross_attention_dim[0]
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch
        or encoder_hidden_states.shape[2] != d):
      raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; "
                       f"expected [B={batch}, T, {d}]")

    # Time embedding.
    t = jnp.asarray(timesteps)
    if t.size not in (1, batch):
      raise ValueError(f"timesteps has shape {tuple(t.shape)}; expected a scalar or [{batch}]")
    t = jnp.broadcast_to(t.reshape(-1), (batch,)) if t.size == 1 else t.reshape(batch)
    t_emb = timestep_embedding(t, ch0, cfg.flip_sin_to_cos, cfg.freq_shift)
    if dt is not None:
      t_emb = t_emb.astype(dt)
    emb = _TimestepEmbedding(cfg.time_embedding_dim or 4 * ch0, cfg.act_fn, cfg.timestep_post_act,
                             dtype=dt, param_dtype=pdt, name="time_embedding")(t_emb)
    if cfg.time_embedding_act_fn is not None:
      emb = get_activation(cfg.time_embedding_act_fn, "time_embedding_act_fn")(emb)

    collected: KVDict = {}
    block = lambda kind, i, name: _UNetBlock(  # noqa: E731
        cfg, kind, i, collect_kv=return_kv, remat=self.remat,
        implementation=self.attention_implementation, dtype=dt, param_dtype=pdt, name=name)

    def block_bank(path: str, n_attn: int, n_layers: int, only_cross: bool):
      if kv_bank is None or only_cross:
        return None
      return tuple(tuple(kv_bank[f"{path}.attentions.{j}.transformer_blocks.{l}.attn1"]
                         for l in range(n_layers)) for j in range(n_attn))

    def record(path: str, recorded):
      if recorded is None:
        return
      for j, per_attn in enumerate(recorded):
        for l, kv in enumerate(per_attn):
          collected[f"{path}.attentions.{j}.transformer_blocks.{l}.attn1"] = kv

    specs = {path: (a, l, o) for path, a, l, o in _transformer_specs(cfg)}
    n_blocks = len(cfg.block_out_channels)

    skips = [x]
    for i in range(n_blocks):
      path = f"down_blocks.{i}"
      bank = block_bank(path, *specs[path]) if path in specs else None
      x, outs, rec = block("down", i, f"down_blocks_{i}")(x, emb, encoder_hidden_states,
                                                          bank=bank)
      skips.extend(outs)
      record(path, rec)

    if cfg.mid_block_type is not None:
      bank = block_bank("mid_block", *specs["mid_block"]) if "mid_block" in specs else None
      x, _, rec = block("mid", 0, "mid_block")(x, emb, encoder_hidden_states, bank=bank)
      record("mid_block", rec)

    for i in range(n_blocks):
      path = f"up_blocks.{i}"
      n_res = cfg.layers_per_block[n_blocks - 1 - i] + 1
      res, skips = skips[-n_res:], skips[:-n_res]
      size = tuple(skips[-1].shape[1:3]) if i < n_blocks - 1 else None
      bank = block_bank(path, *specs[path]) if path in specs else None
      x, _, rec = block("up", i, f"up_blocks_{i}")(x, emb, encoder_hidden_states,
                                                   skips=tuple(res), bank=bank,
                                                   upsample_size=size)
      record(path, rec)

    act = get_activation(cfg.act_fn)
    x = act(group_norm(cfg.norm_num_groups, cfg.norm_eps, dt, pdt, "conv_norm_out")(x))
    x = conv(cfg.out_channels, cfg.conv_out_kernel, dt, pdt, "conv_out")(x)
    if return_kv:
      return x, {k: collected[k] for k in bank_keys}
    return x
