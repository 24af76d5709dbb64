"""CLIP (image and text towers with their projections; transformers' `CLIPModel`) in Flax Linen.

transformers `models/clip/modeling_clip.py` CLIPModel:

  image_embeds = visual_projection(vision_model(pixels).pooler_output)     # get_image_features
  text_embeds  = text_projection(text_model(ids, mask).pooler_output)     # get_text_features
  logits_per_image = exp(logit_scale) * normalise(image_embeds) @ normalise(text_embeds).T

The towers are `fssjax.nn.clip_vision.CLIPVisionModel` and `fssjax.nn.clip_text.
CLIPTextModel`; the projections are bias-free linears. Parameter paths mirror transformers'
(`vision_model/...`, `text_model/...`, `visual_projection/kernel`, `text_projection/kernel`,
`logit_scale`); `fssjax.weights.clip.load_clip_model` reads a CLIPModel directory.

Call:
  model = CLIPModel(config)
  model.apply({'params': p}, pixels, method=model.get_image_features)   # [B, P]
  model.apply({'params': p}, ids, mask, method=model.get_text_features)  # [B, P]
  model.apply({'params': p}, ids, mask, pixels)  # {'logits_per_image', 'image_embeds', ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.clip_text import CLIPTextConfig, CLIPTextModel
from fssjax.nn.clip_vision import CLIPVisionConfig, CLIPVisionModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  """The two towers' configs and the shared embedding width (transformers' projection_dim)."""

  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592


def normalise(x: Array) -> Array:
  """x / |x| along the last axis (transformers' `x / x.norm(p=2, dim=-1, keepdim=True)`)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


class CLIPModel(nn.Module):
  """CLIP's two towers and projections. See the module docstring."""

  config: CLIPModelConfig
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.vision_model = CLIPVisionModel(cfg.vision, dtype=self.dtype,
                                        param_dtype=self.param_dtype)
    self.text_model = CLIPTextModel(cfg.text, dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                      param_dtype=self.param_dtype)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(cfg.logit_scale_init_value), (),
                                  self.param_dtype)

  def get_image_features(self, pixel_values: Array) -> Array:
    """[B, S, S, 3] CLIP-normalised NHWC pixels -> [B, projection_dim] (not normalised)."""
    return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

  def get_text_features(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
    """[B, T] token ids (and padding mask) -> [B, projection_dim] (not normalised)."""
    return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

  def __call__(self, input_ids: Array, attention_mask: Optional[Array], pixel_values: Array
               ) -> dict:
    img = self.get_image_features(pixel_values)
    txt = self.get_text_features(input_ids, attention_mask)
    logits = jnp.exp(self.logit_scale) * normalise(img) @ normalise(txt).T
    return {"logits_per_image": logits, "logits_per_text": logits.T, "image_embeds": img,
            "text_embeds": txt}
