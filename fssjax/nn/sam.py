"""Segment Anything (SAM) in Flax Linen: ViT image encoder, prompt encoder and mask decoder.

Paper: Kirillov et al., "Segment Anything", ICCV 2023. Code followed: the official
facebookresearch/segment-anything (`modeling/image_encoder.py`, `prompt_encoder.py`,
`mask_decoder.py`, `transformer.py`) and Hugging Face transformers' `models/sam/modeling_sam.py`
(`SamModel`), whose parameter names and config fields this module uses, so loading a
checkpoint (`fssjax.weights.sam`) is a renaming. Layout is NHWC throughout.

Modules and shapes (h = w = image_size / patch_size, D = the prompt/decoder width, 256 in
the published models):

  SamVisionEncoder(vision_config)(pixel_values [B, H, W, 3] float, output_hidden_states=False)
    -> (image_embeddings [B, h, w, output_channels],
        hidden_states: () or a tuple with the output of every block, each [B, h, w, hidden]).
    Patch embedding (a p x p convolution with stride p), absolute position embedding
    `pos_embed` [1, h, w, hidden], `num_hidden_layers` pre-norm blocks whose attention is
    windowed (`window_size` x `window_size` windows, the grid zero-padded to a multiple of
    the window) except at `global_attn_indexes` (attention over the whole grid), with the
    decomposed relative position tables `rel_pos_h` / `rel_pos_w` of MViTv2 (rows
    2 * size - 1; linearly interpolated, as `F.interpolate(mode='linear')`, when a table has
    another length), an MLP (`lin1`, exact GELU, `lin2`) and the neck (1x1 conv -> LayerNorm2d
    -> 3x3 conv -> LayerNorm2d, no conv biases). `pixel_values` are already normalised with
    SAM's pixel mean / std and padded to image_size x image_size (`preprocess`).
  SamPromptEncoder(prompt_encoder_config)(points=None, labels=None, boxes=None, masks=None)
    -> (sparse [B, N, D], dense [B, h, w, D]).
    points [B, P, 2] (x, y) pixel coordinates in the image_size frame; labels [B, P] int
    (1 foreground, 0 background, -1 not a point (padding: the `not_a_point_embed`), -10
    ignored (zero embedding), as transformers); without boxes a not-a-point is appended, as
    the official code does. boxes [B, 4] (x1, y1, x2, y2) add two corner tokens. masks
    [B, 4h, 4w] (or [..., 1]) mask logits go through `mask_embed`; without masks every
    position gets `no_mask_embed`. N = P (+ 1 padding point without boxes) (+ 2 with a box).
    `apply(..., method='image_pe')` gives the dense positional encoding [1, h, w, D]
    (the random Fourier features `shared_embedding` of every grid cell centre).
  SamMaskDecoder(mask_decoder_config)(image_embeddings [B, h, w, D], image_pe [1 or B, h, w, D],
      sparse [B, N, D], dense [B, h, w, D], multimask_output: bool)
    -> (low_res_masks [B, M, 4h, 4w] logits, iou_pred [B, M]); M = num_multimask_outputs (3)
    with `multimask_output`, else 1 (the first mask token's mask, as the published code).
    A two-way transformer (token self-attention, token->image and image->token cross
    attention whose inner width is D / attention_downsample_rate, a final token->image
    attention), output upscaling (2 transposed convolutions x2 with LayerNorm2d and GELU),
    one hypernetwork MLP per mask token and an IoU head.
  SamModel(config)(pixel_values, points=..., labels=..., boxes=..., masks=...,
    multimask_output=True, output_hidden_states=False) -> dict with `pred_masks`,
    `iou_scores`, `image_embeddings`, `vision_hidden_states` (the three modules above under
    the parameter names `vision_encoder`, `prompt_encoder`, `mask_decoder`).

Parameter paths mirror transformers' keys with `.N.` list indices as `_N`
(`vision_encoder.layers.3.attn.qkv.weight` -> `vision_encoder/layers_3/attn/qkv/kernel`,
`mask_decoder.output_hypernetworks_mlps.0.proj_in.weight` ->
`mask_decoder/output_hypernetworks_mlps_0/proj_in/kernel`); transformers' tied copy
`shared_image_embedding.positional_embedding` is `prompt_encoder/shared_embedding/
positional_embedding` here.

LayerNorm epsilons follow transformers: the two-way transformer's block norms use
`mask_decoder_config.layer_norm_eps` (1e-6 in transformers' configs; the official code uses
PyTorch's default 1e-5, so `fssjax.weights.sam` sets 1e-5 when it reads an official
checkpoint), its final norm 1e-5, every LayerNorm2d 1e-6. Initialisation (for training from
scratch) follows the official code: the random Fourier matrix N(0, 1) (transformers draws it
with std hidden_size / 2), `pos_embed` and the relative tables zero.

Precision and memory: `dtype=jnp.bfloat16` computes in bf16 (parameters stay `param_dtype`);
the Fourier positional encodings are always float32. `remat=True` rematerialises each encoder
block in the backward pass. Attention runs through `jax.nn.dot_product_attention` (the
relative positions as its `bias`); `attention_implementation` picks its kernel.
`partition_specs(params, fsdp_size)` shards the large parameters over the `fsdp` mesh axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fssjax import sharding as shd
from fssjax.nn.clip_text import HIDDEN_ACTS
from fssjax.nn.ops import interpolation_matrix, resize_bilinear

Array = jax.Array
Dtype = Any

ACTS = {**HIDDEN_ACTS, "relu": jax.nn.relu}
# The official Sam.pixel_mean / pixel_std (RGB, 0-255 scale).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Configs (transformers' SamConfig field names and defaults).


def _fields_from(cls, d: Mapping[str, Any], where: str):
  """Keyword arguments of dataclass `cls` found in dict `d` (other keys are ignored)."""
  kw = {}
  for f in dataclasses.fields(cls):
    if f.name in d and d[f.name] is not None:
      v = d[f.name]
      if f.name == "global_attn_indexes":
        v = tuple(int(i) for i in v)
      kw[f.name] = v
  for k in ("image_size", "patch_size"):
    if isinstance(kw.get(k), (list, tuple)):
      a, b = kw[k]
      if a != b:
        raise ValueError(f"{where}: {k} = {list(kw[k])}; only square sizes are supported")
      kw[k] = int(a)
  return kw


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
  """transformers' SamVisionConfig fields (its defaults: ViT-B). `mlp_dim` None means
  int(hidden_size * mlp_ratio)."""

  hidden_size: int = 768
  output_channels: int = 256
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 1024
  patch_size: int = 16
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  mlp_ratio: float = 4.0
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
  num_pos_feats: int = 128
  mlp_dim: Optional[int] = None

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim if self.mlp_dim is not None else int(self.hidden_size * self.mlp_ratio)

  @property
  def grid_size(self) -> int:
    """h = w = image_size // patch_size."""
    return self.image_size // self.patch_size

  def layer_window(self, i: int) -> int:
    """Window size of block i (0 = global attention)."""
    return 0 if i in self.global_attn_indexes else self.window_size

  def validate(self, where: str = "SamVisionConfig") -> "SamVisionConfig":
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{where}: hidden_size = {self.hidden_size} is not divisible by "
                       f"num_attention_heads = {self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"{where}: image_size = {self.image_size} is not a multiple of "
                       f"patch_size = {self.patch_size}")
    if self.hidden_act not in ACTS:
      raise ValueError(f"{where}: hidden_act = {self.hidden_act!r}; expected one of "
                       f"{sorted(ACTS)}")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"{where}: global_attn_indexes {bad} are not block indexes of a "
                       f"{self.num_hidden_layers}-block encoder")
    if self.window_size <= 0 and len(self.global_attn_indexes) < self.num_hidden_layers:
      raise ValueError(f"{where}: window_size = {self.window_size}; windowed blocks need a "
                       "positive window")
    return self


@dataclasses.dataclass(frozen=True)
class SamPromptEncoderConfig:
  """transformers' SamPromptEncoderConfig fields (its defaults)."""

  hidden_size: int = 256
  image_size: int = 1024
  patch_size: int = 16
  mask_input_channels: int = 16
  num_point_embeddings: int = 4
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6

  @property
  def image_embedding_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class SamMaskDecoderConfig:
  """transformers' SamMaskDecoderConfig fields (its defaults)."""

  hidden_size: int = 256
  hidden_act: str = "relu"
  mlp_dim: int = 2048
  num_hidden_layers: int = 2
  num_attention_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """The three sub-configs (transformers' SamConfig). `from_hf` parses a config.json dict."""

  vision_config: SamVisionConfig = SamVisionConfig()
  prompt_encoder_config: SamPromptEncoderConfig = SamPromptEncoderConfig()
  mask_decoder_config: SamMaskDecoderConfig = SamMaskDecoderConfig()

  def validate(self, where: str = "SamConfig") -> "SamConfig":
    """Raises ValueError (naming `where` and the fields) for inconsistent sub-configs."""
    v, p, d = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
    v.validate(where + " vision_config")
    checks = [
        (v.output_channels == p.hidden_size == d.hidden_size,
         f"vision_config.output_channels = {v.output_channels}, prompt_encoder_config."
         f"hidden_size = {p.hidden_size} and mask_decoder_config.hidden_size = "
         f"{d.hidden_size} must be equal"),
        (2 * v.num_pos_feats == p.hidden_size,
         f"vision_config.num_pos_feats = {v.num_pos_feats} must be half of "
         f"prompt_encoder_config.hidden_size = {p.hidden_size}"),
        (p.image_embedding_size == v.grid_size,
         f"prompt_encoder_config image_size / patch_size = {p.image_size} / {p.patch_size} "
         f"must equal the vision grid {v.image_size} / {v.patch_size}"),
        ((d.hidden_size // d.attention_downsample_rate) % d.num_attention_heads == 0
         and d.hidden_size % d.num_attention_heads == 0,
         f"mask_decoder_config: hidden_size = {d.hidden_size} / attention_downsample_rate = "
         f"{d.attention_downsample_rate} must be divisible by num_attention_heads = "
         f"{d.num_attention_heads}"),
        (d.hidden_size % 8 == 0 and p.mask_input_channels % 4 == 0,
         f"mask_decoder_config.hidden_size = {d.hidden_size} must be a multiple of 8 and "
         f"prompt_encoder_config.mask_input_channels = {p.mask_input_channels} of 4"),
        (d.iou_head_depth >= 2, f"mask_decoder_config.iou_head_depth = {d.iou_head_depth} "
         "must be >= 2"),
        (p.num_point_embeddings >= 4, "prompt_encoder_config.num_point_embeddings = "
         f"{p.num_point_embeddings}; SAM needs 4 (negative, positive, two box corners)"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f"{where}: {msg}")
    for name, act in (("prompt_encoder_config", p.hidden_act),
                      ("mask_decoder_config", d.hidden_act)):
      if act not in ACTS:
        raise ValueError(f"{where}: {name}.hidden_act = {act!r}; expected one of "
                         f"{sorted(ACTS)}")
    return self

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], where: str = "config.json") -> "SamConfig":
    """Parses a transformers `SamModel` config.json dict (model_type 'sam')."""
    model_type = config.get("model_type", "sam")
    if model_type != "sam":
      raise ValueError(f"{where}: model_type = {model_type!r}; expected 'sam' (a "
                       "transformers SamModel config)")
    sub = {}
    for name, klass in (("vision_config", SamVisionConfig),
                        ("prompt_encoder_config", SamPromptEncoderConfig),
                        ("mask_decoder_config", SamMaskDecoderConfig)):
      d = config.get(name) or {}
      if not isinstance(d, Mapping):
        raise ValueError(f"{where}: {name} is a {type(d).__name__}; expected an object")
      sub[name] = klass(**_fields_from(klass, d, f"{where} {name}"))
    v = sub["vision_config"]
    if v.mlp_dim is not None and v.mlp_dim == int(v.hidden_size * v.mlp_ratio):
      sub["vision_config"] = dataclasses.replace(v, mlp_dim=None)  # one canonical form
    return cls(**sub).validate(where)

  def to_hf(self) -> dict:
    """A transformers-style config.json dict."""
    out = {"model_type": "sam", "architectures": ["SamModel"]}
    for name in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
      d = dataclasses.asdict(getattr(self, name))
      if "global_attn_indexes" in d:
        d["global_attn_indexes"] = list(d["global_attn_indexes"])
      out[name] = d
    return out


_VIT = {  # hidden, layers, heads, global blocks (segment-anything build_sam.py)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
PRESETS = tuple(_VIT) + ("tiny",)


def sam_config(name: str) -> SamConfig:
  """Preset configs.

  `vit_b`, `vit_l`, `vit_h`: the published SAM models (image 1024, patch 16, window 14, MLP
  ratio 4, 256 output channels; prompt encoder and decoder as the paper).
  `tiny`: a small SAM-layout model for tests and CPU demos: image 128, patch 16 (8 x 8
  grid), hidden 64, 4 blocks (global at 1 and 3), 4 heads, window 4, 64 output channels,
  decoder width 64 with 4 heads and MLP 128.

  Raises:
    ValueError: an unknown name.
  """
  if name in _VIT:
    hidden, layers, heads, glob = _VIT[name]
    return SamConfig(SamVisionConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, global_attn_indexes=glob))
  if name == "tiny":
    return SamConfig(
        SamVisionConfig(hidden_size=64, output_channels=64, num_hidden_layers=4,
                        num_attention_heads=4, image_size=128, patch_size=16, window_size=4,
                        global_attn_indexes=(1, 3), num_pos_feats=32),
        SamPromptEncoderConfig(hidden_size=64, image_size=128, patch_size=16),
        SamMaskDecoderConfig(hidden_size=64, mlp_dim=128, num_attention_heads=4,
                             iou_head_hidden_dim=64)).validate("sam_config('tiny')")
  raise ValueError(f"unknown SAM preset {name!r}; expected one of {PRESETS}")


def vit_preset_for_hidden_size(hidden_size: int) -> Optional[str]:
  """The published preset whose encoder width is `hidden_size` (None if none)."""
  for name, (hidden, *_rest) in _VIT.items():
    if hidden == hidden_size:
      return name
  return None


# ----------------------------------------------------------------------------------------------
# Pre- and post-processing (segment-anything `Sam.preprocess` / `Sam.postprocess_masks`).


def preprocess(images: Array, image_size: int = 1024) -> Array:
  """Normalises RGB images [B, H, W, 3] (0-255 scale, H, W <= image_size, already resized
  so the longest side is image_size) with SAM's pixel mean / std and zero-pads them at the
  bottom and right to [B, image_size, image_size, 3] float32.

  Raises:
    ValueError: an image larger than image_size or not RGB.
  """
  if images.ndim != 4 or images.shape[-1] != 3 or max(images.shape[1:3]) > image_size:
    raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, H, W, 3] with "
                     f"H, W <= {image_size} (resize the longest side to {image_size} first)")
  x = (jnp.asarray(images, jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
  return jnp.pad(x, ((0, 0), (0, image_size - x.shape[1]), (0, image_size - x.shape[2]),
                     (0, 0)))


def postprocess_masks(masks: Array, input_size: Sequence[int], original_size: Sequence[int],
                      image_size: int = 1024) -> Array:
  """Low-resolution mask logits [B, M, 4h, 4w] -> [B, M, *original_size] logits: bilinear
  (half-pixel centres, as `F.interpolate(align_corners=False)`) up to image_size, the
  padding cropped to `input_size` (the resized image's (H, W)), then to `original_size`."""
  x = resize_bilinear(masks, (image_size, image_size), axes=(2, 3), align_corners=False)
  x = x[:, :, :input_size[0], :input_size[1]]
  return resize_bilinear(x, tuple(original_size), axes=(2, 3), align_corners=False)


# ----------------------------------------------------------------------------------------------
# Image encoder.


def get_rel_pos(q_size: int, k_size: int, rel_pos: Array) -> Array:
  """Relative position embeddings [q_size, k_size, C] for every (query, key) pair of one axis.

  rel_pos: the table [L, C]; when L != 2 * max(q_size, k_size) - 1 it is first resized
  linearly (PyTorch `F.interpolate(mode='linear', align_corners=False)`), as segment-anything
  `get_rel_pos`. Unequal q/k sizes scale the shorter axis' coordinates.
  """
  max_rel_dist = int(2 * max(q_size, k_size) - 1)
  if rel_pos.shape[0] != max_rel_dist:
    w = jnp.asarray(interpolation_matrix(rel_pos.shape[0], max_rel_dist, align_corners=False))
    rel_pos = jnp.matmul(w, rel_pos.astype(jnp.float32),
                         precision=_HIGHEST).astype(rel_pos.dtype)
  f32 = np.float32
  q_coords = np.arange(q_size, dtype=f32)[:, None] * f32(max(k_size / q_size, 1.0))
  k_coords = np.arange(k_size, dtype=f32)[None, :] * f32(max(q_size / k_size, 1.0))
  rel = (q_coords - k_coords) + f32((k_size - 1) * max(q_size / k_size, 1.0))
  return rel_pos[rel.astype(np.int64)]


def window_partition(x: Array, window: int) -> Tuple[Array, Tuple[int, int]]:
  """[B, H, W, C] -> windows [B * nH * nW, window, window, C] (zero-padded bottom/right to a
  multiple of the window) and the padded (Hp, Wp)."""
  b, h, w, c = x.shape
  ph, pw = (window - h % window) % window, (window - w % window) % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Array, window: int, padded: Tuple[int, int],
                       size: Tuple[int, int]) -> Array:
  """Inverse of `window_partition`: windows -> [B, H, W, C] with the padding removed."""
  hp, wp = padded
  b = windows.shape[0] // (hp * wp // window // window)
  x = windows.reshape(b, hp // window, wp // window, window, window, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :size[0], :size[1]]


def _dense(features, name, dtype, param_dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(eps, name, dtype, param_dtype):
  return nn.LayerNorm(eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      name=name)


class SamVisionAttention(nn.Module):
  """Multi-head self-attention over a [B, H, W, C] grid with decomposed relative positions.

  `window_size` > 0: the block attends within windows of that size (the relative tables
  have 2 * window_size - 1 rows); 0: over the whole grid (2 * grid_size - 1 rows).
  """

  config: SamVisionConfig
  window_size: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, h, w, c = x.shape
    n = cfg.num_attention_heads
    hd = c // n
    qkv = _dense(3 * c, "qkv", self.dtype, self.param_dtype, cfg.qkv_bias)(x)
    qkv = qkv.reshape(b, h * w, 3, n, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    bias = None
    if cfg.use_rel_pos:
      size = self.window_size or cfg.grid_size
      rel_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * size - 1, hd),
                         self.param_dtype)
      rel_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * size - 1, hd),
                         self.param_dtype)
      rh = get_rel_pos(h, h, rel_h).astype(q.dtype)  # [H, H, hd]
      rw = get_rel_pos(w, w, rel_w).astype(q.dtype)  # [W, W, hd]
      rq = q.reshape(b, h, w, n, hd)
      bh = jnp.einsum("bhwnc,hkc->bnhwk", rq, rh)
      bw = jnp.einsum("bhwnc,wkc->bnhwk", rq, rw)
      bias = (bh[..., :, None] + bw[..., None, :]).reshape(b, n, h * w, h * w)
    y = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5,
                                     implementation=self.implementation)
    return _dense(c, "proj", self.dtype, self.param_dtype)(y.reshape(b, h, w, c))


class SamMLPBlock(nn.Module):
  """lin2(act(lin1(x)))."""

  mlp_dim: int
  hidden_size: int
  act: str
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = _dense(self.mlp_dim, "lin1", self.dtype, self.param_dtype)(x)
    x = ACTS[self.act](x)
    return _dense(self.hidden_size, "lin2", self.dtype, self.param_dtype)(x)


class SamVisionLayer(nn.Module):
  """x + attn(layer_norm1(x)) (windowed when window_size > 0); then + mlp(layer_norm2(.))."""

  config: SamVisionConfig
  window_size: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    h = _layer_norm(cfg.layer_norm_eps, "layer_norm1", dt, pdt)(x)
    if self.window_size > 0:
      size = h.shape[1:3]
      h, padded = window_partition(h, self.window_size)
    h = SamVisionAttention(cfg, self.window_size, dt, pdt, self.implementation, name="attn")(h)
    if self.window_size > 0:
      h = window_unpartition(h, self.window_size, padded, size)
    x = x + h
    h = _layer_norm(cfg.layer_norm_eps, "layer_norm2", dt, pdt)(x)
    return x + SamMLPBlock(cfg.mlp_width, cfg.hidden_size, cfg.hidden_act, dt, pdt,
                           name="mlp")(h)


class SamPatchEmbeddings(nn.Module):
  """`projection`: a patch_size x patch_size convolution with stride patch_size."""

  config: SamVisionConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.config.patch_size
    return nn.Conv(self.config.hidden_size, (p, p), strides=(p, p), padding="VALID",
                   dtype=self.dtype, param_dtype=self.param_dtype, name="projection")(x)


class SamVisionNeck(nn.Module):
  """conv1 (1x1) -> layer_norm1 -> conv2 (3x3, padding 1) -> layer_norm2; no conv biases."""

  config: SamVisionConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, dt, pdt = self.config.output_channels, self.dtype, self.param_dtype
    x = nn.Conv(c, (1, 1), use_bias=False, dtype=dt, param_dtype=pdt, name="conv1")(x)
    x = _layer_norm(1e-6, "layer_norm1", dt, pdt)(x)
    x = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
                param_dtype=pdt, name="conv2")(x)
    return _layer_norm(1e-6, "layer_norm2", dt, pdt)(x)


class SamVisionEncoder(nn.Module):
  """SAM's ViT image encoder; see the module docstring.

  Attributes:
    config: SamVisionConfig.
    dtype: compute dtype (None: the parameters'; jnp.bfloat16 for bf16 compute).
    param_dtype: parameter dtype.
    remat: rematerialise each block in the backward pass (`nn.remat`).
    attention_implementation: `jax.nn.dot_product_attention` implementation (None: XLA).
  """

  config: SamVisionConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, pixel_values: Array, output_hidden_states: bool = False):
    """pixel_values [B, image_size, image_size, num_channels] -> (embeddings, hidden_states).

    Raises:
      ValueError: pixel_values of another rank, size or channel count.
    """
    cfg, dt, pdt = self.config.validate(), self.dtype, self.param_dtype
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"SamVisionEncoder: pixel_values have shape {tuple(pixel_values.shape)};"
                       f" expected [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, normalised and "
                       "padded as fssjax.nn.sam.preprocess does)")
    x = pixel_values if dt is None else pixel_values.astype(dt)
    x = SamPatchEmbeddings(cfg, dt, pdt, name="patch_embed")(x)
    if cfg.use_abs_pos:
      g = cfg.grid_size
      pos = self.param("pos_embed", nn.initializers.zeros, (1, g, g, cfg.hidden_size), pdt)
      x = x + pos.astype(x.dtype)
    layer_cls = nn.remat(SamVisionLayer) if self.remat else SamVisionLayer
    hidden = []
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, cfg.layer_window(i), dt, pdt, self.attention_implementation,
                    name=f"layers_{i}")(x)
      if output_hidden_states:
        hidden.append(x)
    emb = SamVisionNeck(cfg, dt, pdt, name="neck")(x)
    return emb, tuple(hidden)


# ----------------------------------------------------------------------------------------------
# Prompt encoder.


class SamPositionalEmbedding(nn.Module):
  """Random Fourier features of coordinates in [0, 1]^2: [sin, cos](2 pi (2 x - 1) @ G),
  G = `positional_embedding` [2, num_pos_feats]; float32 whatever the compute dtype."""

  num_pos_feats: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords: Array) -> Array:
    g = self.param("positional_embedding", nn.initializers.normal(1.0),
                   (2, self.num_pos_feats), self.param_dtype)
    c = 2.0 * coords.astype(jnp.float32) - 1.0
    c = 2.0 * np.pi * jnp.matmul(c, g.astype(jnp.float32), precision=_HIGHEST)
    return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)


class SamMaskEmbedding(nn.Module):
  """Mask logits [B, 4h, 4w, 1] -> [B, h, w, D]: conv1 (2x2/2) -> LN -> act -> conv2 (2x2/2)
  -> LN -> act -> conv3 (1x1)."""

  config: SamPromptEncoderConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, masks: Array) -> Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    act = ACTS[cfg.hidden_act]
    conv = lambda f, k, name: nn.Conv(f, (k, k), strides=(k, k), padding="VALID",  # noqa: E731
                                      dtype=dt, param_dtype=pdt, name=name)
    x = conv(cfg.mask_input_channels // 4, 2, "conv1")(masks)
    x = act(_layer_norm(cfg.layer_norm_eps, "layer_norm1", dt, pdt)(x))
    x = conv(cfg.mask_input_channels, 2, "conv2")(x)
    x = act(_layer_norm(cfg.layer_norm_eps, "layer_norm2", dt, pdt)(x))
    return conv(cfg.hidden_size, 1, "conv3")(x)


class SamPromptEncoder(nn.Module):
  """Sparse (points, box) and dense (mask) prompt embeddings; see the module docstring.

  Attributes:
    config: SamPromptEncoderConfig (its hidden_size D fixes the Fourier features: D / 2).
  """

  config: SamPromptEncoderConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, pdt = self.config, self.param_dtype
    d = cfg.hidden_size
    emb = lambda: nn.Embed(1, d, dtype=self.dtype, param_dtype=pdt,  # noqa: E731
                           embedding_init=nn.initializers.normal(1.0))
    self.shared_embedding = SamPositionalEmbedding(d // 2, pdt)
    self.mask_embed = SamMaskEmbedding(cfg, self.dtype, pdt)
    self.no_mask_embed = emb()
    self.point_embed = [emb() for _ in range(cfg.num_point_embeddings)]
    self.not_a_point_embed = emb()

  def _table(self, module: nn.Embed) -> Array:
    return module.embedding[0].astype(jnp.float32)

  def _embed_coords(self, coords: Array) -> Array:
    """Pixel coordinates [..., 2] (x, y) in the image_size frame -> Fourier features."""
    return self.shared_embedding(coords / self.config.image_size)

  def image_pe(self) -> Array:
    """Dense positional encoding [1, h, w, D] float32 of the grid cell centres."""
    n = self.config.image_embedding_size
    c = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    y, x = jnp.meshgrid(c, c, indexing="ij")
    return self.shared_embedding(jnp.stack([x, y], axis=-1))[None]

  def __call__(self, points: Optional[Array] = None, labels: Optional[Array] = None,
               boxes: Optional[Array] = None, masks: Optional[Array] = None):
    """Returns (sparse [B, N, D], dense [B, h, w, D]); sparse is float32, dense the compute
    dtype (N = 0 without points and boxes; B = 1 without any prompt).

    Raises:
      ValueError: points without labels, or arrays of the wrong shape (named).
    """
    cfg = self.config
    d, n = cfg.hidden_size, cfg.image_embedding_size
    if self.is_initializing():  # create every parameter whatever the prompt
      self._embed_coords(jnp.zeros((1, 1, 2)))
      for m in (self.no_mask_embed, self.not_a_point_embed, *self.point_embed):
        self._table(m)
      if masks is None:
        self.mask_embed(jnp.zeros((1, 4 * n, 4 * n, 1), self.dtype or jnp.float32))
    parts, batch = [], None
    if points is not None:
      if labels is None:
        raise ValueError("SamPromptEncoder: points were given without labels [B, P]")
      if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:2]:
        raise ValueError(f"SamPromptEncoder: points {tuple(points.shape)} and labels "
                         f"{tuple(labels.shape)}; expected [B, P, 2] (x, y) and [B, P]")
      batch = points.shape[0]
      pts = points.astype(jnp.float32) + 0.5  # pixel centres
      if boxes is None:  # the official code appends a not-a-point without a box
        pts = jnp.concatenate([pts, jnp.zeros((batch, 1, 2), jnp.float32)], axis=1)
        labels = jnp.concatenate([labels, -jnp.ones((batch, 1), labels.dtype)], axis=1)
      e = self._embed_coords(pts)
      lab = labels[..., None]
      e = jnp.where(lab == -1, self._table(self.not_a_point_embed), e)
      e = jnp.where(lab != -10, e, 0.0)
      e = jnp.where(lab == 0, e + self._table(self.point_embed[0]), e)
      e = jnp.where(lab == 1, e + self._table(self.point_embed[1]), e)
      parts.append(e)
    if boxes is not None:
      if batch is not None and boxes.shape[0] != batch:
        raise ValueError(f"SamPromptEncoder: boxes {tuple(boxes.shape)} and points "
                         f"{tuple(points.shape)} have different batch sizes")
      if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"SamPromptEncoder: boxes have shape {tuple(boxes.shape)}; expected "
                         "[B, 4] (x1, y1, x2, y2), one box per prompt")
      batch = boxes.shape[0]
      corners = (boxes.astype(jnp.float32) + 0.5).reshape(batch, 2, 2)
      e = self._embed_coords(corners)
      e = e + jnp.stack([self._table(self.point_embed[2]), self._table(self.point_embed[3])])
      parts.append(e)
    if masks is not None:
      if masks.ndim == 3:
        masks = masks[..., None]
      if masks.ndim != 4 or tuple(masks.shape[1:]) != (4 * n, 4 * n, 1):
        raise ValueError(f"SamPromptEncoder: masks have shape {tuple(masks.shape)}; expected "
                         f"[B, {4 * n}, {4 * n}] (low-resolution mask logits)")
      batch = masks.shape[0] if batch is None else batch
      x = masks if self.dtype is None else masks.astype(self.dtype)
      dense = self.mask_embed(x)
    else:
      batch = 1 if batch is None else batch
      table = self.no_mask_embed.embedding[0]
      if self.dtype is not None:
        table = table.astype(self.dtype)
      dense = jnp.broadcast_to(table, (batch, n, n, d))
    sparse = (jnp.concatenate(parts, axis=1) if parts
              else jnp.zeros((batch, 0, d), jnp.float32))
    return sparse, dense


# ----------------------------------------------------------------------------------------------
# Mask decoder.


class SamAttention(nn.Module):
  """Attention whose inner width is hidden_size / downsample_rate (q/k/v/out_proj)."""

  hidden_size: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array) -> Array:
    inner = self.hidden_size // self.downsample_rate
    dense = lambda f, name: _dense(f, name, self.dtype, self.param_dtype)  # noqa: E731
    heads = lambda a: a.reshape(*a.shape[:2], self.num_heads, -1)  # noqa: E731
    q = heads(dense(inner, "q_proj")(query))
    k = heads(dense(inner, "k_proj")(key))
    v = heads(dense(inner, "v_proj")(value))
    y = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return dense(self.hidden_size, "out_proj")(y.reshape(*y.shape[:2], inner))


class SamTwoWayAttentionBlock(nn.Module):
  """Token self-attention, token->image attention, token MLP, image->token attention; each
  followed by a LayerNorm (post-norm)."""

  config: SamMaskDecoderConfig
  skip_first_layer_pe: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    attn = lambda rate, name: SamAttention(cfg.hidden_size, cfg.num_attention_heads, rate,  # noqa
                                           dt, pdt, self.implementation, name=name)
    ln = lambda name: _layer_norm(cfg.layer_norm_eps, name, dt, pdt)  # noqa: E731
    if self.skip_first_layer_pe:
      queries = attn(1, "self_attn")(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + attn(1, "self_attn")(q, q, queries)
    queries = ln("layer_norm1")(queries)
    rate = cfg.attention_downsample_rate
    queries = queries + attn(rate, "cross_attn_token_to_image")(
        queries + query_pe, keys + key_pe, keys)
    queries = ln("layer_norm2")(queries)
    queries = queries + SamMLPBlock(cfg.mlp_dim, cfg.hidden_size, cfg.hidden_act, dt, pdt,
                                    name="mlp")(queries)
    queries = ln("layer_norm3")(queries)
    keys = keys + attn(rate, "cross_attn_image_to_token")(
        keys + key_pe, queries + query_pe, queries)
    keys = ln("layer_norm4")(keys)
    return queries, keys


class SamTwoWayTransformer(nn.Module):
  """`num_hidden_layers` two-way blocks, then a final token->image attention + LayerNorm."""

  config: SamMaskDecoderConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, point_embeddings: Array, image_embeddings: Array, image_pe: Array):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    queries, keys = point_embeddings, image_embeddings
    for i in range(cfg.num_hidden_layers):
      queries, keys = SamTwoWayAttentionBlock(cfg, i == 0, dt, pdt, self.implementation,
                                              name=f"layers_{i}")(
          queries, keys, point_embeddings, image_pe)
    attn = SamAttention(cfg.hidden_size, cfg.num_attention_heads,
                        cfg.attention_downsample_rate, dt, pdt, self.implementation,
                        name="final_attn_token_to_image")
    queries = queries + attn(queries + point_embeddings, keys + image_pe, keys)
    queries = _layer_norm(1e-5, "layer_norm_final_attn", dt, pdt)(queries)
    return queries, keys


class SamFeedForward(nn.Module):
  """proj_in -> ReLU -> (layers_i -> ReLU) x (num_layers - 2) -> proj_out."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dt, pdt = self.dtype, self.param_dtype
    x = jax.nn.relu(_dense(self.hidden_dim, "proj_in", dt, pdt)(x))
    for i in range(self.num_layers - 2):
      x = jax.nn.relu(_dense(self.hidden_dim, f"layers_{i}", dt, pdt)(x))
    return _dense(self.output_dim, "proj_out", dt, pdt)(x)


class SamMaskDecoder(nn.Module):
  """SAM's mask decoder; see the module docstring for the call."""

  config: SamMaskDecoderConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, image_embeddings: Array, image_pe: Array, sparse: Array, dense: Array,
               multimask_output: bool):
    """Returns (low_res_masks [B, M, 4h, 4w], iou_pred [B, M]).

    Raises:
      ValueError: inputs whose shapes disagree (named).
    """
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    d = cfg.hidden_size
    if image_embeddings.ndim != 4 or image_embeddings.shape[-1] != d:
      raise ValueError(f"SamMaskDecoder: image_embeddings have shape "
                       f"{tuple(image_embeddings.shape)}; expected [B, h, w, {d}]")
    b, h, w, _ = image_embeddings.shape
    if dense.shape != image_embeddings.shape and dense.shape != (1, h, w, d):
      raise ValueError(f"SamMaskDecoder: dense prompt embeddings {tuple(dense.shape)} do not "
                       f"match the image embeddings {tuple(image_embeddings.shape)}")
    if image_pe.shape[1:] != (h, w, d) or image_pe.shape[0] not in (1, b):
      raise ValueError(f"SamMaskDecoder: image_pe {tuple(image_pe.shape)}; expected "
                       f"[1 or {b}, {h}, {w}, {d}]")
    if sparse.ndim != 3 or sparse.shape[0] != b or sparse.shape[2] != d:
      raise ValueError(f"SamMaskDecoder: sparse prompt embeddings {tuple(sparse.shape)}; "
                       f"expected [{b}, N, {d}]")
    t = cfg.num_multimask_outputs + 1
    emb = lambda n, name: nn.Embed(n, d, dtype=dt, param_dtype=pdt, name=name,  # noqa: E731
                                   embedding_init=nn.initializers.normal(1.0))
    iou_token, mask_tokens = emb(1, "iou_token"), emb(t, "mask_tokens")
    out_tokens = jnp.concatenate([iou_token.embedding, mask_tokens.embedding], axis=0)
    cdt = dt or out_tokens.dtype
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b, 1 + t, d)).astype(cdt),
                              sparse.astype(cdt)], axis=1)
    src = (image_embeddings + dense).astype(cdt).reshape(b, h * w, d)
    pos = jnp.broadcast_to(image_pe, (b, h, w, d)).astype(cdt).reshape(b, h * w, d)
    hs, src = SamTwoWayTransformer(cfg, dt, pdt, self.attention_implementation,
                                   name="transformer")(tokens, src, pos)
    iou_out, mask_out = hs[:, 0], hs[:, 1:1 + t]
    src = src.reshape(b, h, w, d)
    up = lambda f, name: nn.ConvTranspose(f, (2, 2), strides=(2, 2), padding="VALID",  # noqa
                                          transpose_kernel=True, dtype=dt, param_dtype=pdt,
                                          name=name)
    gelu = ACTS["gelu"]
    x = up(d // 4, "upscale_conv1")(src)
    x = gelu(_layer_norm(1e-6, "upscale_layer_norm", dt, pdt)(x))
    x = gelu(up(d // 8, "upscale_conv2")(x))  # [B, 4h, 4w, D / 8]
    hyper = jnp.stack([SamFeedForward(d, d // 8, 3, dt, pdt,
                                      name=f"output_hypernetworks_mlps_{i}")(mask_out[:, i])
                       for i in range(t)], axis=1)  # [B, T, D / 8]
    masks = jnp.einsum("btc,bhwc->bthw", hyper, x)
    iou = SamFeedForward(cfg.iou_head_hidden_dim, t, cfg.iou_head_depth, dt, pdt,
                         name="iou_prediction_head")(iou_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]


# ----------------------------------------------------------------------------------------------
# The whole model.


class SamModel(nn.Module):
  """Image encoder + prompt encoder + mask decoder (transformers' `SamModel`, one prompt set
  per image). Attributes as `SamVisionEncoder`; `config` is a SamConfig."""

  config: SamConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: Optional[str] = None

  def setup(self):
    cfg = self.config.validate()
    self.vision_encoder = SamVisionEncoder(cfg.vision_config, self.dtype, self.param_dtype,
                                           self.remat, self.attention_implementation)
    self.prompt_encoder = SamPromptEncoder(cfg.prompt_encoder_config, self.dtype,
                                           self.param_dtype)
    self.mask_decoder = SamMaskDecoder(cfg.mask_decoder_config, self.dtype, self.param_dtype,
                                       self.attention_implementation)

  def __call__(self, pixel_values: Array, points: Optional[Array] = None,
               labels: Optional[Array] = None, boxes: Optional[Array] = None,
               masks: Optional[Array] = None, multimask_output: bool = True,
               output_hidden_states: bool = False) -> dict:
    """See the module docstring; prompts as `SamPromptEncoder` (batch = the images')."""
    emb, hidden = self.vision_encoder(pixel_values, output_hidden_states)
    sparse, dense = self.prompt_encoder(points, labels, boxes, masks)
    b = emb.shape[0]
    if sparse.shape[0] != b:
      sparse = jnp.broadcast_to(sparse, (b,) + sparse.shape[1:])
    pred, iou = self.mask_decoder(emb, self.prompt_encoder.image_pe(), sparse, dense,
                                  multimask_output)
    return {"pred_masks": pred, "iou_scores": iou, "image_embeddings": emb,
            "vision_hidden_states": hidden}


# ----------------------------------------------------------------------------------------------
# Sharding.


def partition_specs(params, fsdp_size: int, min_size: int = 2 ** 18):
  """PartitionSpecs for SAM parameters (arrays or ShapeDtypeStructs, any sub-tree): the FSDP
  rule of `fssjax.sharding.fsdp_spec` -- arrays of at least `min_size` elements split over
  the `fsdp` axis along their largest divisible dimension, the rest replicated. In ViT-H that
  shards every encoder kernel (qkv [1280, 3840], MLP [1280, 5120], ...) and `pos_embed`,
  while norms, biases and the small relative tables stay replicated."""
  return jax.tree.map(lambda x: shd.fsdp_spec(tuple(x.shape), fsdp_size, min_size), params)


def param_shardings(params, mesh: jax.sharding.Mesh, min_size: int = 2 ** 18):
  """NamedShardings of `partition_specs` on `mesh` (replicated without an `fsdp` axis)."""
  return shd.param_shardings(params, mesh,
                             rule=lambda shape, size: shd.fsdp_spec(shape, size, min_size))
