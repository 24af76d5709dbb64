"""Mask2Former's pixel decoder and masked-attention transformer decoder (Cheng et al.,
"Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022), NHWC.

Follows transformers' PyTorch Mask2Former (`transformers/models/mask2former/
modeling_mask2former.py`) module for module, with its parameter names, so that a Hugging Face
`Mask2FormerModel` state dict converts by renaming (`params_from_state_dict`):

  * `Mask2FormerPixelDecoder(config, feature_channels)`: the multi-scale deformable-attention
    encoder (Zhu et al., Deformable DETR, ICLR 2021; `fssjax.nn.deformable_attention`) over the
    three coarsest backbone maps (1x1 conv + GroupNorm(32) projections `input_projections_i_*`,
    sine position embeddings + `level_embed`, `encoder.layers_i` post-norm layers with
    `self_attn` / `self_attn_layer_norm` / `fc1` / `fc2` / `final_layer_norm`), then an FPN
    path down to `common_stride` (`adapter_k` lateral 1x1 conv + GN, bilinear upsampling,
    `layer_k` 3x3 conv + GN + ReLU) and `mask_projection`. Returns (mask_features
    [B, H/4, W/4, mask_feature_size], multi_scale_features: 3 maps [B, h_l, w_l, feature_size]
    coarse to fine, encoder output [B, S, feature_size]).
  * `Mask2FormerTransformerModule(config, in_features)`: learned queries (`queries_features`:
    content, `queries_embedder`: positions), `level_embed`, optional 1x1 `input_projections`,
    and `decoder` (`Mask2FormerMaskedAttentionDecoder`): layer l cross-attends (`cross_attn`,
    PyTorch `nn.MultiheadAttention` names `in_proj_weight` [3C, C] in PyTorch layout,
    `in_proj_bias`, `out_proj`) to level l mod 3 with the *masked attention* of the paper
    (a query only sees the pixels where its previous mask prediction is > 0.5; a query whose
    mask is empty sees all), then self-attends (`self_attn`: `q_proj` / `k_proj` / `v_proj` /
    `out_proj`), then an FFN; after the initial queries and after every layer the shared
    `layernorm` and `mask_predictor` (3-layer MLP `mask_embedder_i_0` -> dot product with the
    mask features) give the masks. Returns dict(last_hidden_state [B, Q, C],
    intermediate_hidden_states: decoder_layers arrays [B, Q, C] (layer-normed),
    masks_queries_logits: decoder_layers arrays [B, Q, H/4, W/4]).

Hooks for prior-conditioned decoders (LLMFormer): `query_features` replaces the learned content
queries, `self_attn_bias` adds logits to every layer's query self-attention (None / zeros =
Mask2Former).

Classification is not here: Mask2Former's `class_predictor` is one Dense on the intermediate
states; an open-vocabulary head scores them against text embeddings instead.

Dropout is not implemented (Mask2Former trains with dropout 0.0). Pre-norm decoder layers
(`pre_norm=True`) are supported; padding masks are not (whole images, no padding).

Parity: tests/test_mask2former.py against transformers' PyTorch modules on tiny random
configurations (fixtures by scripts/make_mask2former_fixtures.py, float32, 1e-4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn import deformable_attention as da
from fssjax.nn.ops import resize_bilinear

Array = jax.Array
NUM_FEATURE_LEVELS = 3
# Query (content and position) and level embeddings: N(0, 1), PyTorch's `nn.Embedding`
# default, kept by the original Mask2Former and by transformers' `_init_weights`. (Flax's
# `nn.Embed` default is N(0, 1 / width): with it the decoder layers' attention outputs swamp
# the queries' identity and every query collapses onto the same mask and class.)
EMBED_INIT = nn.initializers.normal(1.0)


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig:
  """The fields of transformers' `Mask2FormerConfig` that the decoder uses (same names and
  defaults: the published Swin / ResNet models)."""

  feature_size: int = 256
  mask_feature_size: int = 256
  hidden_dim: int = 256
  encoder_feedforward_dim: int = 1024
  encoder_layers: int = 6
  decoder_layers: int = 10
  num_attention_heads: int = 8
  dim_feedforward: int = 2048
  pre_norm: bool = False
  enforce_input_projection: bool = False
  common_stride: int = 4
  num_queries: int = 100
  feature_strides: tuple[int, ...] = (4, 8, 16, 32)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Mask2FormerConfig":
    """From a config.json dict (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "feature_strides" in kw:
      kw["feature_strides"] = tuple(kw["feature_strides"])
    return cls(**kw)


def sine_position_embedding(batch: int, height: int, width: int, num_pos_feats: int,
                            temperature: float = 10000.0, normalize: bool = True,
                            scale: float = 2 * math.pi, dtype=jnp.float32) -> Array:
  """DETR's sine position embedding of an unpadded map (`Mask2FormerSinePositionEmbedding`).

  Returns:
    [B, H, W, 2 * num_pos_feats]: the y half (sin, cos interleaved), then the x half.
  """
  y = jnp.arange(1, height + 1, dtype=jnp.float32)[:, None] * jnp.ones((1, width))
  x = jnp.arange(1, width + 1, dtype=jnp.float32)[None, :] * jnp.ones((height, 1))
  if normalize:
    eps = 1e-6
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = jnp.asarray(temperature ** (2 * np.floor(dim_t / 2) / num_pos_feats), jnp.float32)
  px = x[..., None] / dim_t
  py = y[..., None] / dim_t
  px = jnp.stack([jnp.sin(px[..., 0::2]), jnp.cos(px[..., 1::2])], -1).reshape(height, width, -1)
  py = jnp.stack([jnp.sin(py[..., 0::2]), jnp.cos(py[..., 1::2])], -1).reshape(height, width, -1)
  pos = jnp.concatenate([py, px], -1)
  return jnp.broadcast_to(pos[None], (batch, height, width, 2 * num_pos_feats)).astype(dtype)


def _ln(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, name=name)


def _gn(name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-5, name=name)


class PixelDecoderEncoderLayer(nn.Module):
  """`Mask2FormerPixelDecoderEncoderLayer`: deformable self-attention + FFN, post-norm."""

  config: Mask2FormerConfig

  @nn.compact
  def __call__(self, hidden, position_embeddings, reference_points, spatial_shapes):
    cfg = self.config
    c = cfg.feature_size
    residual = hidden
    hidden = da.MSDeformAttn(c, cfg.num_attention_heads, NUM_FEATURE_LEVELS, 4,
                             name="self_attn")(hidden, hidden, reference_points, spatial_shapes,
                                               position_embeddings=position_embeddings)
    hidden = _ln("self_attn_layer_norm")(residual + hidden)
    residual = hidden
    hidden = nn.relu(nn.Dense(cfg.encoder_feedforward_dim, name="fc1")(hidden))
    hidden = nn.Dense(c, name="fc2")(hidden)
    return _ln("final_layer_norm")(residual + hidden)


class PixelDecoderEncoderOnly(nn.Module):
  """`Mask2FormerPixelDecoderEncoderOnly`: `encoder_layers` layers (`layers_i`)."""

  config: Mask2FormerConfig

  @nn.compact
  def __call__(self, inputs_embeds, position_embeddings, spatial_shapes, valid_ratios=None):
    ref = da.reference_points(spatial_shapes, valid_ratios, batch_size=inputs_embeds.shape[0])
    hidden = inputs_embeds
    for i in range(self.config.encoder_layers):
      hidden = PixelDecoderEncoderLayer(self.config, name=f"layers_{i}")(
          hidden, position_embeddings, ref, spatial_shapes)
    return hidden


class Mask2FormerPixelDecoder(nn.Module):
  """`Mask2FormerPixelDecoder` (see the module docstring).

  Attributes:
    config: the decoder configuration.
    feature_channels: channels of the backbone maps, finest first (strides
      `config.feature_strides`).
  """

  config: Mask2FormerConfig
  feature_channels: tuple[int, ...]

  @nn.compact
  def __call__(self, features: Sequence[Array]):
    """Args: features: the backbone maps [B, H/s, W/s, C_s], finest first (len(strides)).

    Returns:
      (mask_features [B, h0, w0, mask_feature_size] at `common_stride`, multi_scale_features
      (3 maps [B, h, w, feature_size], coarsest first), encoder_last_hidden_state [B, S, C]).

    Raises:
      ValueError: a feature list whose length or channels do not match the module.
    """
    cfg = self.config
    c = cfg.feature_size
    if len(features) != len(self.feature_channels):
      raise ValueError(f"Mask2FormerPixelDecoder got {len(features)} feature maps; expected "
                       f"{len(self.feature_channels)} (channels {self.feature_channels})")
    for i, (f, ch) in enumerate(zip(features, self.feature_channels)):
      if f.ndim != 4 or f.shape[-1] != ch:
        raise ValueError(f"feature map {i} has shape {tuple(f.shape)}; expected [B, H, W, {ch}]")
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (NUM_FEATURE_LEVELS, c))
    embeds, pos = [], []
    for level, x in enumerate(list(features)[::-1][:NUM_FEATURE_LEVELS]):
      y = nn.Conv(c, (1, 1), name=f"input_projections_{level}_0")(x)
      embeds.append(_gn(f"input_projections_{level}_1")(y))
      b, h, w, _ = x.shape
      pos.append(sine_position_embedding(b, h, w, c // 2).reshape(b, h * w, c)
                 + level_embed[level][None, None])
    flat, shapes, _ = da.flatten_levels(embeds)
    pos_flat = jnp.concatenate(pos, 1)
    hidden = PixelDecoderEncoderOnly(cfg, name="encoder")(flat, pos_flat, shapes)
    outputs = da.unflatten_levels(hidden, shapes)
    strides = cfg.feature_strides[-NUM_FEATURE_LEVELS:]
    num_fpn = int(np.log2(min(strides)) - np.log2(cfg.common_stride))
    for j in range(num_fpn - 1, -1, -1):  # features[j] uses adapter_{j+1} / layer_{j+1}
      lateral = nn.Conv(c, (1, 1), use_bias=False, name=f"adapter_{j + 1}_0")(features[j])
      lateral = _gn(f"adapter_{j + 1}_1")(lateral)
      up = resize_bilinear(outputs[-1], lateral.shape[1:3], align_corners=False)
      out = nn.Conv(c, (3, 3), padding=1, use_bias=False, name=f"layer_{j + 1}_0")(lateral + up)
      outputs.append(nn.relu(_gn(f"layer_{j + 1}_1")(out)))
    mask_features = nn.Conv(cfg.mask_feature_size, (1, 1), name="mask_projection")(outputs[-1])
    return mask_features, tuple(outputs[:NUM_FEATURE_LEVELS]), hidden


class TorchMultiheadAttention(nn.Module):
  """PyTorch `nn.MultiheadAttention` (batch first here) with its parameter names:
  `in_proj_weight` [3C, C] (PyTorch layout: q, k, v rows), `in_proj_bias` [3C], `out_proj`."""

  embed_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, query, key, value, attend: Optional[Array] = None):
    """query [B, T, C], key / value [B, S, C]; attend: bool [B, N, T, S] (True = may attend)."""
    e, n = self.embed_dim, self.num_heads
    w = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * e, e))
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,))
    hi = jax.lax.Precision.HIGHEST
    q = jnp.matmul(query, w[:e].T, precision=hi) + bias[:e]
    k = jnp.matmul(key, w[e:2 * e].T, precision=hi) + bias[e:2 * e]
    v = jnp.matmul(value, w[2 * e:].T, precision=hi) + bias[2 * e:]
    b, t, _ = q.shape
    s = k.shape[1]
    heads = lambda a, m: a.reshape(b, m, n, e // n)  # noqa: E731
    out = jax.nn.dot_product_attention(heads(q, t), heads(k, s), heads(v, s), mask=attend)
    return nn.Dense(e, name="out_proj")(out.reshape(b, t, e))


class Mask2FormerAttention(nn.Module):
  """`Mask2FormerAttention` as self-attention: q = k = x + pos, v = x (DETR)."""

  embed_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, hidden, position_embeddings=None, bias=None):
    """hidden [B, Q, C]; bias: optional additive logits broadcastable to [B, N, Q, Q]."""
    e, n = self.embed_dim, self.num_heads
    qk = hidden if position_embeddings is None else hidden + position_embeddings
    q = nn.Dense(e, name="q_proj")(qk)
    k = nn.Dense(e, name="k_proj")(qk)
    v = nn.Dense(e, name="v_proj")(hidden)
    b, t, _ = q.shape
    heads = lambda a: a.reshape(b, t, n, e // n)  # noqa: E731
    if bias is not None:
      bias = jnp.broadcast_to(jnp.asarray(bias, q.dtype), (b, n, t, t))
    out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), bias=bias)
    return nn.Dense(e, name="out_proj")(out.reshape(b, t, e))


class MaskedAttentionDecoderLayer(nn.Module):
  """`Mask2FormerMaskedAttentionDecoderLayer`: masked cross-attention, self-attention, FFN."""

  config: Mask2FormerConfig

  @nn.compact
  def __call__(self, hidden, level_features, level_pos, query_pos, attend, self_attn_bias=None):
    cfg = self.config
    e = cfg.hidden_dim
    cross = TorchMultiheadAttention(e, cfg.num_attention_heads, name="cross_attn")
    self_attn = Mask2FormerAttention(e, cfg.num_attention_heads, name="self_attn")
    ln_cross, ln_self = _ln("cross_attn_layer_norm"), _ln("self_attn_layer_norm")
    ln_final = _ln("final_layer_norm")
    fc1, fc2 = nn.Dense(cfg.dim_feedforward, name="fc1"), nn.Dense(e, name="fc2")
    if cfg.pre_norm:
      h = ln_cross(hidden)
      hidden = hidden + cross(h + query_pos, level_features + level_pos, level_features, attend)
      hidden = hidden + self_attn(ln_self(hidden), query_pos, self_attn_bias)
      return hidden + fc2(nn.relu(fc1(ln_final(hidden))))
    hidden = ln_cross(hidden + cross(hidden + query_pos, level_features + level_pos,
                                     level_features, attend))
    hidden = ln_self(hidden + self_attn(hidden, query_pos, self_attn_bias))
    return ln_final(hidden + fc2(nn.relu(fc1(hidden))))


class MaskPredictor(nn.Module):
  """`Mask2FormerMaskPredictor`: masks = MLP(queries) . mask features, and the next layer's
  attention mask (True = may attend: sigmoid(mask resized to the level) >= 0.5)."""

  config: Mask2FormerConfig

  @nn.compact
  def __call__(self, queries, mask_features, target_size):
    cfg = self.config
    x = queries
    for i in range(3):
      x = nn.Dense(cfg.mask_feature_size if i == 2 else cfg.hidden_dim,
                   name=f"mask_embedder_{i}_0")(x)
      if i < 2:
        x = nn.relu(x)
    masks = jnp.einsum("bqc,bhwc->bqhw", x, mask_features, precision=jax.lax.Precision.HIGHEST)
    small = resize_bilinear(masks, target_size, axes=(2, 3), align_corners=False)
    attend = jax.lax.stop_gradient(jax.nn.sigmoid(small) >= 0.5)
    return masks, attend.reshape(attend.shape[0], attend.shape[1], -1)


class MaskedAttentionDecoder(nn.Module):
  """`Mask2FormerMaskedAttentionDecoder`: `decoder_layers - 1` layers (`layers_i`),
  `layernorm`, `mask_predictor`."""

  config: Mask2FormerConfig

  @nn.compact
  def __call__(self, query_features, query_pos, level_features, level_pos, mask_features,
               sizes, self_attn_bias=None):
    cfg = self.config
    norm = _ln("layernorm")
    predictor = MaskPredictor(cfg, name="mask_predictor")
    inter = norm(query_features)
    masks, attend = predictor(inter, mask_features, sizes[0])
    intermediate, all_masks = [inter], [masks]
    hidden = query_features
    for i in range(cfg.decoder_layers - 1):
      level = i % NUM_FEATURE_LEVELS
      # A query whose mask is empty attends everywhere (else its softmax has no support).
      attend = attend | ~attend.any(-1, keepdims=True)
      hidden = MaskedAttentionDecoderLayer(cfg, name=f"layers_{i}")(
          hidden, level_features[level], level_pos[level], query_pos, attend[:, None],
          self_attn_bias)
      inter = norm(hidden)
      masks, attend = predictor(inter, mask_features, sizes[(i + 1) % NUM_FEATURE_LEVELS])
      intermediate.append(inter)
      all_masks.append(masks)
    return dict(last_hidden_state=hidden, intermediate_hidden_states=tuple(intermediate),
                masks_queries_logits=tuple(all_masks))


class Mask2FormerTransformerModule(nn.Module):
  """`Mask2FormerTransformerModule`: learned queries + the masked-attention decoder.

  Attributes:
    config: the decoder configuration.
    in_features: channels of the multi-scale features (the pixel decoder's feature_size).
  """

  config: Mask2FormerConfig
  in_features: int

  @nn.compact
  def __call__(self, multi_scale_features: Sequence[Array], mask_features: Array,
               query_features: Optional[Array] = None,
               self_attn_bias: Optional[Array] = None):
    """Args:
      multi_scale_features: 3 maps [B, h_l, w_l, in_features] (coarsest first, the pixel
        decoder's order).
      mask_features: [B, H, W, mask_feature_size].
      query_features: optional [B, Q, hidden_dim] content queries replacing the learned
        `queries_features` (an LLM-prior variant can inject its own); positions stay learned.
      self_attn_bias: optional additive attention logits for the queries' self-attention in
        every layer, broadcastable to [B, heads, Q, Q] (LLMFormer's relation attention adds
        its relation-graph term there); None = Mask2Former.

    Returns:
      the decoder's dict (see `MaskedAttentionDecoder`).

    Raises:
      ValueError: inputs whose count or shapes disagree with the module (the message names
        the input, its shape and the expected one).
    """
    cfg = self.config
    e = cfg.hidden_dim
    if mask_features.ndim != 4 or mask_features.shape[-1] != cfg.mask_feature_size:
      raise ValueError(f"Mask2FormerTransformerModule: mask_features has shape "
                       f"{tuple(mask_features.shape)}; expected [B, H, W, mask_feature_size="
                       f"{cfg.mask_feature_size}] (NHWC)")
    b = mask_features.shape[0]
    if len(multi_scale_features) != NUM_FEATURE_LEVELS:
      raise ValueError(f"Mask2FormerTransformerModule: {len(multi_scale_features)} "
                       f"multi-scale feature maps; expected {NUM_FEATURE_LEVELS} (the pixel "
                       "decoder's, coarsest first)")
    for i, x in enumerate(multi_scale_features):
      if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != self.in_features:
        raise ValueError(f"Mask2FormerTransformerModule: multi-scale feature map {i} has shape "
                         f"{tuple(x.shape)}; expected [B={b}, h, w, {self.in_features}] (NHWC)")
    if query_features is not None and tuple(query_features.shape) != (b, cfg.num_queries, e):
      raise ValueError(f"Mask2FormerTransformerModule: query_features has shape "
                       f"{tuple(query_features.shape)}; expected [B, num_queries, hidden_dim] = "
                       f"{(b, cfg.num_queries, e)} (the query positions are learned per query)")
    if self_attn_bias is not None:
      want = (b, cfg.num_attention_heads, cfg.num_queries, cfg.num_queries)
      shape = tuple(self_attn_bias.shape)
      if len(shape) > 4 or any(d not in (1, w) for d, w in zip(shape[::-1], want[::-1])):
        raise ValueError(f"Mask2FormerTransformerModule: self_attn_bias has shape {shape}; "
                         f"expected a shape broadcastable to [B, heads, Q, Q] = {want}")
    level_embed = nn.Embed(NUM_FEATURE_LEVELS, e, embedding_init=EMBED_INIT,
                           name="level_embed")
    feats, pos, sizes = [], [], []
    for i in range(NUM_FEATURE_LEVELS):
      x = multi_scale_features[i]
      _, h, w, _ = x.shape
      sizes.append((h, w))
      pos.append(sine_position_embedding(b, h, w, e // 2).reshape(b, h * w, e))
      if self.in_features != e or cfg.enforce_input_projection:
        x = nn.Conv(e, (1, 1), name=f"input_projections_{i}")(x)
      feats.append(x.reshape(b, h * w, e) + level_embed.embedding[i][None, None])
    query_pos = nn.Embed(cfg.num_queries, e, embedding_init=EMBED_INIT,
                         name="queries_embedder").embedding
    learned = nn.Embed(cfg.num_queries, e, embedding_init=EMBED_INIT,
                       name="queries_features").embedding
    query_pos = jnp.broadcast_to(query_pos[None], (b,) + query_pos.shape)
    if query_features is None:
      query_features = jnp.broadcast_to(learned[None], (b,) + learned.shape)
    return MaskedAttentionDecoder(cfg, name="decoder")(query_features, query_pos, feats, pos,
                                                       mask_features, sizes, self_attn_bias)


def semantic_inference(class_logits: Array, mask_logits: Array) -> Array:
  """Mask2Former's semantic segmentation from masks and classes (`semantic_inference` of
  facebookresearch/Mask2Former `maskformer_model.py`): score of class c at a pixel =
  sum over queries of softmax(class_logits)[c] * sigmoid(mask), the no-object class dropped.

  Args:
    class_logits: [B, Q, C + 1] (last = no object).
    mask_logits: [B, Q, H, W].

  Returns:
    [B, H, W, C] float32 (not normalised; argmax gives the label map).
  """
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)[..., :-1]
  masks = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  return jnp.einsum("bqc,bqhw->bhwc", probs, masks, precision=jax.lax.Precision.HIGHEST)


_RAW_LEAVES = ("in_proj_weight", "in_proj_bias", "level_embed")


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], expected, *,
                           component: str = "mask2former"):
  """A PyTorch state dict of one of the modules above (HF key names, without the module's own
  prefix) -> Flax params matching `expected` (e.g. `jax.eval_shape(module.init, ...)['params']`).

  Linear / conv weights are transposed to Flax layout; `in_proj_weight`, `in_proj_bias` and the
  pixel decoder's `level_embed` keep their PyTorch layout and names.

  Raises:
    ValueError: unexpected keys, missing parameters or shape mismatches (naming them).
  """
  from fssjax.weights.diffusers import convert_state_dict  # pylint: disable=import-outside-toplevel
  flat_expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
  raw, rest = {}, {}
  for key, value in state_dict.items():
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _RAW_LEAVES:
      parts = key.split(".")
      path, buf = [], parts[:-1]
      for p in buf:
        if p.isdigit() and path:
          path[-1] = f"{path[-1]}_{p}"
        else:
          path.append(p)
      full = tuple(path) + (leaf,)
      if full not in flat_expected:
        raise ValueError(f"{component}: tensor {key!r} has no Flax parameter {'/'.join(full)}")
      if tuple(np.shape(value)) != tuple(flat_expected[full].shape):
        raise ValueError(f"{component}: tensor {key!r} has shape {np.shape(value)}; expected "
                         f"{tuple(flat_expected[full].shape)}")
      raw[full] = jnp.asarray(np.asarray(value, np.float32))
    else:
      rest[key] = value
  others = {k: v for k, v in flat_expected.items() if k not in raw}
  converted = convert_state_dict(rest, flax.traverse_util.unflatten_dict(others),
                                 component=component)
  flat = flax.traverse_util.flatten_dict(converted)
  flat.update(raw)
  return flax.traverse_util.unflatten_dict(flat)
