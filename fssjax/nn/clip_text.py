"""CLIP text encoder (transformers' `CLIPTextModel`) in Flax Linen.

Stable Diffusion conditions its UNet on `last_hidden_state`: the output of the last encoder
layer after `final_layer_norm`. SD 2.x uses OpenCLIP ViT-H's penultimate layer; its published
`text_encoder/config.json` already has `num_hidden_layers: 23` (the 24th layer is dropped from
the checkpoint), so `last_hidden_state` of this module is what SD 2.x expects, as in diffusers.

Call:
  out = model.apply({'params': p}, input_ids [B, T] int, attention_mask=None)
  out['last_hidden_state'] [B, T, hidden_size]
  out['pooler_output'] [B, hidden_size] (the EOS token's state, transformers' rule)
  out['hidden_states'] (embeddings + every layer's output) when output_hidden_states=True.

Attention is causal (`jax.nn.dot_product_attention(is_causal=...)` semantics); an optional
padding `attention_mask` [B, T] (1 keep, 0 pad) additionally hides padded keys, like
transformers. Parameter paths mirror transformers' (`encoder.layers.0.self_attn.q_proj.weight`
-> `encoder/layers_0/self_attn/q_proj/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.attention import dot_product_attention

Array = jax.Array
Dtype = Any

HIDDEN_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' CLIPTextConfig that define the network (its defaults)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  bos_token_id: int = 49406
  pad_token_id: int = 1

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """Parses a `text_encoder/config.json` dict (model_type clip_text_model)."""
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"text encoder config field 'model_type' = {model_type!r}; expected "
                       "'clip_text_model'")
    act = config.get("hidden_act", "quick_gelu")
    if act not in HIDDEN_ACTS:
      raise ValueError(f"text encoder config field 'hidden_act' = {act!r} is not supported; "
                       f"expected one of {sorted(HIDDEN_ACTS)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in config and config[f.name] is not None:
        kwargs[f.name] = config[f.name]
    out = cls(**kwargs)
    if out.hidden_size % out.num_attention_heads:
      raise ValueError(f"text encoder config: hidden_size={out.hidden_size} is not divisible by "
                       f"num_attention_heads={out.num_attention_heads}")
    return out


class CLIPAttention(nn.Module):
  """Multi-head self-attention with CLIP's names (q_proj, k_proj, v_proj, out_proj; biases).

  Causal for the text encoder (`causal=True`), bidirectional for the vision tower
  (`fssjax.nn.clip_vision`). `mask` [B, T] (1 keep, 0 pad) additionally hides padded keys.
  """

  hidden_size: int
  num_heads: int
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, d = x.shape
    hd = d // self.num_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                  name=name)
    split = lambda a: a.reshape(b, t, self.num_heads, hd)  # noqa: E731
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    if mask is None:
      y = dot_product_attention(q, k, v, is_causal=self.causal,
                                implementation=self.implementation)
    else:
      full = mask[:, None, None, :].astype(bool)
      if self.causal:
        full = jnp.tril(jnp.ones((t, t), bool))[None, None] & full
      y = dot_product_attention(q, k, v, mask=full, implementation=self.implementation)
    return dense("out_proj")(y.reshape(b, t, d))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: x + attn(LN1(x)); x + MLP(LN2(x)).

  `config` is a CLIPTextConfig or a `fssjax.nn.clip_vision.CLIPVisionConfig` (the fields
  hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps).
  """

  config: Any
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,  # noqa: E731
                                   use_fast_variance=False, name=name)
    x = x + CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, self.implementation,
                          dtype=dt, param_dtype=pdt, causal=self.causal,
                          name="self_attn")(ln("layer_norm1")(x), mask)
    h = ln("layer_norm2")(x)
    h = _MLP(cfg, dtype=dt, param_dtype=pdt, name="mlp")(h)
    return x + h


class _MLP(nn.Module):
  config: Any
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc1")(x)
    x = HIDDEN_ACTS[cfg.hidden_act](x)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(x)


class _Embeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    cfg = self.config
    t = input_ids.shape[-1]
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="token_embedding")(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="position_embedding")(jnp.arange(t))
    return tok + pos[None]


class CLIPTextModel(nn.Module):
  """CLIP text transformer. See the module docstring."""

  config: CLIPTextConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               output_hidden_states: bool = False) -> dict:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [B, T]")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    x = _Embeddings(cfg, dtype=dt, param_dtype=pdt, name="embeddings")(input_ids)
    hidden = [x]
    enc = _Encoder(cfg, self.attention_implementation, dtype=dt, param_dtype=pdt,
                   name="encoder")
    x, layer_outputs = enc(x, attention_mask)
    hidden.extend(layer_outputs)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, use_fast_variance=False,
                     name="final_layer_norm")(x)
    if cfg.eos_token_id == 2:
      # Legacy configs: the EOS token has the largest id.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = x[jnp.arange(x.shape[0]), eos_pos]
    out = {"last_hidden_state": x, "pooler_output": pooled}
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden)
    return out


class _Encoder(nn.Module):
  """`num_hidden_layers` CLIPEncoderLayers named `layers_{i}`: (last output, every output).
  Shared by the text encoder (causal) and the vision tower (`causal=False`); `remat`
  rematerialises each layer in the backward pass."""

  config: Any
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  causal: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None):
    layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = layer(self.config, self.implementation, dtype=self.dtype,
                param_dtype=self.param_dtype, causal=self.causal, name=f"layers_{i}")(x, mask)
      outs.append(x)
    return x, outs
