"""LLaVA-1.5 (transformers' `LlavaForConditionalGeneration`) in Flax Linen.

Liu, Li, Li and Lee, "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), 2023;
published code haotian-liu/LLaVA (`llava/model/llava_arch.py`), and its transformers port
`models/llava/modeling_llava.py`, which this module follows:

  feats = CLIPVisionModel(pixel_values).hidden_states[vision_feature_layer]   # -2: penultimate
  feats = feats[:, 1:]                  # 'default' strategy drops [CLS]; 'full' keeps it
  image_features = linear_2(gelu(linear_1(feats)))                          # [N_img, P, D_text]
  inputs_embeds = embed_tokens(input_ids); the positions where input_ids == image_token_index
    receive the image features one patch per position, in row-major order over the batch
    (transformers' `masked_scatter`; the "expanded" prompt form of transformers >= 4.47, where
    the processor repeats the `<image>` token P times: see `expand_image_tokens`)
  -> LlamaForCausalLM(inputs_embeds=...)

Call:
  out = model.apply({'params': p}, input_ids [B, T] int32, pixel_values [N_img, H, W, 3] f32
                    (NHWC, CLIP-normalised) or None, image_features=None, attention_mask=None,
                    positions=None, cache=None, logits=True)
  out['logits'] [B, T, vocab] float32 (None with logits=False), out['hidden'] [B, T, D_text]
  (the LLM's last hidden states after its final norm: DSV-LFS / LISA read the one at the
  `[SEM]` / `[SEG]` token), out['cache'] (see fssjax.nn.llama), out['image_features']
  [N_img, P, D_text] (None without images).
`image_features` (already projected, from `method=model.image_features`) replaces
`pixel_values`: a frozen tower and projector need to run once per image. The number of image
tokens in `input_ids` must be N_img * P (checked when `input_ids` is concrete; under `jit` a
mismatch cannot raise, so check on the host with `count_image_tokens`). A call without
images must not contain image tokens.

Parameters: {'vision_tower': CLIPVisionModel's, 'multi_modal_projector': {'linear_1',
'linear_2'}, 'language_model': LlamaForCausalLM's} (transformers' module names;
`fssjax.weights.llava` loads the llava-hf and the original checkpoints). LoRA on the LLM comes
from its LlamaConfig (`lora_rank`, ...); `deterministic=False` enables its dropout.
`resize_token_embeddings` adds vocabulary rows (a `[SEM]` token) to the LLM.
Sharding: `fssjax.nn.llama.partition_specs(params, fsdp_size)` applies to the whole tree
(tower, projector and LLM kernels split over `fsdp`; norms, biases, LoRA factors replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn import llama as nl
from fssjax.nn.clip_text import HIDDEN_ACTS
from fssjax.nn.clip_vision import CLIPVisionConfig, CLIPVisionModel, clip_vision_config

Array = jax.Array
Dtype = Any

SELECT_STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """transformers' LlavaConfig fields (its defaults; `text` / `vision` for text_config /
  vision_config). `vision_feature_layer` is an int or a tuple of ints (features of several
  layers concatenated on the channel axis, as transformers)."""

  vision: CLIPVisionConfig = clip_vision_config("vit_l_14_336")
  text: nl.LlamaConfig = nl.LlamaConfig(vocab_size=32064, max_position_embeddings=4096,
                                        rms_norm_eps=1e-5, pad_token_id=None)
  image_token_index: int = 32000
  projector_hidden_act: str = "gelu"
  vision_feature_layer: Union[int, tuple] = -2
  vision_feature_select_strategy: str = "default"
  multimodal_projector_bias: bool = True

  @property
  def image_seq_length(self) -> int:
    """P: features per image (576 for ViT-L/14-336 with the 'default' strategy)."""
    return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

  @property
  def feature_layers(self) -> tuple:
    f = self.vision_feature_layer
    return (f,) if isinstance(f, int) else tuple(f)

  def validate(self, where: str = "LlavaConfig") -> "LlavaConfig":
    """Raises ValueError naming `where` and the field for a config this module cannot run."""
    self.vision.validate(where + " vision_config")
    self.text.validate(where + " text_config")
    if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
      raise ValueError(f"{where}: vision_feature_select_strategy = "
                       f"{self.vision_feature_select_strategy!r}; expected one of "
                       f"{SELECT_STRATEGIES}")
    if self.projector_hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"{where}: projector_hidden_act = {self.projector_hidden_act!r}; "
                       f"expected one of {sorted(HIDDEN_ACTS)}")
    n = self.vision.num_hidden_layers
    for f in self.feature_layers:
      if not -(n + 1) <= f <= n:
        raise ValueError(f"{where}: vision_feature_layer {f} is out of range for a tower with "
                         f"{n} layers ({n + 1} hidden states)")
    return self


def expand_image_tokens(input_ids: Sequence[int], image_token_index: int,
                        image_seq_length: int) -> list[int]:
  """Repeats each image placeholder `image_seq_length` times (what transformers' LLaVA
  processor does to `<image>`; the original LLaVA code inserts the features at its single
  `IMAGE_TOKEN_INDEX = -200` instead). Host-side, on one sequence of ids."""
  out = []
  for i in input_ids:
    out.extend([int(i)] * image_seq_length if int(i) == image_token_index else [int(i)])
  return out


def count_image_tokens(input_ids, image_token_index: int) -> int:
  """Number of image placeholder positions in input_ids (host-side numpy)."""
  return int((np.asarray(input_ids) == image_token_index).sum())


def splice_image_features(inputs_embeds: Array, image_mask: Array, features: Array) -> Array:
  """inputs_embeds [B, T, D] with the True positions of image_mask [B, T] replaced, in
  row-major order, by the rows of features [M, D] (transformers' `masked_scatter`).

  Traceable (fixed shapes); positions beyond M take the last feature row (the caller checks
  counts). Returns inputs_embeds' dtype.
  """
  b, t, d = inputs_embeds.shape
  flat = image_mask.reshape(-1)
  idx = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
  gathered = features.astype(inputs_embeds.dtype)[idx].reshape(b, t, d)
  return jnp.where(image_mask[..., None], gathered, inputs_embeds)


class LlavaProjector(nn.Module):
  """linear_1 -> activation -> linear_2: [..., D_vision * n_layers] -> [..., D_text]
  (transformers' LlavaMultiModalProjector; LLaVA-1.5's `mlp2x_gelu` mm_projector)."""

  text_hidden_size: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda name: nn.Dense(self.text_hidden_size, use_bias=self.use_bias,  # noqa: E731
                                  dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return dense("linear_2")(HIDDEN_ACTS[self.act](dense("linear_1")(x)))


class LlavaForConditionalGeneration(nn.Module):
  """LLaVA-1.5: CLIP tower, projector and a LLaMA decoder. See the module docstring.

  Attributes:
    config: LlavaConfig. dtype: compute dtype (None: the parameters'). param_dtype.
    remat: rematerialise each layer of the tower and the LLM. attention_implementation: for
    `jax.nn.dot_product_attention`. scan_layers: the LLM's layers under `nn.scan` (params
    stacked, see fssjax.nn.llama). deterministic: no LoRA dropout (see fssjax.nn.llama).
  """

  config: LlavaConfig
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: Optional[str] = None
  scan_layers: bool = False
  deterministic: bool = True

  def setup(self):
    cfg = self.config.validate()
    self.vision_tower = CLIPVisionModel(cfg.vision, self.dtype, self.param_dtype,
                                        self.attention_implementation, self.remat)
    self.multi_modal_projector = LlavaProjector(cfg.text.hidden_size, cfg.projector_hidden_act,
                                                cfg.multimodal_projector_bias, self.dtype,
                                                self.param_dtype)
    self.language_model = nl.LlamaForCausalLM(cfg.text, self.dtype, self.param_dtype,
                                              self.remat, self.attention_implementation,
                                              self.scan_layers, self.deterministic)

  def image_features(self, pixel_values: Array) -> Array:
    """Projected image features [N_img, P, D_text] of pixel_values [N_img, H, W, 3]."""
    cfg = self.config
    out = self.vision_tower(pixel_values, output_hidden_states=True)
    feats = [out["hidden_states"][i] for i in cfg.feature_layers]
    if cfg.vision_feature_select_strategy == "default":
      feats = [f[:, 1:] for f in feats]
    return self.multi_modal_projector(jnp.concatenate(feats, axis=-1))

  def __call__(self, input_ids: Array, pixel_values: Optional[Array] = None, *,
               image_features: Optional[Array] = None, attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None, cache: Optional[dict] = None,
               logits: bool = True) -> dict:
    """Forward pass; see the module docstring.

    Raises:
      ValueError: both pixel_values and image_features, input_ids not integer [B, T],
        image_features not [N_img, P, text hidden_size], or (for concrete input_ids) an
        image-token count other than N_img * P.
    """
    cfg = self.config
    if pixel_values is not None and image_features is not None:
      raise ValueError("pass pixel_values or image_features (already projected), not both")
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [B, T]")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids has dtype {input_ids.dtype}; expected integer token ids")
    if image_features is not None and (image_features.ndim != 3 or
                                       image_features.shape[-1] != cfg.text.hidden_size):
      raise ValueError(
          f"image_features has shape {tuple(image_features.shape)}; expected [N_img, P, "
          f"{cfg.text.hidden_size}] (features already through the projector, width = the LLM's "
          "hidden_size; pass pixel_values to run the CLIP tower and projector here)")
    images = pixel_values if pixel_values is not None else image_features
    n_img = 0 if images is None else images.shape[0]
    per_image = cfg.image_seq_length if image_features is None else image_features.shape[1]
    n_feat = n_img * per_image
    if not isinstance(input_ids, jax.core.Tracer):  # checked before any image is encoded
      n_tok = count_image_tokens(input_ids, cfg.image_token_index)
      if n_tok != n_feat:
        raise ValueError(
            f"input_ids hold {n_tok} image tokens (id {cfg.image_token_index}) but the images "
            f"give {n_feat} features ({n_img} images x {per_image}); expand each "
            f"<image> placeholder to {per_image} tokens (expand_image_tokens) and "
            "pass one image per placeholder")
    if pixel_values is not None:
      image_features = self.image_features(pixel_values)
    image_mask = input_ids == cfg.image_token_index
    # The image id may lie outside the vocabulary (-200 in the original code): embed id 0.
    embeds = self.language_model.embed(jnp.where(image_mask, 0, input_ids))
    if image_features is not None:
      embeds = splice_image_features(embeds, image_mask,
                                     image_features.reshape(-1, image_features.shape[-1]))
    out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                              positions=positions, cache=cache, logits=logits)
    return {**out, "image_features": image_features}


def resize_token_embeddings(config: LlavaConfig, params, new_vocab_size: int,
                            **kwargs) -> tuple[LlavaConfig, dict]:
  """`fssjax.nn.llama.resize_token_embeddings` on the LLM of a LLaVA tree (adds `[SEM]`).

  Returns (config with text.vocab_size = new_vocab_size, params). kwargs: init, rng, std.
  """
  text, lm = nl.resize_token_embeddings(config.text, params["language_model"], new_vocab_size,
                                        **kwargs)
  return dataclasses.replace(config, text=text), {**params, "language_model": lm}


def llava_config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> LlavaConfig:
  """LlavaConfig from a transformers `llava` config.json dict (text_config / vision_config;
  `image_token_index` or transformers 5's `image_token_id`). Missing fields take
  transformers' defaults; `fssjax.weights.llava` fills shapes from the tensors first."""
  kw = {}
  for f in ("projector_hidden_act", "vision_feature_select_strategy",
            "multimodal_projector_bias"):
    if raw.get(f) is not None:
      kw[f] = raw[f]
  layer = raw.get("vision_feature_layer")
  if layer is not None:
    kw["vision_feature_layer"] = layer if isinstance(layer, int) else tuple(layer)
  tok = raw.get("image_token_index", raw.get("image_token_id"))
  if tok is not None:
    kw["image_token_index"] = int(tok)
  vision = CLIPVisionConfig.from_hf(dict({"model_type": "clip_vision_model"},
                                         **(raw.get("vision_config") or {})), where)
  text = nl.LlamaConfig.from_hf(dict({"model_type": "llama"}, **(raw.get("text_config") or {})),
                                where)
  return LlavaConfig(vision=vision, text=text, **kw).validate(where)
