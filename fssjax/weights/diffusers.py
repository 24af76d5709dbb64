"""Loads Stable-Diffusion checkpoints in the diffusers directory layout into fssjax modules.

Layout (a pipeline root, e.g. a local copy of stabilityai/stable-diffusion-2-1):
  unet/config.json          + diffusion_pytorch_model[.<variant>].safetensors
  vae/config.json           + diffusion_pytorch_model[.<variant>].safetensors
  text_encoder/config.json  + model[.<variant>].safetensors
  tokenizer/                  vocab.json, merges.txt, tokenizer_config.json (transformers)
Sharded checkpoints (`<name>.safetensors.index.json`) are read too. PyTorch pickles
(`.bin`, `.ckpt`, `.pt`, `.pth`) are only read with `allow_pickle=True` (they need torch and
are loaded with `torch.load(weights_only=True)`).

Conversion: every tensor is renamed from its PyTorch path to the Flax path
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`,
`to_out.0` -> `to_out`), conv weights OIHW -> HWIO, linear weights [out, in] -> [in, out];
norm weights become `scale`, embeddings `embedding`. SD 1.x stores proj_in/proj_out of the
transformer blocks as 1x1 convs, SD 2.x as linears: the module is built from the config's
`use_linear_projection`, and a checkpoint that disagrees is a shape error. Every tensor must
be consumed and every parameter filled: missing / unexpected keys and shape mismatches raise
ValueError naming the key and the shapes. Accepted legacy names: the VAE attention's
`query/key/value/proj_attn` (old diffusers), the text encoder's `text_model.` prefix
(transformers 4) and its `embeddings.position_ids` buffer (checked, then dropped).

Functions: `load_unet(path)`, `load_vae(path)`, `load_text_encoder(path)` -> (module, params);
`load_tokenizer(path)`; `load_pipeline(root)` -> `StableDiffusion`. `path` is either the
component directory or a pipeline root containing it. Lower level: `read_state_dict`,
`read_config`, `unet_params_from_state_dict`, `vae_params_from_state_dict`,
`text_encoder_params_from_state_dict`. DiffewS-layout UNets carry an extra support input conv
(`conv_in_ref.*`, config field `in_channels_ref`): `load_pipeline` returns it as
`StableDiffusion.support_conv` (`support_conv_from_state_dict` does the conversion).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn.clip_text import CLIPTextConfig, CLIPTextModel
from fssjax.nn.unet import UNet2DConditionModel, UNetConfig
from fssjax.nn.vae import AutoencoderKL, VAEConfig

StateDict = Dict[str, np.ndarray]
PyTree = Any

_PICKLE_EXTS = (".bin", ".ckpt", ".pt", ".pth")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# ----------------------------------------------------------------------------------------------
# Reading files.


def _read_safetensors_raw(path: str) -> StateDict:
  """Parses a safetensors file directly (used for BF16, which numpy cannot name)."""
  import ml_dtypes  # a jax dependency
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError(f"{path}: not a safetensors file (too short)")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
  out = {}
  base = 8 + n
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    arr = np.frombuffer(data[base + begin:base + end], dtype=dtypes[info["dtype"]])
    out[key] = arr.reshape(info["shape"])
  return out


def _read_safetensors(path: str) -> StateDict:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except TypeError as e:  # numpy has no bfloat16
    if "bfloat16" not in str(e):
      raise
    return _read_safetensors_raw(path)


def _read_pickle(path: str, allow_pickle: bool) -> StateDict:
  if not allow_pickle:
    raise ValueError(f"{path} is a PyTorch pickle; loading it can execute code. Pass "
                     "allow_pickle=True to read it (prefer safetensors)")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
  return out


def read_state_dict(directory: str, stem: str, *, variant: Optional[str] = None,
                    allow_pickle: bool = False) -> StateDict:
  """Reads `<stem>[.<variant>].safetensors` (or its sharded index) from `directory`.

  Falls back to a pickled `<stem>[.<variant>].bin/.ckpt/.pt/.pth` only with `allow_pickle`.

  Raises:
    FileNotFoundError: when no weight file exists.
    ValueError: for a pickle without `allow_pickle`, or a corrupt file.
  """
  name = stem if variant is None else f"{stem}.{variant}"
  single = os.path.join(directory, name + ".safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    return _read_safetensors(single)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dict")
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
      out.update(_read_safetensors(os.path.join(directory, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ValueError(f"{index}: tensors {missing[:5]} listed but not found in the shards")
    return out
  for ext in _PICKLE_EXTS:
    path = os.path.join(directory, name + ext)
    if os.path.exists(path):
      return _read_pickle(path, allow_pickle)
  raise FileNotFoundError(f"no weights {name}.safetensors (or a sharded index) in {directory}")


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from e


def _component_dir(path: str, component: str) -> str:
  """`path` itself when it holds config.json, else `path/component`."""
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  sub = os.path.join(path, component)
  if os.path.exists(os.path.join(sub, "config.json")):
    return sub
  raise FileNotFoundError(f"neither {path} nor {sub} contains a config.json ({component})")


# ----------------------------------------------------------------------------------------------
# Conversion.


def _flax_path(key: str, rename: Callable[[list], list]) -> Tuple[Tuple[str, ...], str]:
  """Torch key -> (Flax module path, leaf).

  'down_blocks.0.resnets.1.conv1.weight' -> (('down_blocks_0', 'resnets_1', 'conv1'), 'weight').
  """
  parts = key.split(".")
  leaf, parts = parts[-1], rename(parts[:-1])
  path = []
  for p in parts:
    if p.isdigit() and path:
      if path[-1] == "to_out" and p == "0":
        continue  # diffusers' to_out = [Linear, Dropout]
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  return tuple(path), leaf


def _convert_tensor(key: str, value: np.ndarray, kind: str, expected: Tuple[int, ...],
                    component: str, flax_name: str) -> np.ndarray:
  if kind == "kernel" and value.ndim == 4:
    out = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "kernel" and value.ndim == 2:
    out = value.T
  else:
    out = value
  if tuple(out.shape) != tuple(expected):
    raise ValueError(f"{component}: tensor {key!r} has shape {tuple(value.shape)} (as Flax "
                     f"{flax_name}: {tuple(out.shape)}), but the module built from the config "
                     f"expects {tuple(expected)}")
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected: PyTree, *,
                       component: str, rename: Callable[[list], list] = lambda p: p,
                       param_dtype: Any = jnp.float32) -> PyTree:
  """Maps a PyTorch state dict onto the param tree `expected` (shapes, e.g. from eval_shape).

  Raises:
    ValueError: on unexpected keys, missing parameters or shape mismatches (naming them).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
  out = {}
  unexpected = []
  for key, value in state_dict.items():
    path, leaf = _flax_path(key, rename)
    if leaf == "weight":
      kinds = [k for k in ("kernel", "scale", "embedding") if path + (k,) in flat]
    elif leaf == "bias":
      kinds = ["bias"] if path + ("bias",) in flat else []
    else:
      kinds = []
    if not kinds:
      unexpected.append(key)
      continue
    full = path + (kinds[0],)
    if full in out:
      raise ValueError(f"{component}: two tensors map to Flax parameter {'/'.join(full)} "
                       f"(second: {key!r})")
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ValueError(f"{component}: tensor {key!r} has dtype {value.dtype}; expected floats")
    arr = _convert_tensor(key, value, kinds[0], flat[full].shape, component, "/".join(full))
    # Cast on the host: a device-side astype would compile one op per tensor shape.
    out[full] = jnp.asarray(np.asarray(arr, dtype=np.float32).astype(np.dtype(param_dtype)))
  missing = sorted("/".join(p) for p in flat if p not in out)
  if unexpected or missing:
    raise ValueError(f"{component}: checkpoint does not match the module built from its config; "
                     f"unexpected tensors {sorted(unexpected)}, missing Flax parameters "
                     f"{missing}")
  return flax.traverse_util.unflatten_dict(out)


def _vae_rename(parts: list) -> list:
  # Old diffusers VAE attention names (converted by diffusers' _fix_state_dict_keys_on_load).
  legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}
  if len(parts) >= 4 and parts[-3] == "attentions" and parts[-1] in legacy:
    return parts[:-1] + [legacy[parts[-1]]]
  return parts


def unet_params_from_state_dict(config: UNetConfig, state_dict: Mapping[str, np.ndarray], *,
                                param_dtype: Any = jnp.float32) -> PyTree:
  """Converts a diffusers UNet2DConditionModel state dict for `UNet2DConditionModel(config)`."""
  module = UNet2DConditionModel(config)
  n_down = len(config.block_out_channels) - 1
  side = 2 ** n_down
  sample = jnp.zeros((1, side, side, config.in_channels))
  context = jnp.zeros((1, 1, config.cross_attention_dim[0]))
  shapes = jax.eval_shape(module.init, jax.random.key(0), sample, 0, context)["params"]
  return convert_state_dict(state_dict, shapes, component="unet", param_dtype=param_dtype)


def vae_params_from_state_dict(config: VAEConfig, state_dict: Mapping[str, np.ndarray], *,
                               param_dtype: Any = jnp.float32) -> PyTree:
  """Converts a diffusers AutoencoderKL state dict for `AutoencoderKL(config)`."""
  module = AutoencoderKL(config)
  side = 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((1, side, side, config.in_channels))
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  return convert_state_dict(state_dict, shapes, component="vae", rename=_vae_rename,
                            param_dtype=param_dtype)


def text_encoder_params_from_state_dict(config: CLIPTextConfig,
                                        state_dict: Mapping[str, np.ndarray], *,
                                        param_dtype: Any = jnp.float32) -> PyTree:
  """Converts a transformers CLIPTextModel state dict (with or without `text_model.`)."""
  keys = list(state_dict)
  prefixed = [k.startswith("text_model.") for k in keys]
  if any(prefixed) and not all(prefixed):
    odd = [k for k, p in zip(keys, prefixed) if not p][:5]
    raise ValueError(f"text_encoder: some tensors lack the 'text_model.' prefix: {odd}")
  sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v
        for k, v in state_dict.items()}
  pos = sd.pop("embeddings.position_ids", None)
  if pos is not None:
    pos = np.asarray(pos).reshape(-1)
    if not np.array_equal(pos, np.arange(config.max_position_embeddings)):
      raise ValueError(f"text_encoder: embeddings.position_ids is not arange("
                       f"{config.max_position_embeddings}) (shape {pos.shape})")
  module = CLIPTextModel(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  return convert_state_dict(sd, shapes, component="text_encoder", param_dtype=param_dtype)


# ----------------------------------------------------------------------------------------------
# Loaders.


def support_conv_from_state_dict(state_dict: dict, raw_config: Mapping[str, Any],
                                 config: UNetConfig, *, param_dtype: Any = jnp.float32,
                                 component: str = "unet") -> Optional[PyTree]:
  """Pops DiffewS's support input conv (`conv_in_ref.*`, config `in_channels_ref`) out of a
  UNet state dict -> {kernel [3, 3, in_channels_ref, C0] (HWIO), bias [C0]}, or None when the
  checkpoint has none. Both the tensors and the config field must be present together."""
  has_field = "in_channels_ref" in raw_config
  has_tensors = any(k.startswith("conv_in_ref.") for k in state_dict)
  if not has_field and not has_tensors:
    return None
  if has_field != has_tensors:
    raise ValueError(f"{component}: DiffewS support conv: config field in_channels_ref "
                     f"{'present' if has_field else 'absent'} but conv_in_ref.* tensors "
                     f"{'present' if has_tensors else 'absent'}")
  c_in, c_out = int(raw_config["in_channels_ref"]), config.block_out_channels[0]
  weight = state_dict.pop("conv_in_ref.weight", None)
  bias = state_dict.pop("conv_in_ref.bias", None)
  odd = sorted(k for k in state_dict if k.startswith("conv_in_ref."))
  if weight is None or bias is None or odd:
    raise ValueError(f"{component}: expected conv_in_ref.weight and conv_in_ref.bias, got "
                     f"{'weight ' if weight is not None else ''}"
                     f"{'bias ' if bias is not None else ''}{odd}")
  k = config.conv_in_kernel
  kernel = _convert_tensor("conv_in_ref.weight", np.asarray(weight, np.float32), "kernel",
                           (k, k, c_in, c_out), component, "conv_in_support/kernel")
  bias = _convert_tensor("conv_in_ref.bias", np.asarray(bias, np.float32), "bias", (c_out,),
                         component, "conv_in_support/bias")
  return {"kernel": jnp.asarray(kernel.astype(np.dtype(param_dtype))),
          "bias": jnp.asarray(bias.astype(np.dtype(param_dtype)))}


def load_unet(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
              remat: bool = False, attention_implementation: Optional[str] = None,
              variant: Optional[str] = None, allow_pickle: bool = False,
              ignore_config_fields: Sequence[str] = (),
              return_support_conv: bool = False):
  """Loads `unet/` (or `path` itself) -> (UNet2DConditionModel, params).

  A DiffewS-layout UNet (config field `in_channels_ref`, tensors `conv_in_ref.*`: the
  published `stable-diffusion-2-1-ref8inchannels` start point and trained DiffewS releases)
  is accepted; with `return_support_conv=True` the result is (module, params, support conv or
  None), the support conv as {kernel HWIO, bias}. Without it such a checkpoint is an error.
  """
  directory = _component_dir(path, "unet")
  raw = read_config(directory)
  ignore = tuple(ignore_config_fields)
  if return_support_conv:
    ignore += ("in_channels_ref",)
  config = UNetConfig.from_diffusers(raw, ignore_fields=ignore)
  sd = dict(read_state_dict(directory, "diffusion_pytorch_model", variant=variant,
                            allow_pickle=allow_pickle))
  support = None
  if return_support_conv:
    support = support_conv_from_state_dict(sd, raw, config, param_dtype=param_dtype)
  params = unet_params_from_state_dict(config, sd, param_dtype=param_dtype)
  module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                attention_implementation=attention_implementation)
  if return_support_conv:
    return module, params, support
  return module, params


def load_vae(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
             variant: Optional[str] = None,
             allow_pickle: bool = False) -> Tuple[AutoencoderKL, PyTree]:
  """Loads `vae/` (or `path` itself) -> (AutoencoderKL, params)."""
  directory = _component_dir(path, "vae")
  config = VAEConfig.from_diffusers(read_config(directory))
  sd = read_state_dict(directory, "diffusion_pytorch_model", variant=variant,
                       allow_pickle=allow_pickle)
  params = vae_params_from_state_dict(config, sd, param_dtype=param_dtype)
  return AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype), params


def load_text_encoder(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                      attention_implementation: Optional[str] = None,
                      variant: Optional[str] = None,
                      allow_pickle: bool = False) -> Tuple[CLIPTextModel, PyTree]:
  """Loads `text_encoder/` (or `path` itself) -> (CLIPTextModel, params)."""
  directory = _component_dir(path, "text_encoder")
  config = CLIPTextConfig.from_transformers(read_config(directory))
  sd = read_state_dict(directory, "model", variant=variant, allow_pickle=allow_pickle)
  params = text_encoder_params_from_state_dict(config, sd, param_dtype=param_dtype)
  module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype,
                         attention_implementation=attention_implementation)
  return module, params


def load_tokenizer(path: str):
  """transformers' CLIPTokenizer from `tokenizer/` (or `path` itself)."""
  from transformers import CLIPTokenizer
  directory = path
  if not os.path.exists(os.path.join(path, "vocab.json")):
    directory = os.path.join(path, "tokenizer")
  if not os.path.exists(os.path.join(directory, "vocab.json")):
    raise FileNotFoundError(f"no tokenizer (vocab.json) in {path} or {directory}")
  return CLIPTokenizer.from_pretrained(directory)


@dataclasses.dataclass
class StableDiffusion:
  """The loaded components of a diffusers Stable-Diffusion pipeline root."""

  unet: UNet2DConditionModel
  unet_params: PyTree
  vae: AutoencoderKL
  vae_params: PyTree
  text_encoder: CLIPTextModel
  text_encoder_params: PyTree
  tokenizer: Any
  model_index: dict
  # DiffewS's support input conv {kernel, bias} when the UNet carries one (conv_in_ref.*).
  support_conv: Optional[PyTree] = None


_EXPECTED_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                     "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer"}


def load_pipeline(root: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                  remat: bool = False, attention_implementation: Optional[str] = None,
                  variant: Optional[str] = None, allow_pickle: bool = False) -> StableDiffusion:
  """Loads unet/, vae/, text_encoder/ and tokenizer/ of a pipeline root.

  When `model_index.json` exists, its entries for these components must name the classes
  fssjax implements (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer or
  CLIPTokenizerFast).
  """
  index_path = os.path.join(root, "model_index.json")
  model_index = {}
  if os.path.exists(index_path):
    with open(index_path) as f:
      model_index = json.load(f)
    for comp, cls in _EXPECTED_CLASSES.items():
      entry = model_index.get(comp)
      if entry is None:
        raise ValueError(f"{index_path}: no {comp!r} component")
      name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else entry
      if name != cls and not (comp == "tokenizer" and name == "CLIPTokenizerFast"):
        raise ValueError(f"{index_path}: component {comp!r} is {entry!r}; fssjax loads {cls}")
  unet, unet_params, support_conv = load_unet(
      os.path.join(root, "unet"), dtype=dtype, param_dtype=param_dtype, remat=remat,
      attention_implementation=attention_implementation, variant=variant,
      allow_pickle=allow_pickle, return_support_conv=True)
  vae, vae_params = load_vae(os.path.join(root, "vae"), dtype=dtype, param_dtype=param_dtype,
                             variant=variant, allow_pickle=allow_pickle)
  text, text_params = load_text_encoder(os.path.join(root, "text_encoder"), dtype=dtype,
                                        param_dtype=param_dtype,
                                        attention_implementation=attention_implementation,
                                        variant=variant, allow_pickle=allow_pickle)
  return StableDiffusion(unet, unet_params, vae, vae_params, text, text_params,
                         load_tokenizer(os.path.join(root, "tokenizer")), model_index,
                         support_conv)
