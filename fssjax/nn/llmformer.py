"""LLMFormer's network (Shi, Dao, Cai, "LLMFormer: Large Language Model for Open-Vocabulary
Semantic Segmentation", IJCV 2024), NHWC. No code was released; where the paper is silent the
choices are ours and are marked (ours) below.

Pipeline (`LLMFormerModel`):

  image [B, H, W, 3] -> vision encoder (`ResNetFeatures`: torchvision names, res2..res5 at
  strides 4, 8, 16, 32) -> Mask2Former pixel decoder (multi-scale deformable attention,
  `fssjax.nn.mask2former.Mask2FormerPixelDecoder`) -> masked-attention transformer decoder
  with learned queries (`LLMFormerTransformerModule`: Mask2Former's `Mask2FormerTransformerModule`
  with the same parameter names, plus the three prior attentions in every layer) -> per layer:
  mask logits [B, Q, H/4, W/4] and class logits [B, Q, C + 1] against text embeddings of the
  C candidate class names (`OpenVocabularyClassifier`), the last column = no object.

The priors of each image (objects, their attributes, relations between objects; parsed from a
description of the image, `fssjax.priors.scene_graph`) enter as text embeddings (`Priors`:
padded arrays with validity masks; MiniLM, 384-d, by default). The three attentions, each
switchable (`LLMFormerConfig.semantic_attention` / `scaled_visual_attention` /
`relation_attention`; all off = Mask2Former's decoder exactly, same parameters, same output):

  * **semantic attention** (`SemanticAttention`): the queries (mask embeddings) cross-attend
    to the prior tokens: every object-name embedding and every attribute embedding, projected
    to the decoder width, with a learned type embedding (object / attribute) (ours: the
    attribute token also adds its owner object's projected name), residual + LayerNorm;
  * **scaled visual attention** (`ScaledVisualAttention`): an attribute embedding per mask
    (the query cross-attends to the attribute tokens), an MLP that scores the three feature
    scales of the pixel decoder from [query, attribute embedding], and the mask attends to the
    selected scale. Ours: the selection is the softmax of the scores (soft, differentiable;
    `hard_scale_selection=True` takes the argmax at inference), and the cross-attention weights
    are shared across scales (keys = scale features + sine positions + a level embedding);
  * **relation attention** (`RelationAttention`): the relation graph is mapped to the masks
    through a soft assignment of each query to the prior objects (softmax over the objects of
    projected query . projected object name); each relation triplet's embedding gives per-head
    weights for its (subject -> object) edge and for the reverse edge; the bias
    A G A^T [B, heads, Q, Q] is added to the logits of the queries' self-attention in that
    layer (Mask2Former's `self_attn_bias` hook).

Order inside decoder layer l (ours): semantic attention, scaled visual attention, then the
Mask2Former layer (masked cross-attention to scale l mod 3, self-attention with the relation
bias, FFN). An image with no prior tokens of a kind leaves the hidden state unchanged by that
attention (the output is zeroed where no key is valid).

Classification (ours where unspecified, following open-vocabulary mask classifiers such as
ZegFormer / FC-CLIP): each layer-normed query state -> `class_embed` (Dense to the text
dimension) -> L2-normalised; logits = exp(logit_scale) * cosine with the L2-normalised class
name embeddings, plus a learned `void_embedding` compared the same way as the no-object logit;
logit_scale is learned, initialised to log(1 / 0.07) and clipped at log(100) (CLIP's rule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn import mask2former as m2f
from fssjax.nn import resnet

Array = jax.Array


# ------------------------------------------------------------------------------------------
# Inputs.


class Priors(NamedTuple):
  """Prior embeddings of a batch, padded (float32 embeddings, bool validity).

  objects [B, N, D], object_valid [B, N]; attributes [B, A, D], attribute_owner int32 [B, A]
  (object index of each attribute), attribute_valid [B, A]; relations [B, R, D] (triplet
  embeddings "<subject> <relation> <object>"), relation_pairs int32 [B, R, 2] (subject,
  object), relation_valid [B, R].
  """

  objects: Array
  object_valid: Array
  attributes: Array
  attribute_owner: Array
  attribute_valid: Array
  relations: Array
  relation_pairs: Array
  relation_valid: Array

  @classmethod
  def empty(cls, batch: int, dim: int, n: int = 1, a: int = 1, r: int = 1) -> "Priors":
    """All-invalid priors (an image without a description)."""
    z = lambda k: jnp.zeros((batch, k, dim), jnp.float32)  # noqa: E731
    f = lambda k: jnp.zeros((batch, k), bool)  # noqa: E731
    return cls(z(n), f(n), z(a), jnp.zeros((batch, a), jnp.int32), f(a), z(r),
               jnp.zeros((batch, r, 2), jnp.int32), f(r))


PRIOR_KEYS = tuple(f"prior_{k}" for k in Priors._fields)


def priors_from_batch(batch, dim: int) -> Priors:
  """`Priors` from a batch's `prior_*` keys (`PRIOR_KEYS`), or empty priors when absent."""
  if PRIOR_KEYS[0] not in batch:
    b = batch["image"].shape[0]
    return Priors.empty(b, dim)
  return Priors(*(batch[k] for k in PRIOR_KEYS))


# ------------------------------------------------------------------------------------------
# Vision encoder.


class ResNetFeatures(nn.Module):
  """A torchvision-layout bottleneck ResNet returning res2..res5 (after each stage's last
  ReLU, as detectron2's ResNet feeds Mask2Former), strides 4, 8, 16, 32, channels
  4 * widths. Parameter names are `fssjax.nn.resnet.ResNet`'s (torchvision state-dict keys),
  so `fssjax.weights.torchvision` loads ImageNet weights.

  Attributes: as `fssjax.nn.resnet.ResNet` (stage_sizes, widths, stem_width, norm).
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = "batch"
  dtype: Any = None

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(4 * w for w in self.widths)

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    """images [B, H, W, 3] (ImageNet-normalised) -> 4 maps [B, H/s, W/s, 4 w_s]."""
    x = x.astype(self.dtype) if self.dtype is not None else x
    x = nn.Conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(resnet._norm(self.norm, self.stem_width, "bn1", self.dtype, jnp.float32)(x))  # pylint: disable=protected-access
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outs = []
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = nn.relu(resnet.Bottleneck(self.widths[i], stride=stride, norm=self.norm,
                                      dtype=self.dtype, name=f"layer{i + 1}_{j}")(x))
      outs.append(x.astype(jnp.float32))
    return outs


ENCODERS = {
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64,
                     norm="batch"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), widths=(64, 128, 256, 512), stem_width=64,
                      norm="batch"),
    # Small, GroupNorm, trained from scratch in the CPU demo (147,696 parameters, as
    # `fssjax.nn.resnet.resnet_tiny`).
    "resnet_tiny": dict(stage_sizes=(1, 1, 2, 1), widths=(8, 16, 32, 64), stem_width=16,
                        norm="group"),
}


# ------------------------------------------------------------------------------------------
# The three attentions.


def _mha(name: str, dim: int, heads: int) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=dim, out_features=dim,
                                         name=name)


def _masked_cross(attn, q, kv, valid):
  """Cross-attention of q [B, Q, C] to kv [B, K, C] with key validity [B, K]; rows whose
  image has no valid key give 0."""
  mask = valid[:, None, None, :]  # [B, 1, 1, K]
  out = attn(q, kv, kv, mask=jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], kv.shape[1])))
  return jnp.where(valid.any(-1)[:, None, None], out, 0.0)


class PriorProjection(nn.Module):
  """Prior embeddings [.., D] -> decoder width [.., C] (Dense + LayerNorm), shared by the
  attentions of a layer stack."""

  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=1e-5, name="norm")(nn.Dense(self.dim, name="proj")(x))


class SemanticAttention(nn.Module):
  """Queries cross-attend to object and attribute prior tokens (module docstring).

  Args of __call__: hidden [B, Q, C], query_pos [B, Q, C], object_tokens [B, N, C],
  object_valid [B, N], attribute_tokens [B, A, C] (owner already added), attribute_valid
  [B, A]. Returns [B, Q, C].
  """

  dim: int
  heads: int

  @nn.compact
  def __call__(self, hidden, query_pos, object_tokens, object_valid, attribute_tokens,
               attribute_valid):
    types = self.param("type_embed", nn.initializers.normal(0.02), (2, self.dim))
    tokens = jnp.concatenate([object_tokens + types[0], attribute_tokens + types[1]], 1)
    valid = jnp.concatenate([object_valid, attribute_valid], 1)
    out = _masked_cross(_mha("attn", self.dim, self.heads), hidden + query_pos, tokens, valid)
    return nn.LayerNorm(epsilon=1e-5, name="norm")(hidden + out)


class ScaledVisualAttention(nn.Module):
  """Attribute embedding per mask, MLP scale scores, attention to the selected scale.

  Args of __call__: hidden [B, Q, C], query_pos [B, Q, C], attribute_tokens [B, A, C],
  attribute_valid [B, A], level_features / level_pos: 3 arrays [B, S_l, C].
  Returns (hidden [B, Q, C], scale weights [B, Q, 3] float32).
  """

  dim: int
  heads: int
  hard: bool = False

  @nn.compact
  def __call__(self, hidden, query_pos, attribute_tokens, attribute_valid, level_features,
               level_pos):
    attr = _masked_cross(_mha("attribute_attn", self.dim, self.heads), hidden + query_pos,
                         attribute_tokens, attribute_valid)
    x = jnp.concatenate([hidden, attr], -1)
    x = nn.relu(nn.Dense(self.dim, name="scale_mlp_0")(x))
    scores = nn.Dense(len(level_features), name="scale_mlp_1")(x)
    weights = jax.nn.softmax(scores.astype(jnp.float32), -1)
    if self.hard:
      weights = jax.nn.one_hot(jnp.argmax(weights, -1), weights.shape[-1])
    level_embed = self.param("level_embed", nn.initializers.normal(0.02),
                             (len(level_features), self.dim))
    attn = _mha("visual_attn", self.dim, self.heads)
    q = hidden + attr + query_pos
    out = 0.0
    for l, (f, p) in enumerate(zip(level_features, level_pos)):
      o = attn(q, f + p + level_embed[l], f)
      out = out + weights[..., l:l + 1].astype(o.dtype) * o
    return nn.LayerNorm(epsilon=1e-5, name="norm")(hidden + out), weights


class RelationAttention(nn.Module):
  """The relation graph mapped to the masks as a self-attention bias (module docstring).

  Args of __call__: hidden [B, Q, C], object_tokens [B, N, C], object_valid [B, N],
  relation_tokens [B, R, C], relation_pairs int [B, R, 2], relation_valid [B, R].
  Returns (bias [B, heads, Q, Q] float32, assignment [B, Q, N]).
  """

  dim: int
  heads: int

  @nn.compact
  def __call__(self, hidden, object_tokens, object_valid, relation_tokens, relation_pairs,
               relation_valid):
    n = object_tokens.shape[1]
    q = nn.Dense(self.dim, name="query_proj")(hidden)
    k = nn.Dense(self.dim, name="object_proj")(object_tokens)
    logits = jnp.einsum("bqc,bnc->bqn", q, k) / math.sqrt(self.dim)
    logits = jnp.where(object_valid[:, None, :], logits, -1e9)
    assign = jax.nn.softmax(logits.astype(jnp.float32), -1)
    assign = jnp.where(object_valid.any(-1)[:, None, None], assign, 0.0)
    h = nn.relu(nn.Dense(self.dim, name="relation_mlp_0")(relation_tokens))
    w = nn.Dense(2 * self.heads, name="relation_mlp_1")(h).astype(jnp.float32)  # [B, R, 2H]
    w = w * relation_valid[..., None]
    s = jax.nn.one_hot(relation_pairs[..., 0], n)  # [B, R, N]
    o = jax.nn.one_hot(relation_pairs[..., 1], n)
    fwd = jnp.einsum("brh,brn,brm->bhnm", w[..., :self.heads], s, o)
    bwd = jnp.einsum("brh,brn,brm->bhnm", w[..., self.heads:], o, s)
    graph = fwd + bwd  # [B, H, N, N]
    bias = jnp.einsum("bqn,bhnm,bkm->bhqk", assign, graph, assign)
    return bias, assign


# ------------------------------------------------------------------------------------------
# Decoder.


@dataclasses.dataclass(frozen=True)
class LLMFormerConfig:
  """The network's configuration.

  Attributes:
    decoder: the Mask2Former pixel / transformer decoder sizes (`Mask2FormerConfig`).
    encoder: a key of `ENCODERS`.
    prior_dim: dimension of the prior text embeddings (MiniLM: 384).
    text_dim: dimension of the class-name text embeddings (MiniLM: 384).
    semantic_attention, scaled_visual_attention, relation_attention: the three switches.
    hard_scale_selection: argmax instead of softmax scale weights (inference only).
  """

  decoder: m2f.Mask2FormerConfig = m2f.Mask2FormerConfig()
  encoder: str = "resnet50"
  prior_dim: int = 384
  text_dim: int = 384
  semantic_attention: bool = True
  scaled_visual_attention: bool = True
  relation_attention: bool = True
  hard_scale_selection: bool = False
  dtype: Any = None

  @property
  def any_prior_attention(self) -> bool:
    return self.semantic_attention or self.scaled_visual_attention or self.relation_attention


class LLMFormerMaskedDecoder(nn.Module):
  """Mask2Former's `MaskedAttentionDecoder` (same child names: `layers_i`, `layernorm`,
  `mask_predictor`) with the prior attentions of each layer (`semantic_attn_i`,
  `scaled_visual_attn_i`, `relation_attn_i`; present only when switched on)."""

  config: LLMFormerConfig

  @nn.compact
  def __call__(self, query_features, query_pos, level_features, level_pos, mask_features,
               sizes, tokens: Optional[dict] = None):
    cfg = self.config
    dc = cfg.decoder
    e, heads = dc.hidden_dim, dc.num_attention_heads
    norm = m2f._ln("layernorm")  # pylint: disable=protected-access
    predictor = m2f.MaskPredictor(dc, name="mask_predictor")
    inter = norm(query_features)
    masks, attend = predictor(inter, mask_features, sizes[0])
    intermediate, all_masks, scale_weights, assignments = [inter], [masks], [], []
    hidden = query_features
    for i in range(dc.decoder_layers - 1):
      level = i % m2f.NUM_FEATURE_LEVELS
      if cfg.semantic_attention:
        hidden = SemanticAttention(e, heads, name=f"semantic_attn_{i}")(
            hidden, query_pos, tokens["objects"], tokens["object_valid"], tokens["attributes"],
            tokens["attribute_valid"])
      if cfg.scaled_visual_attention:
        hidden, w = ScaledVisualAttention(e, heads, cfg.hard_scale_selection,
                                          name=f"scaled_visual_attn_{i}")(
            hidden, query_pos, tokens["attributes"], tokens["attribute_valid"],
            level_features, level_pos)
        scale_weights.append(w)
      bias = None
      if cfg.relation_attention:
        bias, assign = RelationAttention(e, heads, name=f"relation_attn_{i}")(
            hidden, tokens["objects"], tokens["object_valid"], tokens["relations"],
            tokens["relation_pairs"], tokens["relation_valid"])
        assignments.append(assign)
      attend = attend | ~attend.any(-1, keepdims=True)
      hidden = m2f.MaskedAttentionDecoderLayer(dc, name=f"layers_{i}")(
          hidden, level_features[level], level_pos[level], query_pos, attend[:, None], bias)
      inter = norm(hidden)
      masks, attend = predictor(inter, mask_features, sizes[(i + 1) % m2f.NUM_FEATURE_LEVELS])
      intermediate.append(inter)
      all_masks.append(masks)
    return dict(last_hidden_state=hidden, intermediate_hidden_states=tuple(intermediate),
                masks_queries_logits=tuple(all_masks), scale_weights=tuple(scale_weights),
                relation_assignments=tuple(assignments))


class LLMFormerTransformerModule(nn.Module):
  """`Mask2FormerTransformerModule` (same parameters: `level_embed`, `queries_embedder`,
  `queries_features`, `input_projections_i`, `decoder/...`) with the prior attentions, and
  `prior_proj` (prior embeddings -> decoder width) when any attention is on.

  __call__(multi_scale_features (3 maps, coarsest first), mask_features, priors: `Priors`)
  -> the decoder's dict (see `LLMFormerMaskedDecoder`).
  """

  config: LLMFormerConfig
  in_features: int

  @nn.compact
  def __call__(self, multi_scale_features, mask_features, priors: Optional[Priors] = None):
    cfg = self.config
    dc = cfg.decoder
    e = dc.hidden_dim
    b = mask_features.shape[0]
    level_embed = nn.Embed(m2f.NUM_FEATURE_LEVELS, e, embedding_init=m2f.EMBED_INIT,
                           name="level_embed")
    feats, pos, sizes = [], [], []
    for i in range(m2f.NUM_FEATURE_LEVELS):
      x = multi_scale_features[i]
      _, h, w, _ = x.shape
      sizes.append((h, w))
      pos.append(m2f.sine_position_embedding(b, h, w, e // 2).reshape(b, h * w, e))
      if self.in_features != e or dc.enforce_input_projection:
        x = nn.Conv(e, (1, 1), name=f"input_projections_{i}")(x)
      feats.append(x.reshape(b, h * w, e) + level_embed.embedding[i][None, None])
    query_pos = nn.Embed(dc.num_queries, e, embedding_init=m2f.EMBED_INIT,
                         name="queries_embedder").embedding
    learned = nn.Embed(dc.num_queries, e, embedding_init=m2f.EMBED_INIT,
                       name="queries_features").embedding
    query_pos = jnp.broadcast_to(query_pos[None], (b,) + query_pos.shape)
    query_features = jnp.broadcast_to(learned[None], (b,) + learned.shape)
    tokens = None
    if cfg.any_prior_attention:
      if priors is None:
        priors = Priors.empty(b, cfg.prior_dim)
      proj = PriorProjection(e, name="prior_proj")
      objects = proj(priors.objects)
      owner = jnp.take_along_axis(objects, priors.attribute_owner[..., None].clip(0), axis=1)
      tokens = dict(objects=objects, object_valid=priors.object_valid,
                    attributes=proj(priors.attributes) + owner,
                    attribute_valid=priors.attribute_valid,
                    relations=proj(priors.relations), relation_pairs=priors.relation_pairs,
                    relation_valid=priors.relation_valid)
    return LLMFormerMaskedDecoder(cfg, name="decoder")(query_features, query_pos, feats, pos,
                                                       mask_features, sizes, tokens)


class OpenVocabularyClassifier(nn.Module):
  """Query states [B, Q, C] x class-name embeddings [K, D] (one list for the batch) or
  [B, K, D] (one list per example) -> logits [B, Q, K + 1] (last = no object):
  exp(logit_scale) * cosine (module docstring)."""

  text_dim: int

  @nn.compact
  def __call__(self, states, text_embeddings):
    x = nn.Dense(self.text_dim, name="class_embed")(states).astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    void = self.param("void_embedding", nn.initializers.normal(0.02), (self.text_dim,))
    t = jnp.asarray(text_embeddings, jnp.float32)
    if t.ndim not in (2, 3):
      raise ValueError(f"OpenVocabularyClassifier: text embeddings of shape {t.shape}; "
                       "expected [K, D] or [B, K, D]")
    t = jnp.concatenate([t, jnp.broadcast_to(void, t.shape[:-2] + (1, self.text_dim))], -2)
    t = t / (jnp.linalg.norm(t, axis=-1, keepdims=True) + 1e-6)
    scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())
    scale = jnp.exp(jnp.minimum(scale, math.log(100.0)))
    eq = "bqd,kd->bqk" if t.ndim == 2 else "bqd,bkd->bqk"
    return scale * jnp.einsum(eq, x, t, precision=jax.lax.Precision.HIGHEST)


class LLMFormerModel(nn.Module):
  """The whole network (module docstring). Children: `encoder` (`ResNetFeatures`),
  `pixel_decoder` (`Mask2FormerPixelDecoder`), `transformer_module`
  (`LLMFormerTransformerModule`), `classifier` (`OpenVocabularyClassifier`).

  __call__(images [B, H, W, 3] float32, text_embeddings [K, text_dim] or [B, K, text_dim],
  priors: `Priors` or None) -> dict(class_logits: tuple per decoder output of [B, Q, K + 1] float32,
  mask_logits: tuple of [B, Q, H/4, W/4], scale_weights, relation_assignments).
  H and W must be multiples of 32.
  """

  config: LLMFormerConfig

  def setup(self):
    cfg = self.config
    enc = ENCODERS[cfg.encoder]
    self.encoder = ResNetFeatures(**enc, dtype=cfg.dtype)
    self.pixel_decoder = m2f.Mask2FormerPixelDecoder(cfg.decoder, self.encoder.channels)
    self.transformer_module = LLMFormerTransformerModule(cfg, cfg.decoder.feature_size)
    self.classifier = OpenVocabularyClassifier(cfg.text_dim)

  def __call__(self, images, text_embeddings, priors: Optional[Priors] = None):
    h, w = images.shape[1:3]
    if h % 32 or w % 32:
      raise ValueError(f"LLMFormerModel: image size {h}x{w} must be a multiple of 32")
    feats = self.encoder(images)
    mask_features, multi, _ = self.pixel_decoder(feats)
    out = self.transformer_module(multi, mask_features, priors)
    logits = tuple(self.classifier(s, text_embeddings) for s in out["intermediate_hidden_states"])
    return dict(class_logits=logits, mask_logits=out["masks_queries_logits"],
                scale_weights=out["scale_weights"],
                relation_assignments=out["relation_assignments"])
