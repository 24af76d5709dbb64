"""BLIP-2 Q-Former (transformers' `Blip2QFormerModel`) in Flax Linen, with the learned queries
and the projection into a language model's embedding space.

Follows Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models" (ICML 2023) as implemented in Hugging Face transformers
`models/blip_2/modeling_blip_2.py`, in inference mode (no dropout), for the query tokens only
(the path BLIP-2 and LLaFS (Zhu et al., CVPR 2024) use to turn image features into visual
tokens for an LLM; the Q-Former's text input, `use_qformer_text_input`, is not supported):

  x = LayerNorm(query_tokens)                                   (`layernorm`)
  layer i:  x = LN(x + dense(self_attention(x)))                (`attention`)
            x = LN(x + dense(cross_attention(x, image)))        (`crossattention`, only when
                                                                 i % cross_attention_frequency == 0)
            x = LN(x + dense(act(dense(x))))                    (`intermediate_query`, `output_query`)
  visual tokens = language_projection(x)                        [B, num_query_tokens, llm_hidden]

Modules:
  Blip2QFormerModel(config)(query_embeds [B, Q, D] f32, encoder_hidden_states [B, S, E] f32,
                            encoder_attention_mask=None [B, S] (1 keep, 0 pad),
                            output_hidden_states=False)
    -> {'last_hidden_state' [B, Q, D], 'pooler_output' [B, D] (= last_hidden_state[:, 0], as
       transformers), 'hidden_states' (Q-Former input after `layernorm` + every layer's output)
       when asked}.
  QFormerVisualTokens(config)(image_features [B, S, E] or [B, H, W, E] (NHWC; flattened
                              row-major to S = H * W), encoder_attention_mask=None)
    -> {'tokens' [B, Q, llm_hidden_size] (or [B, Q, D] when llm_hidden_size is None),
        'qformer' the Q-Former's last_hidden_state [B, Q, D]}.
    Parameters: `query_tokens` [1, Q, D] (Blip2Model's `query_tokens`), `qformer/...`,
    `language_projection/{kernel, bias}`; `init_params(config, seed)` initialises them with
    numpy (no compilation).

Parameter paths mirror transformers' (`qformer.encoder.layer.0.crossattention.attention.key.
weight` -> `qformer/encoder/layer_0/crossattention/attention/key/kernel`), so a Blip2Model /
Blip2ForConditionalGeneration checkpoint converts by renaming (`qformer_params_from_state_dict`,
`load_qformer`). Attention is `jax.nn.dot_product_attention` (scale 1/sqrt(head_dim)), LayerNorm
statistics as PyTorch's (`use_fast_variance=False`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn.attention import dot_product_attention
# The Q-Former is BERT-based: its Output / Intermediate blocks are BERT's (same names).
from fssjax.nn.bert import HIDDEN_ACTS
from fssjax.nn.bert import _DenseLN  # pylint: disable=protected-access
from fssjax.nn.bert import _Intermediate  # pylint: disable=protected-access

Array = jax.Array
Dtype = Any
PyTree = Any


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """transformers' Blip2QFormerConfig fields that define the network (its defaults), plus the
  two Blip2Config fields the visual-token module needs.

  Attributes:
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
    layer_norm_eps, cross_attention_frequency, encoder_hidden_size: as Blip2QFormerConfig
      (encoder_hidden_size = channels E of the image features).
    num_query_tokens: Blip2Config.num_query_tokens (Q).
    llm_hidden_size: the language model's embedding size (Blip2Config.text_config.hidden_size):
      output width of `language_projection`; None: no projection.
  """

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  num_query_tokens: int = 32
  llm_hidden_size: Optional[int] = None

  def __post_init__(self):
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"Q-Former config field 'hidden_act' = {self.hidden_act!r} is not "
                       f"supported; expected one of {sorted(HIDDEN_ACTS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"Q-Former config: hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError(f"Q-Former config field 'cross_attention_frequency' = "
                       f"{self.cross_attention_frequency}; expected an integer >= 1")

  def has_cross_attention(self, layer: int) -> bool:
    """transformers' rule: layer i cross-attends when i % cross_attention_frequency == 0."""
    return layer % self.cross_attention_frequency == 0

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides) -> "QFormerConfig":
    """Parses a transformers config.json dict: a Blip2Config (model_type 'blip-2', with
    'qformer_config', 'num_query_tokens', 'text_config') or a Blip2QFormerConfig
    (model_type 'blip_2_qformer'). `overrides` win.

    Raises:
      ValueError: another model_type, `use_qformer_text_input` true, or a field check failing.
    """
    model_type = config.get("model_type", "blip_2_qformer")
    kwargs: dict[str, Any] = {}
    if model_type == "blip-2":
      q = dict(config.get("qformer_config") or {})
      if "num_query_tokens" in config:
        kwargs["num_query_tokens"] = int(config["num_query_tokens"])
      text = config.get("text_config") or {}
      if text.get("hidden_size") is not None:
        kwargs["llm_hidden_size"] = int(text["hidden_size"])
    elif model_type == "blip_2_qformer":
      q = dict(config)
    else:
      raise ValueError(f"Q-Former config field 'model_type' = {model_type!r}; expected "
                       f"'blip-2' (Blip2Config) or 'blip_2_qformer' (Blip2QFormerConfig)")
    if q.get("use_qformer_text_input"):
      raise ValueError("Q-Former config field 'use_qformer_text_input' = True: the Q-Former's "
                       "text input (InstructBLIP-style) is not supported; expected False")
    for f in dataclasses.fields(cls):
      if f.name in q and q[f.name] is not None and f.name not in kwargs:
        kwargs[f.name] = q[f.name]
    kwargs.update(overrides)
    return cls(**kwargs)


class _MultiHeadAttention(nn.Module):
  """Blip2QFormerMultiHeadAttention: query / key / value projections, no output projection."""

  config: QFormerConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Optional[Array]) -> Array:
    cfg = self.config
    d, n = cfg.hidden_size, cfg.num_attention_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                  name=name)
    b, t, _ = x.shape
    s = context.shape[1]
    q = dense("query")(x).reshape(b, t, n, d // n)
    k = dense("key")(context).reshape(b, s, n, d // n)
    v = dense("value")(context).reshape(b, s, n, d // n)
    return dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)


class _Attention(nn.Module):
  """Blip2QFormerAttention: `attention` (multi-head) + `output` (dense, LayerNorm)."""

  config: QFormerConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               mask: Optional[Array] = None) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    ctx = x if context is None else context
    y = _MultiHeadAttention(cfg, dtype=dt, param_dtype=pdt, name="attention")(x, ctx, mask)
    return _DenseLN(cfg.hidden_size, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                    name="output")(y, x)


class Blip2QFormerLayer(nn.Module):
  """One Q-Former layer for query tokens (self-attention, optional cross-attention, FFN)."""

  config: QFormerConfig
  layer_idx: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, image: Array, image_mask: Optional[Array]) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    x = _Attention(cfg, dtype=dt, param_dtype=pdt, name="attention")(x)
    if cfg.has_cross_attention(self.layer_idx):
      # Cross-attention keys/values come from the image (width encoder_hidden_size); flax
      # infers the input width of `key` / `value` from `image`.
      x = _Attention(cfg, dtype=dt, param_dtype=pdt, name="crossattention")(x, image, image_mask)
    h = _Intermediate(cfg, dtype=dt, param_dtype=pdt, name="intermediate_query")(x)
    return _DenseLN(cfg.hidden_size, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                    name="output_query")(h, x)


class _Encoder(nn.Module):
  config: QFormerConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, image: Array, image_mask: Optional[Array]):
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = Blip2QFormerLayer(self.config, i, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"layer_{i}")(x, image, image_mask)
      outs.append(x)
    return x, outs


class Blip2QFormerModel(nn.Module):
  """The Q-Former on given query embeddings. See the module docstring.

  Attributes:
    config: QFormerConfig.
    dtype: computation dtype (None: the parameters'); params stay `param_dtype`.
    param_dtype: parameter dtype.
  """

  config: QFormerConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_embeds: Array, encoder_hidden_states: Array,
               encoder_attention_mask: Optional[Array] = None,
               output_hidden_states: bool = False) -> dict:
    """Runs the query tokens through the Q-Former.

    Args:
      query_embeds: [B, Q, hidden_size] float.
      encoder_hidden_states: [B, S, encoder_hidden_size] float image features.
      encoder_attention_mask: optional [B, S] (1 or True: a feature, 0: padding).
      output_hidden_states: also return the embeddings and every layer's output.

    Returns:
      dict (see the module docstring).

    Raises:
      ValueError: wrong ranks or widths, or a mask of another shape.
    """
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    if query_embeds.ndim != 3 or query_embeds.shape[-1] != cfg.hidden_size:
      raise ValueError(f"query_embeds has shape {tuple(query_embeds.shape)}; expected "
                       f"[B, Q, hidden_size={cfg.hidden_size}]")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != query_embeds.shape[0]
        or encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size):
      raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; "
                       f"expected [B={query_embeds.shape[0]}, S, encoder_hidden_size="
                       f"{cfg.encoder_hidden_size}]")
    mask = None
    if encoder_attention_mask is not None:
      if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
        raise ValueError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)};"
                         f" expected [B, S] = {tuple(encoder_hidden_states.shape[:2])}")
      mask = encoder_attention_mask.astype(bool)[:, None, None, :]  # [B, heads, Q, S]
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, use_fast_variance=False,
                     name="layernorm")(query_embeds)
    embedded = x
    x, layers = _Encoder(cfg, dtype=dt, param_dtype=pdt, name="encoder")(
        x, encoder_hidden_states, mask)
    out = {"last_hidden_state": x, "pooler_output": x[:, 0]}
    if output_hidden_states:
      out["hidden_states"] = (embedded, *layers)
    return out


class QFormerVisualTokens(nn.Module):
  """Learned queries -> Q-Former over image features -> linear projection to the LLM width.

  BLIP-2's `query_tokens` + `qformer` + `language_projection` (Li et al. 2023), the visual
  tokens of LLaFS (Zhu et al., CVPR 2024). Query tokens are initialised N(0, 0.02), as the
  original BLIP-2 code does (salesforce/LAVIS `Blip2Base.init_Qformer`: normal with std
  `initializer_range`); transformers zero-initialises them, which for training from scratch
  would leave every query identical (same input, same gradient) forever.

  Attributes:
    config: QFormerConfig (llm_hidden_size None: no projection).
    dtype, param_dtype: computation and parameter dtypes.
  """

  config: QFormerConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_features: Array,
               encoder_attention_mask: Optional[Array] = None) -> dict:
    """Visual tokens of images.

    Args:
      image_features: [B, S, E] or NHWC [B, H, W, E] (flattened row-major: S = H * W).
      encoder_attention_mask: optional [B, S] (1 keep, 0 pad).

    Returns:
      {'tokens': [B, Q, llm_hidden_size or hidden_size], 'qformer': [B, Q, hidden_size]}.

    Raises:
      ValueError: image_features not 3-D or 4-D (and the Q-Former's shape checks).
    """
    cfg = self.config
    if image_features.ndim == 4:
      b, h, w, e = image_features.shape
      image_features = image_features.reshape(b, h * w, e)
    elif image_features.ndim != 3:
      raise ValueError(f"image_features has shape {tuple(image_features.shape)}; expected "
                       f"[B, S, E] or [B, H, W, E]")
    queries = self.param("query_tokens", nn.initializers.normal(0.02),
                         (1, cfg.num_query_tokens, cfg.hidden_size), self.param_dtype)
    b = image_features.shape[0]
    q = jnp.broadcast_to(queries, (b,) + queries.shape[1:])
    if self.dtype is not None:
      q = q.astype(self.dtype)
    out = Blip2QFormerModel(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="qformer")(
        q, image_features, encoder_attention_mask)
    x = out["last_hidden_state"]
    tokens = x
    if cfg.llm_hidden_size is not None:
      tokens = nn.Dense(cfg.llm_hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="language_projection")(x)
    return {"tokens": tokens, "qformer": x}


def init_params(config: QFormerConfig, seed: int, *, initializer_range: float = 0.02) -> PyTree:
  """Initial `QFormerVisualTokens(config)` params generated with numpy (no XLA compilation;
  jitted Flax initialisers with threefry take seconds per network to compile on a loaded CPU).

  BERT / BLIP-2 rules (transformers' `_init_weights`, LAVIS for the queries): Dense kernels
  and `query_tokens` ~ N(0, initializer_range), biases 0, LayerNorm scale 1 and bias 0.

  Returns:
    params (float32 numpy arrays in the structure `QFormerVisualTokens(config).init` gives).
  """
  shapes = jax.eval_shape(QFormerVisualTokens(config).init, jax.random.key(0),
                          jnp.zeros((1, 1, config.encoder_hidden_size)))["params"]
  gen = np.random.default_rng(seed)

  def walk(tree: Mapping, path: tuple) -> dict:
    out = {}
    for name in sorted(tree):
      leaf = tree[name]
      if isinstance(leaf, Mapping):
        out[name] = walk(leaf, path + (name,))
        continue
      shape = tuple(leaf.shape)
      if name in ("kernel", "query_tokens"):
        value = gen.normal(0.0, initializer_range, shape)
      elif name == "scale":
        value = np.ones(shape)
      elif name == "bias":
        value = np.zeros(shape)
      else:
        raise ValueError(f"qformer init_params: no rule for {'/'.join(path + (name,))}")
      out[name] = value.astype(np.float32)
    return out

  return walk(shapes, ())


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion (transformers Blip2Model / Blip2ForConditionalGeneration layout).

_OWN_PREFIXES = ("qformer.", "language_projection.")
_OTHER_PREFIXES = ("vision_model.", "language_model.")


def qformer_params_from_state_dict(config: QFormerConfig, state_dict: Mapping[str, np.ndarray],
                                   *, param_dtype: Any = jnp.float32) -> PyTree:
  """Converts Blip2Model tensors into `QFormerVisualTokens(config)` params.

  Reads `query_tokens` [1, Q, D], `qformer.*` and `language_projection.*` (when
  config.llm_hidden_size is set); the vision tower and the language model (`vision_model.*`,
  `language_model.*`) are ignored, as LLaFS replaces them.

  Raises:
    ValueError: missing `query_tokens`, unexpected / missing tensors or shape mismatches
      (naming them).
  """
  from fssjax.weights.diffusers import convert_state_dict  # pylint: disable=import-outside-toplevel
  if "query_tokens" not in state_dict:
    raise ValueError(f"qformer: no 'query_tokens' among the tensors ({sorted(state_dict)[:5]}"
                     f"...); expected a transformers Blip2Model checkpoint")
  qt = np.asarray(state_dict["query_tokens"], np.float32)
  expected_qt = (1, config.num_query_tokens, config.hidden_size)
  if qt.shape != expected_qt:
    raise ValueError(f"qformer: tensor 'query_tokens' has shape {qt.shape}; the config expects "
                     f"{expected_qt}")
  sd = {}
  for k, v in state_dict.items():
    if k == "query_tokens" or k.startswith(_OTHER_PREFIXES):
      continue
    if k.startswith("language_projection.") and config.llm_hidden_size is None:
      continue
    sd[k] = v
  module = QFormerVisualTokens(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, 1, config.encoder_hidden_size)))["params"]
  shapes = {k: v for k, v in shapes.items() if k != "query_tokens"}
  params = convert_state_dict(sd, shapes, component="qformer", param_dtype=param_dtype)
  params["query_tokens"] = jnp.asarray(qt.astype(np.dtype(param_dtype)))
  return params


def load_qformer(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 allow_pickle: bool = False, **config_overrides
                 ) -> Tuple[QFormerVisualTokens, PyTree]:
  """Loads the Q-Former part of a BLIP-2 directory (config.json + model.safetensors).

  Returns:
    (QFormerVisualTokens, params).

  Raises:
    FileNotFoundError: no config.json or no weights. ValueError: see `qformer_params_from_
    state_dict` and `QFormerConfig.from_transformers`.
  """
  from fssjax.weights.diffusers import read_config, read_state_dict  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory; expected a BLIP-2 checkpoint directory "
                            f"with config.json and model.safetensors")
  config = QFormerConfig.from_transformers(read_config(path), **config_overrides)
  sd = read_state_dict(path, "model", allow_pickle=allow_pickle)
  params = qformer_params_from_state_dict(config, sd, param_dtype=param_dtype)
  return QFormerVisualTokens(config, dtype=dtype, param_dtype=param_dtype), params
