"""CLIP ViT image encoder (transformers' `CLIPVisionModel`) in Flax Linen.

CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
2021; openai/CLIP `model.py` VisionTransformer) as transformers implements it
(`models/clip/modeling_clip.py`: CLIPVisionEmbeddings, CLIPVisionTransformer):

  x = concat([class_embedding, patch_embedding(pixels)]) + position_embedding   # [B, 1+N, D]
  x = pre_layrnorm(x)                      # hidden_states[0]
  x = layer_i(x), i = 1..L                 # hidden_states[i]; pre-LN, bidirectional attention
  last_hidden_state = x; pooler_output = post_layernorm(x[:, 0])

`patch_embedding` is a p x p convolution with stride p and no bias; N = (image_size / p)^2.
LLaVA-1.5 (Liu et al. 2023) reads `hidden_states[-2]` of ViT-L/14-336 (`clip_vision_config(
'vit_l_14_336')`: 1024 wide, 24 layers, 16 heads, 577 tokens).

Call:
  out = CLIPVisionModel(cfg).apply({'params': p}, pixel_values, output_hidden_states=True)
  pixel_values [B, image_size, image_size, 3] float (NHWC, CLIP-normalised: (x/255 - mean) / std
    with CLIP_MEAN / CLIP_STD).
  out['last_hidden_state'] [B, 1 + N, hidden_size], out['pooler_output'] [B, hidden_size],
  out['hidden_states'] a tuple of L + 1 arrays [B, 1 + N, hidden_size] (embeddings after
  pre_layrnorm, then every layer's output) when output_hidden_states=True, else ().
Raises ValueError for an input of another rank, size or channel count (transformers'
position-embedding interpolation is not implemented).

The encoder layers are `fssjax.nn.clip_text`'s (`CLIPEncoderLayer`: the same attention, MLP
`fc1`, activation, `fc2` and names as the text encoder's) without the causal mask. Parameter paths mirror
transformers' with the `vision_model.` prefix dropped (`vision_model.encoder.layers.0.
self_attn.q_proj.weight` -> `encoder/layers_0/self_attn/q_proj/kernel`; `embeddings.
patch_embedding.weight` [D, 3, p, p] -> `embeddings/patch_embedding/kernel` [p, p, 3, D];
`embeddings.class_embedding` -> `embeddings/class_embedding`; `pre_layrnorm` keeps
transformers' spelling). `fssjax.weights.llava.params_from_clip_vision_state` converts.
Precision: `dtype` is the compute dtype (parameters `param_dtype`); `remat` rematerialises
each layer in the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.clip_text import HIDDEN_ACTS, _Encoder

Array = jax.Array
Dtype = Any

# openai/CLIP's normalisation (transformers CLIPImageProcessor image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of transformers' CLIPVisionConfig that define the network (its defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1

  def validate(self, where: str = "CLIPVisionConfig") -> "CLIPVisionConfig":
    """Raises ValueError naming `where` and the field for a config this module cannot run."""
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"{where}: hidden_act = {self.hidden_act!r} is not supported; expected "
                       f"one of {sorted(HIDDEN_ACTS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{where}: hidden_size = {self.hidden_size} is not divisible by "
                       f"num_attention_heads = {self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"{where}: image_size = {self.image_size} is not a multiple of "
                       f"patch_size = {self.patch_size}")
    return self

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], where: str = "config.json") -> "CLIPVisionConfig":
    """Parses a transformers config dict: a `clip_vision_model` config, or a `clip` one (its
    `vision_config` is used). Missing fields take transformers' defaults (as transformers
    does). Raises ValueError naming `where` and the field."""
    if config.get("model_type") == "clip" or "vision_config" in config:
      config = config.get("vision_config") or {}
    model_type = config.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise ValueError(f"{where}: vision model_type = {model_type!r}; expected "
                       "'clip_vision_model'")
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls)
              if config.get(f.name) is not None}
    return cls(**kwargs).validate(where)


PRESETS = {
    "vit_b_32": CLIPVisionConfig(),
    "vit_b_16": CLIPVisionConfig(patch_size=16),
    "vit_l_14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, patch_size=14),
    # openai/clip-vit-large-patch14-336: LLaVA-1.5's tower.
    "vit_l_14_336": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16,
                                     patch_size=14, image_size=336),
}


def clip_vision_config(name: str) -> CLIPVisionConfig:
  """A preset of the openai CLIP towers: 'vit_b_32', 'vit_b_16', 'vit_l_14', 'vit_l_14_336'."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP vision preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name]


class CLIPVisionEmbeddings(nn.Module):
  """[CLS] + p x p patch embeddings + learned position embeddings: [B, 1 + N, D]."""

  config: CLIPVisionConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embedding")(pixel_values)
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,),
                     self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    pos = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="position_embedding")(
                       jnp.arange(cfg.num_positions))
    return x + pos[None]


class CLIPVisionModel(nn.Module):
  """CLIP ViT image encoder. See the module docstring.

  Attributes:
    config: CLIPVisionConfig. dtype: compute dtype (None: the parameters'). param_dtype:
    parameter dtype. attention_implementation: for `jax.nn.dot_product_attention`.
    remat: rematerialise each encoder layer in the backward pass.
  """

  config: CLIPVisionConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> dict:
    cfg, dt, pdt = self.config.validate(), self.dtype, self.param_dtype
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this CLIP tower "
                       f"expects [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, CLIP-normalised)")
    x = CLIPVisionEmbeddings(cfg, dt, pdt, name="embeddings")(pixel_values)
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,  # noqa: E731
                                   use_fast_variance=False, name=name)
    x = ln("pre_layrnorm")(x)
    hidden = [x]
    x, outs = _Encoder(cfg, self.attention_implementation, dt, pdt, causal=False,
                       remat=self.remat, name="encoder")(x)
    hidden.extend(outs)
    pooled = ln("post_layernorm")(x[:, 0])
    return {"last_hidden_state": x, "pooler_output": pooled,
            "hidden_states": tuple(hidden) if output_hidden_states else ()}
