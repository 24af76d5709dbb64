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

Modules: the layout is parsed in fssjax.nn.unet_config, the layers live in
fssjax.nn.unet_blocks (resnets, up/down-sampling, feed-forward) and fssjax.nn.unet_attention
(transformer blocks with the K/V bank); this module assembles the UNet and re-exports their
public names.

Options: `dtype` (compute dtype, e.g. bf16; params stay `param_dtype`), `remat` (rematerialise
every resnet and transformer block on the backward pass), `attention_implementation`
(`jax.nn.dot_product_attention`'s `implementation`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.attention import KV
# Re-exported: the public names stay importable from fssjax.nn.unet.
from fssjax.nn.unet_attention import BasicTransformerBlock, Transformer2D  # noqa: F401
from fssjax.nn.unet_blocks import (ACTIVATIONS, Downsample2D, FeedForward,  # noqa: F401
                                   ResnetBlock2D, Upsample2D, conv, get_activation, group_norm,
                                   layer_norm, timestep_embedding)
from fssjax.nn.unet_config import (DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS,  # noqa: F401
                                   UNetConfig)

Array = jax.Array
Dtype = Any
KVDict = Dict[str, KV]


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
