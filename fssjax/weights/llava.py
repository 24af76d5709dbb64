"""Loads LLaVA-1.5 checkpoints and CLIP vision towers (safetensors) into fssjax trees.

Three published key namings of a transformers `LlavaForConditionalGeneration` are read (a
directory with config.json and model.safetensors, or shards with
model.safetensors.index.json, through `fssjax.weights.tensors`):

  llava-hf hub files        vision_tower.vision_model.*  multi_modal_projector.*
                            language_model.model.*       language_model.lm_head.weight
  transformers 4.52-4.57    model.vision_tower.vision_model.*  model.multi_modal_projector.*
                            model.language_model.*        lm_head.weight
  transformers 5 (save)     vision_tower.* (CLIP names without `vision_model.`), otherwise as
                            the hub files

and the original haotian-liu/LLaVA layout (`LlavaLlamaForCausalLM`, config.json with the
llama fields flat plus `mm_vision_select_layer`, `mm_vision_select_feature`,
`mm_projector_type`): `model.embed_tokens.weight`, `model.layers.*`, `model.norm.weight`,
`lm_head.weight`, the projector `model.mm_projector.0.*` / `.2.*` (LLaVA-1.5's
`mlp2x_gelu`: Linear, GELU, Linear = transformers' linear_1 / linear_2), and the CLIP tower
from a separate `CLIPVisionModel` or `CLIPModel` directory (`vision_model.*` keys or
transformers 5's unprefixed ones; a CLIPModel's text tower is ignored), or, when a
checkpoint embeds it, from `model.vision_tower.vision_tower.vision_model.*`. The original
code inserts the image at `IMAGE_TOKEN_INDEX = -200`, so its config gets
`image_token_index=-200` (see `fssjax.nn.llava.expand_image_tokens`). Its PyTorch pickles
(`pytorch_model*.bin`) are read only with `allow_pickle=True` (`fssjax.weights.tensors`).

Config: the `text_config` / `vision_config` fields that config.json omits are inferred from
the tensor shapes (sizes, layer counts, vocabulary, image size); head counts cannot be, and
default to transformers' (32 text heads, 12 vision heads) as transformers does; an embedded
original tower uses CLIP's width / 64 heads.

Renaming: CLIP `...weight` [out, in] -> `kernel` [in, out]; LayerNorm weight -> `scale`;
`patch_embedding.weight` [D, 3, p, p] -> `kernel` [p, p, 3, D]; `position_embedding.weight` ->
`embedding`; `encoder.layers.N` -> `encoder/layers_N`; the LLM via `fssjax.weights.llama`.
Every tensor must be used and every parameter filled: unexpected or missing keys and shape
mismatches raise ValueError naming the file and the key.

Functions: `load_llava(path, *, vision_tower=None, allow_pickle=False, parts=PARTS)` ->
(LlavaConfig, params); `load_clip_vision(directory)` -> (CLIPVisionConfig, params);
`params_from_clip_vision_state(state, config)`; `infer_clip_vision_config(raw, state)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fssjax.nn.clip_vision import CLIPVisionConfig, CLIPVisionModel
from fssjax.nn.llava import LlavaConfig, llava_config_from_hf
from fssjax.weights import llama as wl
from fssjax.weights import tensors

PyTree = Any
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # haotian-liu/LLaVA llava/constants.py

_CLIP_SKIP = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)|"
                        r"position_ids$")


def _read_json(path: str) -> dict:
  folder = os.path.dirname(path)
  if os.path.isfile(folder):
    raise FileNotFoundError(f"{folder} is a file; expected a model directory holding "
                            f"{os.path.basename(path)} and the weights (a Hugging Face "
                            "checkpoint folder, not one of its files)")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model directory {folder} does not exist (expected a folder "
                            f"holding {os.path.basename(path)} and the weights)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {os.path.basename(path)} in {folder}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e


class _Shaped:
  """Stands for a tensor where only its shape is read (config inference)."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def _llama_shapes(state, names) -> Dict[str, Any]:
  """{llama key: _Shaped} for `wl.infer_hf_config` without reading any tensor."""
  def shape(k):
    return state.shape(k) if hasattr(state, "shape") else np.shape(state[k])
  return {k: _Shaped(shape(names[k])) for k in names}


# ----------------------------------------------------------------------------------------------
# CLIP vision tower.


def clip_expected_shapes(config: CLIPVisionConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{Flax path: shape} of every parameter of `CLIPVisionModel(config)`."""
  shapes = jax.eval_shape(lambda: CLIPVisionModel(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, config.image_size, config.image_size,
                                        config.num_channels))))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def clip_key_to_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """A CLIP vision key without its `vision_model.` prefix -> (Flax path, conversion), where
  conversion is 'T' (transpose), 'conv' ([D, C, p, p] -> [p, p, C, D]) or ''."""
  parts = key.split(".")
  path = []
  i = 0
  while i < len(parts) - 1:
    if parts[i] == "layers" and i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
      path.append(f"layers_{parts[i + 1]}")
      i += 2
    else:
      path.append(parts[i])
      i += 1
  leaf = parts[-1]
  if key == "embeddings.class_embedding":
    return ("embeddings", "class_embedding"), ""
  if key == "embeddings.patch_embedding.weight":
    return ("embeddings", "patch_embedding", "kernel"), "conv"
  if key == "embeddings.position_embedding.weight":
    return ("embeddings", "position_embedding", "embedding"), ""
  if leaf not in ("weight", "bias"):
    raise ValueError(f"unexpected tensor {key!r}")
  if "norm" in path[-1]:
    return (*path, "scale" if leaf == "weight" else "bias"), ""
  return (*path, "kernel" if leaf == "weight" else "bias"), "T" if leaf == "weight" else ""


def _strip_vision_prefix(key: str) -> str:
  return key[len("vision_model."):] if key.startswith("vision_model.") else key


def infer_clip_vision_config(raw: Mapping[str, Any], state: Mapping[str, np.ndarray],
                             where: str = "config.json",
                             default_heads: Optional[int] = None) -> CLIPVisionConfig:
  """CLIPVisionConfig from a config dict (flat or with `vision_config`), filling omitted sizes
  from `state` (keys without the `vision_model.` prefix). `default_heads` (else
  transformers' 12) when num_attention_heads is absent."""
  raw = dict(raw.get("vision_config") or raw) if ("vision_config" in raw or
                                                   raw.get("model_type") == "clip") else dict(raw)
  shape = state.shape if hasattr(state, "shape") else (lambda k: tuple(state[k].shape))
  keys = set(state)
  if "embeddings.patch_embedding.weight" not in keys:
    raise ValueError(f"{where}: no tensor 'embeddings.patch_embedding.weight' in the CLIP "
                     "vision weights (not a CLIP vision tower?)")
  d, c, p, _ = shape("embeddings.patch_embedding.weight")
  raw.setdefault("hidden_size", d)
  raw.setdefault("num_channels", c)
  raw.setdefault("patch_size", p)
  n_pos = shape("embeddings.position_embedding.weight")[0]
  side = math.isqrt(n_pos - 1)
  raw.setdefault("image_size", side * p)
  layers = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
  raw.setdefault("num_hidden_layers", len(layers))
  if "encoder.layers.0.mlp.fc1.weight" in keys:
    raw.setdefault("intermediate_size", shape("encoder.layers.0.mlp.fc1.weight")[0])
  if default_heads and raw.get("num_attention_heads") is None:
    raw["num_attention_heads"] = default_heads
  raw.setdefault("model_type", "clip_vision_model")
  return CLIPVisionConfig.from_hf(raw, where)


def params_from_clip_vision_state(state: Mapping[str, np.ndarray], config: CLIPVisionConfig,
                                  where: str = "checkpoint") -> PyTree:
  """Flax params of `CLIPVisionModel(config)` from CLIP vision tensors (keys without the
  `vision_model.` prefix; position_ids buffers skipped). Raises ValueError naming `where` and
  the key for unexpected, missing or mis-shaped tensors."""
  expected = clip_expected_shapes(config)
  params = {}
  for key in state:
    if key.endswith("position_ids"):
      continue
    try:
      path, conv = clip_key_to_path(key)
    except ValueError as e:
      raise ValueError(f"{where}: {e}; a CLIP vision tower has embeddings.*, pre_layrnorm.*, "
                       "encoder.layers.*, post_layernorm.*") from None
    value = np.asarray(state[key], np.float32)
    if conv == "T":
      value = value.T
    elif conv == "conv" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    if path not in expected:
      raise ValueError(f"{where}: tensor {key!r} has no parameter {'/'.join(path)} in a CLIP "
                       f"tower with {config.num_hidden_layers} layers (config mismatch?)")
    if tuple(value.shape) != expected[path]:
      raise ValueError(f"{where}: tensor {key!r} has shape {tuple(np.shape(state[key]))}; the "
                       f"config implies the parameter {'/'.join(path)} of shape "
                       f"{expected[path]} (after transposing to Flax order)")
    params[path] = np.ascontiguousarray(value)
  missing = sorted("/".join(p) for p in set(expected) - set(params))
  if missing:
    raise ValueError(f"{where}: missing CLIP vision tensors for parameters {missing[:6]}"
                     f"{' ...' if len(missing) > 6 else ''}")
  return traverse_util.unflatten_dict(params)


class _Renamed(Mapping):
  """A lazy {new key: tensor} view of a WeightFiles / dict under a key renaming."""

  def __init__(self, base, names: Dict[str, str], where: str):
    self._base, self._names, self.where = base, names, where  # new -> old

  def __getitem__(self, key):
    return self._base[self._names[key]]

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)

  def shape(self, key):
    old = self._names[key]
    return (self._base.shape(old) if hasattr(self._base, "shape")
            else tuple(np.shape(self._base[old])))


def load_clip_vision(directory: str) -> Tuple[CLIPVisionConfig, PyTree]:
  """(config, params) of the vision tower of a transformers CLIPVisionModel or CLIPModel
  directory (config.json + model.safetensors or a sharded index)."""
  raw = _read_json(os.path.join(directory, "config.json"))
  files = tensors.open_weights(directory, "model")
  where = getattr(files, "where", directory)
  names = {_strip_vision_prefix(k): k for k in files if not _CLIP_SKIP.search(k)}
  state = _Renamed(files, names, where)
  config = infer_clip_vision_config(raw, state, os.path.join(directory, "config.json"))
  return config, params_from_clip_vision_state(state, config, where)


# ----------------------------------------------------------------------------------------------
# LLaVA.

_HF_PREFIXES = (  # (prefix, part, new prefix)
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.vision_model.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "text", "model."),
    ("language_model.model.", "text", "model."),
    ("language_model.lm_head.", "text", "lm_head."),
    ("lm_head.", "text", "lm_head."),
)


def split_llava_hf_keys(keys, where: str = "checkpoint") -> Dict[str, Dict[str, str]]:
  """{'vision' | 'projector' | 'text': {normalised key: original key}} for any of the three
  llava-hf namings (see the module docstring). Raises ValueError for other keys."""
  out = {"vision": {}, "projector": {}, "text": {}}
  for key in keys:
    for prefix, part, new in _HF_PREFIXES:
      if key.startswith(prefix):
        out[part][new + key[len(prefix):]] = key
        break
    else:
      raise ValueError(f"{where}: unexpected tensor {key!r}; a llava-hf checkpoint has "
                       "vision_tower.*, multi_modal_projector.*, language_model.* (or "
                       "model.vision_tower.*, model.multi_modal_projector.*, "
                       "model.language_model.*, lm_head.*) tensors")
  return out


def _projector_params(state: Mapping[str, np.ndarray], names: Mapping[str, str],
                      vision: CLIPVisionConfig, text_hidden: int, n_layers: int, bias: bool,
                      where: str) -> PyTree:
  """linear_1 / linear_2 from {linear_k.weight|bias: original key}."""
  d_in = vision.hidden_size * n_layers
  want = {"linear_1.weight": (text_hidden, d_in), "linear_2.weight": (text_hidden, text_hidden)}
  if bias:
    want.update({"linear_1.bias": (text_hidden,), "linear_2.bias": (text_hidden,)})
  extra = sorted(set(names) - set(want))
  if extra:
    raise ValueError(f"{where}: unexpected projector tensor {names[extra[0]]!r}; LLaVA-1.5's "
                     "projector has linear_1 and linear_2 (weight" + (", bias)" if bias else ")"))
  missing = sorted(set(want) - set(names))
  if missing:
    raise ValueError(f"{where}: missing projector tensors {missing} (multimodal_projector_bias="
                     f"{bias})")
  out = {}
  for k, shape in want.items():
    v = np.asarray(state[names[k]], np.float32)
    if v.shape != shape:
      raise ValueError(f"{where}: tensor {names[k]!r} has shape {v.shape}; expected {shape} "
                       f"(text hidden {text_hidden}, vision hidden {vision.hidden_size} x "
                       f"{n_layers} feature layers)")
    layer, leaf = k.split(".")
    out.setdefault(layer, {})["kernel" if leaf == "weight" else "bias"] = (
        np.ascontiguousarray(v.T) if leaf == "weight" else v)
  return out


PARTS = ("vision_tower", "multi_modal_projector", "language_model")


def _check_parts(parts) -> tuple:
  bad = sorted(set(parts) - set(PARTS))
  if bad or not parts:
    raise ValueError(f"parts = {tuple(parts)}; expected a non-empty subset of {PARTS}")
  return tuple(parts)


def load_llava_hf(directory: str, parts=PARTS) -> Tuple[LlavaConfig, PyTree]:
  """(LlavaConfig, params) from a llava-hf directory (any of the three key namings); only
  the top-level subtrees named in `parts` are converted (the config is always complete)."""
  wanted = _check_parts(parts)
  cfg_path = os.path.join(directory, "config.json")
  raw = _read_json(cfg_path)
  files = tensors.open_weights(directory, "model")
  where = getattr(files, "where", directory)
  names = split_llava_hf_keys(list(files), where)
  vision_state = _Renamed(files, {k: v for k, v in names["vision"].items()
                                  if not k.endswith("position_ids")}, where)
  vision = infer_clip_vision_config(raw.get("vision_config") or {}, vision_state, cfg_path)
  text_raw = dict({"model_type": "llama"}, **(raw.get("text_config") or {}))
  text_raw.setdefault("num_attention_heads", 32)  # transformers' LlamaConfig default
  text = wl.infer_hf_config(text_raw, _llama_shapes(files, names["text"]), cfg_path)
  base = llava_config_from_hf({**raw, "vision_config": None, "text_config": None}, cfg_path)
  config = dataclasses.replace(base, vision=vision, text=text).validate(cfg_path)
  out = {}
  if "vision_tower" in wanted:
    out["vision_tower"] = params_from_clip_vision_state(_Renamed(files, names["vision"], where),
                                                        config.vision, where)
  if "multi_modal_projector" in wanted:
    out["multi_modal_projector"] = _projector_params(
        files, names["projector"], config.vision, config.text.hidden_size,
        len(config.feature_layers), config.multimodal_projector_bias, where)
  if "language_model" in wanted:
    out["language_model"] = wl.params_from_hf_state_dict(
        _Renamed(files, names["text"], where), config.text, {k: where for k in names["text"]})
  return config, out


def _open_original(directory: str, allow_pickle: bool):
  try:
    return tensors.open_weights(directory, "model")
  except FileNotFoundError:
    pass
  index = os.path.join(directory, "pytorch_model.bin.index.json")
  if os.path.exists(index):
    weight_map = _read_json(index).get("weight_map") or {}
    out = {}
    for shard in sorted(set(weight_map.values())):
      out.update(tensors.read_torch_pickle(os.path.join(directory, shard), allow_pickle))
    return out
  if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
    return tensors.read_torch_pickle(os.path.join(directory, "pytorch_model.bin"), allow_pickle)
  raise FileNotFoundError(f"no model.safetensors (or sharded index) and no pytorch_model.bin "
                          f"(or its index) in {directory}")


_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def load_llava_original(directory: str, vision_tower=None, *, allow_pickle: bool = False,
                        parts=PARTS) -> Tuple[LlavaConfig, PyTree]:
  """(LlavaConfig, params) from haotian-liu/LLaVA's layout plus a CLIP tower directory.

  `vision_tower`: the tower's directory (CLIPVisionModel or CLIPModel); or, for a checkpoint
  that embeds the tower (`model.vision_tower.vision_tower.vision_model.*`), None (its config
  inferred from the shapes with width / 64 heads, openai CLIP's rule) or a CLIPVisionConfig.

  Raises:
    ValueError: an mm_projector_type other than 'mlp2x_gelu', an unknown
      mm_vision_select_feature, no tower (neither `vision_tower` nor embedded tensors), or
      bad tensors (named).
  """
  wanted = _check_parts(parts)
  cfg_path = os.path.join(directory, "config.json")
  raw = _read_json(cfg_path)
  proj_type = raw.get("mm_projector_type", "linear")
  if proj_type != "mlp2x_gelu":
    raise ValueError(f"{cfg_path}: mm_projector_type = {proj_type!r}; LLaVA-1.5 checkpoints use "
                     "'mlp2x_gelu' (Linear-GELU-Linear), the only projector supported")
  select = raw.get("mm_vision_select_feature", "patch")
  if select not in _SELECT_FEATURE:
    raise ValueError(f"{cfg_path}: mm_vision_select_feature = {select!r}; expected one of "
                     f"{sorted(_SELECT_FEATURE)}")
  files = _open_original(directory, allow_pickle)
  where = getattr(files, "where", directory)
  text_names, proj_names, tower_names = {}, {}, {}
  for key in files:
    m = re.match(r"^model\.mm_projector\.([02])\.(weight|bias)$", key)
    if m:
      proj_names[f"linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = key
    elif key.startswith("model.vision_tower.vision_tower."):
      k = _strip_vision_prefix(key[len("model.vision_tower.vision_tower."):])
      if not k.endswith("position_ids"):
        tower_names[k] = key
    elif key.startswith(("model.", "lm_head.")):
      text_names[key] = key
    else:
      raise ValueError(f"{where}: unexpected tensor {key!r}; the original LLaVA layout has "
                       "model.* (LLaMA and model.mm_projector.*) and lm_head.weight")
  if isinstance(vision_tower, str):
    vision, vparams = load_clip_vision(vision_tower)
  elif tower_names:
    tstate = _Renamed(files, tower_names, where)
    if isinstance(vision_tower, CLIPVisionConfig):
      vision = vision_tower
    else:
      d = tstate.shape("embeddings.patch_embedding.weight")[0]
      vision = infer_clip_vision_config({}, tstate, where, default_heads=max(1, d // 64))
    vparams = params_from_clip_vision_state(tstate, vision, where)
  else:
    raise ValueError(f"{directory}: the original LLaVA layout keeps the CLIP tower apart "
                     f"(mm_vision_tower = {raw.get('mm_vision_tower')!r}); pass its directory "
                     "as vision_tower= (a CLIPVisionModel or CLIPModel with safetensors)")
  text_raw = {k: v for k, v in raw.items() if not k.startswith("mm_")}
  text_raw["model_type"] = "llama"
  text_raw.setdefault("num_attention_heads", 32)
  text = wl.infer_hf_config(text_raw, _llama_shapes(files, text_names), cfg_path)
  layer = raw.get("mm_vision_select_layer", -2)
  config = LlavaConfig(vision=vision, text=text, image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
                       vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                       vision_feature_select_strategy=_SELECT_FEATURE[select]).validate(cfg_path)
  out = {"vision_tower": vparams} if "vision_tower" in wanted else {}
  if "multi_modal_projector" in wanted:
    out["multi_modal_projector"] = _projector_params(files, proj_names, vision, text.hidden_size,
                                                     len(config.feature_layers), True, where)
  if "language_model" in wanted:
    out["language_model"] = wl.params_from_hf_state_dict(
        _Renamed(files, text_names, where), text, {k: where for k in text_names})
  return config, out


def load_llava(path: str, *, vision_tower=None, allow_pickle: bool = False,
               parts=PARTS) -> Tuple[LlavaConfig, PyTree]:
  """(LlavaConfig, params) from a llava-hf directory or an original-layout one (told apart
  by config.json: model_type 'llava' vs the `mm_*` fields of `llava_llama`).

  `parts`: the subtrees to convert, a subset of ('vision_tower', 'multi_modal_projector',
  'language_model') (e.g. only the frozen tower and projector, when the LLM comes from
  elsewhere: a 7B LLM is ~27 GB of float32 host memory).
  """
  raw = _read_json(os.path.join(path, "config.json"))
  if raw.get("model_type") == "llava":
    if vision_tower is not None:
      raise ValueError(f"{path} is a llava-hf checkpoint with its own vision tower; "
                       "vision_tower= is only for the original LLaVA layout")
    return load_llava_hf(path, parts)
  if any(k.startswith("mm_") for k in raw) or raw.get("model_type") == "llava_llama":
    return load_llava_original(path, vision_tower, allow_pickle=allow_pickle, parts=parts)
  raise ValueError(f"{os.path.join(path, 'config.json')}: model_type = "
                   f"{raw.get('model_type')!r} and no mm_* fields; expected a llava-hf "
                   "checkpoint (model_type 'llava') or the original LLaVA layout "
                   "(model_type 'llava_llama')")
