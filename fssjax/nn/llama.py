"""LLaMA-family decoder (transformers' `LlamaForCausalLM`) in Flax Linen, with a KV cache.

Follows Hugging Face transformers `models/llama/modeling_llama.py` (and the rotary frequency
rules of `modeling_rope_utils.py`): pre-norm decoder layers

  h = x + o_proj(attention(RoPE(q_proj(RMSNorm(x))), RoPE(k_proj(.)), v_proj(.)))
  y = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))

with grouped-query attention (`num_key_value_heads` <= `num_attention_heads`, computed by
`jax.nn.dot_product_attention`, which takes K/V with fewer heads), a final RMSNorm and an
`lm_head` (or the transposed token embedding when `tie_word_embeddings`, as in SmolLM2).
Rotary embeddings use transformers' "rotate_half" layout (the two halves of each head are
the real and imaginary parts), `rope_theta`, and the `default`, `linear` and `llama3` scaling
rules.

Call:
  out = LlamaForCausalLM(cfg).apply({'params': p}, input_ids [B, T] int32,
                                    attention_mask=None, positions=None, cache=None)
  out['logits'] [B, T, vocab] float32, out['hidden'] [B, T, hidden] (after the final norm),
  out['cache'] (the updated cache, or None).
`inputs_embeds` [B, T, hidden] replaces `input_ids` (visual tokens spliced into the sequence);
`model.apply({'params': p}, ids, method=model.embed)` gives the token embeddings to splice
into, and `method=model.head` the logits of hidden states. `logits=False` skips the head.

Masks and positions. `attention_mask` [B, T] (1 token, 0 padding) hides padded keys; queries
always attend causally. `positions` [B, T] int32 default to `cache.index + arange(T)` (like a
transformers forward without `position_ids`); for left-padded batches pass
`cumsum(mask) - 1`, as transformers' `generate` does.

KV cache (`init_cache(cfg, batch, max_length)`): a dict of
  k, v   [layers, B, max_length, kv_heads, head_dim] in the compute dtype,
  mask   [B, max_length] bool (slot holds a real, non-padding token),
  index  int32 scalar (the next slot to write; the same for every row).
A call with `cache` writes its T tokens at slots [index, index + T) and attends over every
filled slot up to its own. Prefill and decode are the same call, so they run under `jax.jit`
and `jax.lax.while_loop` with fixed shapes (see `generate`).

Parameter paths mirror transformers' (`model.layers.0.self_attn.q_proj.weight` ->
`model/layers_0/self_attn/q_proj/kernel`, `model.embed_tokens.weight` ->
`model/embed_tokens/embedding`, `lm_head.weight` -> `lm_head/kernel`), so checkpoint loading
(`fssjax.weights.llama`) is a renaming. `partition_specs` shards them over an `fsdp` mesh axis.

Precision: `dtype=jnp.bfloat16` computes in bf16 while parameters stay `param_dtype`
(float32); RMSNorm statistics, rotary angles and the returned logits are float32.
`remat=True` rematerialises each decoder layer (`nn.remat`) in the backward pass.
`scan_layers=True` runs one layer body under `nn.scan` (compiles once instead of once per
layer; parameters stacked as `model/layers/...` [layers, ...]: `stack_layers` converts).

LoRA (Hu et al. 2021, PEFT's layout; `fssjax.nn.lora`): `config.lora_rank > 0` wraps the
dense layers named in `config.lora_targets` (default q_proj, v_proj) in `LoRADense`, adding
`<proj>/lora_A/kernel` [in, r] and `<proj>/lora_B/kernel` [r, out] next to the frozen kernel
(scale lora_alpha / r; dropout `lora_dropout` on the LoRA input when the module has
`deterministic=False` and `apply` gets a 'dropout' rng). With `lora_rank=0` (the default) the
parameters and outputs are exactly those of the plain decoder. `add_lora_params` (in
`fssjax.nn.lora`) adds fresh factors to a loaded tree; `fssjax.weights.lora` loads PEFT
adapters. `resize_token_embeddings` adds vocabulary rows (new special tokens such as `[SEM]`).

Generation: `generate(model, params, ids, mask, max_new_tokens=...)` (prefill + decode, one
traceable function) or `decode(...)` from a prefilled cache; greedy at temperature 0, softmax
sampling otherwise; rows stop at any of `stop_ids`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fssjax.nn.lora import LORA_NAMES, LoRADense

Array = jax.Array
Dtype = Any
Cache = dict

ROPE_TYPES = ("default", "linear", "llama3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """transformers' `rope_scaling` / `rope_parameters` (the fields the supported types read).

  rope_type: 'default' (none), 'linear' (frequencies / factor) or 'llama3' (LLaMA-3.1's
  wavelength-dependent rule, transformers `_compute_llama3_parameters`).
  """

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  # llama.cpp's `rope_freqs` tensor (GGUF files of LLaMA-3.1-style models): the inverse
  # frequencies are divided by these per-frequency factors ([head_dim // 2] floats).
  freq_factors: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of transformers' LlamaConfig that define the network (its defaults).

  `head_dim` None means hidden_size // num_attention_heads; `num_key_value_heads` None means
  num_attention_heads (no grouping).
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: Optional[int] = 1
  eos_token_id: Any = 2
  pad_token_id: Optional[int] = None
  # LoRA (not transformers fields; see fssjax.nn.lora): rank 0 = off, no LoRA parameters.
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  lora_targets: tuple = ("q_proj", "v_proj")
  lora_use_rslora: bool = False

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def validate(self, where: str = "LlamaConfig") -> "LlamaConfig":
    """Raises ValueError (naming `where` and the field) for a config this module cannot run."""
    if self.hidden_act != "silu":
      raise ValueError(f"{where}: hidden_act = {self.hidden_act!r}; only 'silu' (SwiGLU) is "
                       "supported")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"{where}: num_attention_heads = {self.num_attention_heads} is not a "
                       f"multiple of num_key_value_heads = {self.kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{where}: hidden_size = {self.hidden_size} is not divisible by "
                       f"num_attention_heads = {self.num_attention_heads}")
    if self.dim_per_head % 2:
      raise ValueError(f"{where}: head_dim = {self.dim_per_head} must be even (rotary)")
    if self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(f"{where}: rope scaling type {self.rope_scaling.rope_type!r} is not "
                       f"supported; expected one of {ROPE_TYPES}")
    if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
      raise ValueError(f"{where}: lora_rank = {self.lora_rank} must be >= 0 and lora_dropout = "
                       f"{self.lora_dropout} in [0, 1)")
    bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if self.lora_rank and bad:
      raise ValueError(f"{where}: lora_targets {bad} are not dense layers of a LLaMA decoder "
                       f"layer; expected names among {LORA_TARGETS}")
    return self

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], where: str = "config.json") -> "LlamaConfig":
    """Parses a transformers `config.json` dict (model_type 'llama').

    Reads both transformers 4's `rope_theta` + `rope_scaling` and transformers 5's
    `rope_parameters`. Raises ValueError naming `where` and the field for anything else.
    """
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
      raise ValueError(f"{where}: model_type = {model_type!r}; expected 'llama'")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in ("rope_scaling", "rope_theta"):
        continue
      if config.get(f.name) is not None:
        kwargs[f.name] = config[f.name]
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    if theta is not None:
      kwargs["rope_theta"] = float(theta)
    kwargs["rope_scaling"] = _parse_rope_scaling({**params, **scaling}, where)
    if kwargs.get("head_dim") and kwargs.get("hidden_size", cls.hidden_size) == (
        kwargs["head_dim"] * kwargs.get("num_attention_heads", cls.num_attention_heads)):
      kwargs["head_dim"] = None  # the default: one canonical form
    return cls(**kwargs).validate(where)


def _parse_rope_scaling(d: Mapping[str, Any], where: str) -> RopeScaling:
  rope_type = d.get("rope_type", d.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where}: rope scaling type {rope_type!r} is not supported; expected one "
                     f"of {ROPE_TYPES}")
  kw = {"rope_type": rope_type}
  for f in dataclasses.fields(RopeScaling):
    if f.name not in ("rope_type", "freq_factors") and d.get(f.name) is not None:
      kw[f.name] = type(f.default)(d[f.name])
  if rope_type != "default" and "factor" not in d:
    raise ValueError(f"{where}: rope scaling {rope_type!r} needs a 'factor'")
  return RopeScaling(**kw)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings.


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] float32 (transformers' rope init functions)."""
  dim = config.dim_per_head
  base = config.rope_theta
  inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  s = config.rope_scaling
  if s.rope_type == "linear":
    inv = inv / np.float32(s.factor)
  elif s.rope_type == "llama3":
    old = s.original_max_position_embeddings
    low_wavelen = old / s.low_freq_factor
    high_wavelen = old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_llama = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_llama / s.factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, inv_llama).astype(np.float32)
  if s.freq_factors is not None:
    factors = np.asarray(s.freq_factors, np.float32)
    if factors.shape != inv.shape:
      raise ValueError(f"rope freq_factors has {factors.size} entries; expected {inv.size} "
                       "(head_dim // 2)")
    inv = (inv / factors).astype(np.float32)
  return inv


def rope_cos_sin(config: LlamaConfig, positions: Array) -> tuple[Array, Array]:
  """cos, sin [B, T, head_dim] float32 for integer positions [B, T]."""
  inv = jnp.asarray(rope_inv_freq(config))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, N, H] rotated by the angles of cos/sin [B, T, H] (rotate_half convention)."""
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rot * sin


# ----------------------------------------------------------------------------------------------
# Modules.


def _dense(cfg: LlamaConfig, features: int, name: str, use_bias: bool, dtype, param_dtype,
           deterministic: bool) -> nn.Module:
  """nn.Dense, or LoRADense when `name` is one of cfg.lora_targets and cfg.lora_rank > 0."""
  if cfg.lora_rank and name in cfg.lora_targets:
    return LoRADense(features, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                     cfg.lora_use_rslora, use_bias=use_bias, deterministic=deterministic,
                     dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
  """weight * x / sqrt(mean(x^2) + eps), statistics in float32 (transformers' LlamaRMSNorm)."""

  eps: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    in_dtype = self.dtype or x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return w.astype(in_dtype) * h.astype(in_dtype)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache slot."""

  config: LlamaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               kv: Optional[tuple[Array, Array]] = None, index: Optional[Array] = None):
    cfg = self.config
    b, t, _ = x.shape
    n, g, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
    dense = lambda f, name: _dense(cfg, f, name, cfg.attention_bias, self.dtype,  # noqa: E731
                                   self.param_dtype, self.deterministic)
    q = dense(n * hd, "q_proj")(x).reshape(b, t, n, hd)
    k = dense(g * hd, "k_proj")(x).reshape(b, t, g, hd)
    v = dense(g * hd, "v_proj")(x).reshape(b, t, g, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      k_cache, v_cache = kv
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      new_kv = (k_cache, v_cache)
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5,
                                     implementation=self.implementation)
    y = dense(cfg.hidden_size, "o_proj")(y.reshape(b, t, n * hd))
    return y, new_kv


class LlamaMLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  config: LlamaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = lambda f, name: _dense(cfg, f, name, cfg.mlp_bias, self.dtype,  # noqa: E731
                                   self.param_dtype, self.deterministic)
    h = jax.nn.silu(dense(cfg.intermediate_size, "gate_proj")(x))
    h = h * dense(cfg.intermediate_size, "up_proj")(x)
    return dense(cfg.hidden_size, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
  """x + attn(input_layernorm(x)); then + mlp(post_attention_layernorm(.))."""

  config: LlamaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv=None, index=None):
    cfg, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
    h, new_kv = LlamaAttention(cfg, dt, pdt, self.implementation, det, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x), cos, sin, mask, kv, index)
    x = x + h
    x = x + LlamaMLP(cfg, dt, pdt, det, name="mlp")(
        RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x))
    return x, new_kv


class LlamaModel(nn.Module):
  """Embedding, decoder layers and the final norm (transformers' `LlamaModel`, path `model`)."""

  config: LlamaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  implementation: Optional[str] = None
  scan_layers: bool = False
  deterministic: bool = True

  def setup(self):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                 embedding_init=nn.initializers.normal(0.02))
    layer = nn.remat(LlamaDecoderLayer) if self.remat else LlamaDecoderLayer
    if self.scan_layers:
      # One layer body under jax.lax.scan: params stacked on a leading [layers] axis.
      self.layers = nn.scan(layer, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                            length=cfg.num_hidden_layers)(cfg, dt, pdt, self.implementation,
                                                          self.deterministic)
    else:
      self.layers = [layer(cfg, dt, pdt, self.implementation, self.deterministic)
                     for _ in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)

  def __call__(self, inputs_embeds: Array, positions: Array, mask: Array,
               cache: Optional[Cache] = None):
    cos, sin = rope_cos_sin(self.config, positions)
    x = inputs_embeds
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.scan_layers:
      kv = None if cache is None else (cache["k"], cache["v"])
      index = None if cache is None else cache["index"]
      x, new_kv = self.layers(x, cos, sin, mask, kv, index)
      return self.norm(x), new_kv
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache["k"][i], cache["v"][i])
      x, new_kv = layer(x, cos, sin, mask, kv, None if cache is None else cache["index"])
      if cache is not None:
        ks.append(new_kv[0])
        vs.append(new_kv[1])
    x = self.norm(x)
    return x, (None if cache is None else (jnp.stack(ks), jnp.stack(vs)))

  def embed(self, input_ids: Array) -> Array:
    return self.embed_tokens(input_ids)

  def attend(self, x: Array) -> Array:
    return self.embed_tokens.attend(x)


class LlamaForCausalLM(nn.Module):
  """LLaMA decoder with the language-model head. See the module docstring.

  Attributes:
    config: the network's LlamaConfig.
    dtype: compute dtype (None: the parameters' dtype; jnp.bfloat16 for bf16 compute).
    param_dtype: parameter dtype (float32).
    remat: rematerialise each decoder layer in the backward pass (`nn.remat`).
    attention_implementation: `jax.nn.dot_product_attention` implementation (None: XLA picks).
    scan_layers: run the layers as one `nn.scan` body (compiles ~num_layers times faster);
      parameters then live under `model/layers/...` with a leading [num_layers] axis
      (`stack_layers` / `unstack_layers` convert from / to the transformers-named layout).
    deterministic: no LoRA dropout. With `deterministic=False` and `rngs={'dropout': key}` in
      `apply`, the LoRA branches drop `config.lora_dropout` of their inputs (training).
  """

  config: LlamaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: Optional[str] = None
  scan_layers: bool = False
  deterministic: bool = True

  def setup(self):
    self.config.validate()
    self.model = LlamaModel(self.config, self.dtype, self.param_dtype, self.remat,
                            self.attention_implementation, self.scan_layers, self.deterministic)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype)

  def embed(self, input_ids: Array) -> Array:
    """Token embeddings [B, T, hidden] of input_ids [B, T] (to splice other tokens into)."""
    return self.model.embed(input_ids)

  def head(self, hidden: Array) -> Array:
    """Logits [..., vocab] float32 of final-norm hidden states [..., hidden]."""
    if self.config.tie_word_embeddings:
      out = self.model.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, input_ids: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
               attention_mask: Optional[Array] = None, positions: Optional[Array] = None,
               cache: Optional[Cache] = None, logits: bool = True) -> dict:
    """Forward pass; see the module docstring for shapes.

    Raises:
      ValueError: neither or both of input_ids / inputs_embeds given, or wrong ranks, or a
        sequence longer than the cache.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
    if input_ids is not None:
      if input_ids.ndim != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [B, T]")
      inputs_embeds = self.embed(input_ids)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
      raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected "
                       f"[B, T, {self.config.hidden_size}]")
    b, t = inputs_embeds.shape[:2]
    tok_mask = (jnp.ones((b, t), bool) if attention_mask is None
                else attention_mask.astype(bool))
    start = 0 if cache is None else cache["index"]
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal[None, None] & tok_mask[:, None, None, :]
      new_cache = None
    else:
      s = cache["mask"].shape[1]
      if t > s:
        raise ValueError(f"{t} tokens do not fit a KV cache of max_length {s}")
      key_mask = jax.lax.dynamic_update_slice(cache["mask"], tok_mask, (0, start))
      q_slot = start + jnp.arange(t)
      causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
      mask = causal[None, None] & key_mask[:, None, None, :]
    hidden, kv = self.model(inputs_embeds, positions, mask, cache)
    if cache is not None:
      new_cache = {"k": kv[0], "v": kv[1], "mask": key_mask, "index": start + t}
    return {"logits": self.head(hidden) if logits else None, "hidden": hidden,
            "cache": new_cache}


def stack_layers(params) -> dict:
  """transformers-named params (`model/layers_{i}/...`) -> the `scan_layers=True` layout."""
  model = dict(params["model"])
  names = sorted((k for k in model if k.startswith("layers_")), key=lambda k: int(k[7:]))
  layers = [model.pop(k) for k in names]
  model["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return {**params, "model": model}


def unstack_layers(params) -> dict:
  """Inverse of `stack_layers`."""
  model = dict(params["model"])
  stacked = model.pop("layers")
  n = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(n):
    model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, "model": model}


def resize_token_embeddings(config: LlamaConfig, params, new_vocab_size: int, *,
                            init: str = "mean", rng: Optional[Array] = None,
                            std: float = 0.02) -> tuple[LlamaConfig, dict]:
  """Grows (or shrinks) the vocabulary: rows of `model/embed_tokens/embedding` [V, D] and
  columns of `lm_head/kernel` [D, V] (transformers' `resize_token_embeddings`).

  New rows are, with init='mean', the mean of the existing rows (transformers' mean
  resizing, without its random covariance term: deterministic); with init='normal',
  normal(0, std) draws from `rng` (transformers before 4.46 and LISA / DSV-LFS, which call
  `resize_token_embeddings(len(tokenizer))` after adding `[SEG]` / `[SEM]`). The existing rows
  are kept bit for bit. Works on unrolled and `scan_layers` trees (only the embedding and head
  change). Returns (config with `vocab_size=new_vocab_size`, params).

  Raises:
    ValueError: new_vocab_size < 1, an unknown `init`, 'normal' without rng, or a tree
      without `model/embed_tokens/embedding`.
  """
  if new_vocab_size < 1 or init not in ("mean", "normal") or (init == "normal" and rng is None):
    raise ValueError(f"resize_token_embeddings: new_vocab_size = {new_vocab_size} must be >= 1 "
                     f"and init = {init!r} one of 'mean' or 'normal' (which needs rng)")
  try:
    emb = params["model"]["embed_tokens"]["embedding"]
  except (KeyError, TypeError):
    raise ValueError("resize_token_embeddings: the parameter tree has no "
                     "model/embed_tokens/embedding (pass a LlamaForCausalLM tree)") from None
  old = emb.shape[0]
  n = new_vocab_size - old
  rng = jax.random.PRNGKey(0) if rng is None else rng
  k_emb, k_head = jax.random.split(rng)

  def grow(table, key):  # table [V, D]
    if n <= 0:
      return table[:new_vocab_size]
    if init == "mean":
      rows = jnp.broadcast_to(jnp.mean(jnp.asarray(table, jnp.float32), 0), (n, table.shape[1]))
    else:
      rows = std * jax.random.normal(key, (n, table.shape[1]), jnp.float32)
    return jnp.concatenate([jnp.asarray(table), rows.astype(table.dtype)], 0)

  model = dict(params["model"])
  model["embed_tokens"] = {**model["embed_tokens"], "embedding": grow(emb, k_emb)}
  out = {**params, "model": model}
  if "lm_head" in params:
    out["lm_head"] = {**params["lm_head"],
                      "kernel": grow(jnp.asarray(params["lm_head"]["kernel"]).T, k_head).T}
  return dataclasses.replace(config, vocab_size=new_vocab_size), out


def init_cache(config: LlamaConfig, batch: int, max_length: int,
               dtype: Dtype = jnp.float32) -> Cache:
  """An empty KV cache (see the module docstring); `dtype` should be the compute dtype."""
  shape = (config.num_hidden_layers, batch, max_length, config.kv_heads, config.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, max_length), bool), "index": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------------------------
# Generation.


def sample_token(logits: Array, rng: Array, temperature: Array) -> Array:
  """Greedy (temperature <= 0) or softmax(logits / temperature) sampling: [B, V] -> [B] int32."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  sampled = jax.random.categorical(rng, logits / t, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) > 0, sampled, greedy)


def decode(model: LlamaForCausalLM, params, cache: Cache, first_token: Array,
           next_position: Array, *, max_new_tokens: Array, max_tokens: int,
           stop_ids: Sequence[int], rng: Array, temperature: Array = 0.0,
           pad_id: int = 0) -> tuple[Array, Array]:
  """Autoregressive decoding with `jax.lax.while_loop` (traceable; jit it with max_tokens static).

  Args:
    model, params: the network and its parameters.
    cache: the cache after the prompt (see `prefill`); needs max_tokens - 1 free slots.
    first_token: [B] int32, the token sampled from the prompt's last logits.
    next_position: [B] int32, its rotary position.
    max_new_tokens: int32 scalar <= max_tokens (traced: no recompilation per value).
    max_tokens: static length of the output buffer.
    stop_ids: token ids that end a row (ints or traced int32 scalars; the stop token is kept
      in the output).
    rng: PRNG key for sampling; temperature: scalar (0 = greedy).
    pad_id: written after a row stopped.

  Returns:
    tokens [B, max_tokens] int32 (first_token first, `pad_id` after a stop or beyond
    max_new_tokens) and lengths [B] int32 (tokens produced, stop token included).
  """
  b = first_token.shape[0]
  stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
  out = jnp.full((b, max_tokens), pad_id, jnp.int32).at[:, 0].set(first_token)
  done = jnp.isin(first_token, stops)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, pos, cache, done, out, lengths, rng = state
    res = model.apply({"params": params}, tok[:, None], positions=pos[:, None], cache=cache)
    rng, sub = jax.random.split(rng)
    nxt = sample_token(res["logits"][:, -1], sub, temperature)
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, i].set(nxt)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stops)
    return i + 1, nxt, pos + 1, res["cache"], done, out, lengths, rng

  state = (jnp.int32(1), first_token, next_position, cache, done, out, lengths, rng)
  state = jax.lax.while_loop(cond, body, state)
  return state[5], state[6]


def generate(model: LlamaForCausalLM, params, input_ids: Array, attention_mask: Array, *,
             max_new_tokens: int, stop_ids: Sequence[int] = (), rng: Optional[Array] = None,
             temperature: float = 0.0, pad_id: int = 0) -> tuple[Array, Array]:
  """Prefill + KV-cache decoding of left-padded prompts (one traceable function).

  Args:
    input_ids, attention_mask: [B, T] left-padded prompts (mask 1 = token).
    max_new_tokens: static number of tokens to produce at most.
  Returns:
    (tokens [B, max_new_tokens] int32, lengths [B] int32), as `decode`.
  """
  b, t = input_ids.shape
  dtype = model.dtype or model.param_dtype
  cache = init_cache(model.config, b, t + max_new_tokens, dtype)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
  res = model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                    positions=positions, cache=cache)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rng, sub = jax.random.split(rng)
  first = sample_token(res["logits"][:, -1], sub, temperature)
  return decode(model, params, res["cache"], first, positions[:, -1] + 1,
                max_new_tokens=max_new_tokens, max_tokens=max_new_tokens, stop_ids=stop_ids,
                rng=rng, temperature=temperature, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------
# Sharding.


def param_spec(path: Sequence[str], shape: Sequence[int], fsdp_size: int,
               axis: str = "fsdp") -> P:
  """PartitionSpec of one parameter over the `fsdp` mesh axis.

  Rules (ZeRO-3 style: every large matrix is split, XLA gathers it where used):
    * Dense kernels [in, out]: split `in` (the model dimension for q/k/v/gate/up, the heads or
      the MLP width for o_proj/down_proj); `out` when `in` does not divide.
    * the token embedding [vocab, hidden]: split `hidden` (or `vocab`).
    * norms, biases and anything not divisible by fsdp_size: replicated.
    * `scan_layers` params: the same rule on their last two axes (the layer axis is whole).
  """
  if fsdp_size <= 1 or len(shape) < 2 or path[-1] in ("weight", "bias"):
    return P()  # norms and biases (also when stacked by scan_layers)
  if any(p in LORA_NAMES for p in path):
    return P()  # LoRA factors: small, replicated
  name = "/".join(path)
  lead = [None] * (len(shape) - 2)  # the stacked [layers] axis of scan_layers params
  order = (1, 0) if name.endswith("embed_tokens/embedding") else (0, 1)
  for dim in order:
    if shape[len(lead) + dim] % fsdp_size == 0:
      spec = [None, None]
      spec[dim] = axis
      return P(*lead, *spec)
  return P()


def partition_specs(params, fsdp_size: int, axis: str = "fsdp"):
  """A pytree of PartitionSpecs matching `params` (arrays or ShapeDtypeStructs)."""
  def spec(path, x):
    keys = [getattr(k, "key", str(k)) for k in path]
    return param_spec(keys, x.shape, fsdp_size, axis)
  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: jax.sharding.Mesh, axis: str = "fsdp"):
  """NamedShardings for `params` on `mesh` (replicated when the mesh has no `axis`)."""
  size = dict(mesh.shape).get(axis, 1)
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                      partition_specs(params, size, axis),
                      is_leaf=lambda x: isinstance(x, P))
