"""BERT encoder (transformers' `BertModel`) in Flax Linen, for sentence embeddings.

Follows transformers' `modeling_bert.py` (post-LN transformer, Devlin et al. 2019) in inference
mode (no dropout), and sentence-transformers' `Pooling(mode='mean')` + `Normalize` for the
sentence embedding of all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al. 2020, MiniLM):

  x = LayerNorm(word_emb[ids] + position_emb[pos] + token_type_emb[type])
  per layer:  x = LayerNorm(x + dense(attention(x)));  x = LayerNorm(x + dense(act(dense(x))))
  pooler_output = tanh(dense(x[:, 0]))                 (BERT's pooler, when the checkpoint has one)

Call:
  out = model.apply({'params': p}, input_ids [B, T] int, attention_mask [B, T] (1 keep, 0 pad),
                    token_type_ids=None (zeros), position_ids=None (arange(T)))
  out['last_hidden_state'] [B, T, hidden_size]
  out['pooler_output'] [B, hidden_size] (only with config.add_pooling_layer)
  out['hidden_states'] (embeddings + every layer's output) when output_hidden_states=True.
  mean_pool(out['last_hidden_state'], attention_mask) -> [B, hidden_size]; l2_normalize(...).

Attention is `jax.nn.dot_product_attention` with a boolean key-padding mask; a padded query
row still attends to the valid keys, as in transformers, and is excluded by `mean_pool`.
Parameter paths mirror transformers' names (`encoder.layer.0.attention.self.query.weight` ->
`encoder/layer_0/attention/self/query/kernel`), so loading a checkpoint is a renaming of paths
(`fssjax.weights.bert`).
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
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of transformers' BertConfig that define the network (its defaults).

  `add_pooling_layer` is not a transformers config field: it says whether the checkpoint has
  BERT's pooler (`pooler.dense`); the loader sets it from the tensors.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  position_embedding_type: str = "absolute"
  add_pooling_layer: bool = True

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides) -> "BertConfig":
    """Parses a transformers `config.json` dict (model_type bert); `overrides` win.

    Raises:
      ValueError: for another model_type, an unsupported hidden_act or position embedding
        type, or hidden_size not divisible by num_attention_heads.
    """
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"BERT config field 'model_type' = {model_type!r}; expected 'bert'")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in config and config[f.name] is not None:
        kwargs[f.name] = config[f.name]
    kwargs.update(overrides)
    out = cls(**kwargs)
    if out.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"BERT config field 'hidden_act' = {out.hidden_act!r} is not supported; "
                       f"expected one of {sorted(HIDDEN_ACTS)}")
    if out.position_embedding_type != "absolute":
      raise ValueError(f"BERT config field 'position_embedding_type' = "
                       f"{out.position_embedding_type!r} is not supported; expected 'absolute'")
    if out.hidden_size % out.num_attention_heads:
      raise ValueError(f"BERT config: hidden_size={out.hidden_size} is not divisible by "
                       f"num_attention_heads={out.num_attention_heads}")
    return out


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with BERT's names (query, key, value)."""

  config: BertConfig
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    b, t, d = x.shape
    n = self.config.num_attention_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                  name=name)
    q, k, v = (dense(name)(x).reshape(b, t, n, d // n) for name in ("query", "key", "value"))
    y = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    return y.reshape(b, t, d)


class _DenseLN(nn.Module):
  """BERT's `*Output` blocks: LayerNorm(residual + dense(x)) (named dense, LayerNorm)."""

  features: int
  eps: float
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, residual: Array) -> Array:
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
    return nn.LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        use_fast_variance=False, name="LayerNorm")(x + residual)


class _Attention(nn.Module):
  config: BertConfig
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    y = BertSelfAttention(cfg, self.implementation, dtype=dt, param_dtype=pdt, name="self")(x, mask)
    return _DenseLN(cfg.hidden_size, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                    name="output")(y, x)


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="dense")(x)
    return HIDDEN_ACTS[self.config.hidden_act](x)


class BertLayer(nn.Module):
  """One post-LN transformer layer (attention, intermediate, output)."""

  config: BertConfig
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    x = _Attention(cfg, self.implementation, dtype=dt, param_dtype=pdt, name="attention")(x, mask)
    h = _Intermediate(cfg, dtype=dt, param_dtype=pdt, name="intermediate")(x)
    return _DenseLN(cfg.hidden_size, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                    name="output")(h, x)


class _Embeddings(nn.Module):
  config: BertConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    emb = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dt, param_dtype=pdt,  # noqa: E731
                                   name=name)
    x = (emb(cfg.vocab_size, "word_embeddings")(input_ids)
         + emb(cfg.max_position_embeddings, "position_embeddings")(position_ids)
         + emb(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    return nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, use_fast_variance=False,
                        name="LayerNorm")(x)


class _Encoder(nn.Module):
  config: BertConfig
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]):
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.implementation, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"layer_{i}")(x, mask)
      outs.append(x)
    return x, outs


class _Pooler(nn.Module):
  config: BertConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return jnp.tanh(nn.Dense(self.config.hidden_size, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="dense")(x[:, 0]))


class BertModel(nn.Module):
  """BERT encoder. See the module docstring.

  Attributes:
    config: the network's BertConfig.
    dtype: computation dtype (None: the parameters' dtype); params stay `param_dtype`.
    param_dtype: parameter dtype.
    attention_implementation: `jax.nn.dot_product_attention` implementation (None: XLA picks).
  """

  config: BertConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               token_type_ids: Optional[Array] = None, position_ids: Optional[Array] = None,
               output_hidden_states: bool = False) -> dict:
    """Encodes token ids.

    Args:
      input_ids: [B, T] integer word-piece ids.
      attention_mask: [B, T] (1 or True: a token, 0: padding); None: no padding.
      token_type_ids: [B, T] segment ids (None: all 0).
      position_ids: [B, T] or [T] positions (None: arange(T)).
      output_hidden_states: also return every layer's output.

    Returns:
      dict with 'last_hidden_state' [B, T, D] (dtype: `dtype`, else the params'), and
      'pooler_output' [B, D] when config.add_pooling_layer, 'hidden_states' (L + 1 arrays)
      when asked.

    Raises:
      ValueError: input_ids not 2-D, or T > max_position_embeddings.
    """
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [B, T]")
    t = input_ids.shape[1]
    if t > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(t)[None]
    x = _Embeddings(cfg, dtype=dt, param_dtype=pdt, name="embeddings")(
        input_ids, token_type_ids, position_ids)
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                         f"input_ids' shape {tuple(input_ids.shape)}")
      mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1 head, 1 query, T keys]
    embedded = x
    x, layer_outputs = _Encoder(cfg, self.attention_implementation, dtype=dt, param_dtype=pdt,
                                name="encoder")(x, mask)
    out = {"last_hidden_state": x}
    if cfg.add_pooling_layer:
      out["pooler_output"] = _Pooler(cfg, dtype=dt, param_dtype=pdt, name="pooler")(x)
    if output_hidden_states:
      out["hidden_states"] = (embedded, *layer_outputs)
    return out


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Mean of the token states over valid tokens (sentence-transformers' mean pooling).

  Args:
    hidden: [B, T, D] token states.
    attention_mask: [B, T] (1 token, 0 padding).

  Returns:
    [B, D] float32: sum(hidden * mask) / max(sum(mask), 1e-9), as in sentence-transformers'
    `Pooling` (a row with no token gives zeros).
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize, as `Normalize`)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
