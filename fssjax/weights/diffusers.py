"""Loads Stable-Diffusion checkpoints in the diffusers directory layout into fssjax modules.

Layout (a pipeline root, e.g. a local copy of stabilityai/stable-diffusion-2-1):
  unet/config.json          + diffusion_pytorch_model[.<variant>].safetensors
  vae/config.json           + diffusion_pytorch_model[.<variant>].safetensors
  text_encoder/config.json  + model[.<variant>].safetensors
  tokenizer/                  vocab.json, merges.txt, tokenizer_config.json (transformers)
Sharded checkpoints (`<name>.safetensors.index.json`) are read too, one tensor at a time
(`fssjax.weights.tensors`). PyTorch pickles (`.bin`, `.ckpt`, `.pt`, `.pth`) are only read
with `allow_pickle=True` (`fssjax.weights.tensors.read_torch_pickle`).

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
(`conv_in_ref.*`; the config field `in_channels_ref` is optional and inferred from the tensor,
as the published starting checkpoint omits it): `load_pipeline` returns it as
`StableDiffusion.support_conv` (`support_conv_from_state_dict` does the conversion).

Streaming into a sharded model: `stream_component(root, 'unet' | 'vae')` checks every key and
shape from the file headers, then returns one (Flax path, thunk) per parameter; a thunk reads
and converts one tensor, so `fssjax.methods.base.replace_leaves` can place each on its devices
without a second copy of the checkpoint in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn.clip_text import CLIPTextConfig, CLIPTextModel
from fssjax.nn.unet import UNet2DConditionModel, UNetConfig
from fssjax.nn.vae import AutoencoderKL, VAEConfig
from fssjax.weights import tensors

StateDict = Dict[str, np.ndarray]
PyTree = Any



# ----------------------------------------------------------------------------------------------
# Reading files.


def read_state_dict(directory: str, stem: str, *, variant: Optional[str] = None,
                    allow_pickle: bool = False) -> StateDict:
  """Reads `<stem>[.<variant>].safetensors` (or its sharded index) from `directory` into a
  dict (all tensors in memory; the loaders use `fssjax.weights.tensors.open_weights`, which
  reads one tensor at a time).

  Falls back to a pickled `<stem>[.<variant>].bin/.ckpt/.pt/.pth` only with `allow_pickle`.

  Raises:
    FileNotFoundError: when no weight file exists.
    ValueError: for a pickle without `allow_pickle`, or a corrupt file.
  """
  files = tensors.open_weights(directory, stem, variant=variant, allow_pickle=allow_pickle)
  return {k: files[k] for k in files}


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


def _converted_shape(kind: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if kind == "kernel" and len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  if kind == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def plan_conversion(keys_and_shapes: Mapping[str, Tuple[int, ...]], expected: PyTree, *,
                    component: str, rename: Callable[[list], list] = lambda p: p
                    ) -> Dict[Tuple[str, ...], Tuple[str, str]]:
  """Flax path -> (checkpoint key, kind) for every parameter of `expected`, from the
  checkpoint's keys and shapes alone (no tensor is read).

  Raises:
    ValueError: on unexpected keys, missing parameters or shape mismatches (naming them).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
  plan = {}
  unexpected = []
  for key, shape in keys_and_shapes.items():
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
    if full in plan:
      raise ValueError(f"{component}: two tensors map to Flax parameter {'/'.join(full)} "
                       f"(second: {key!r})")
    got = _converted_shape(kinds[0], tuple(shape))
    if got != tuple(flat[full].shape):
      raise ValueError(f"{component}: tensor {key!r} has shape {tuple(shape)} (as Flax "
                       f"{'/'.join(full)}: {got}), but the module built from the config "
                       f"expects {tuple(flat[full].shape)}")
    plan[full] = (key, kinds[0])
  missing = sorted("/".join(p) for p in flat if p not in plan)
  if unexpected or missing:
    raise ValueError(f"{component}: checkpoint does not match the module built from its config; "
                     f"unexpected tensors {sorted(unexpected)}, missing Flax parameters "
                     f"{missing}")
  return plan


def read_converted(state_dict: Mapping[str, np.ndarray], key: str, kind: str, *,
                   component: str, param_dtype: Any = jnp.float32) -> np.ndarray:
  """One checkpoint tensor converted to its Flax layout and dtype (host NumPy)."""
  value = np.asarray(state_dict[key])
  if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
    raise ValueError(f"{component}: tensor {key!r} has dtype {value.dtype}; expected floats")
  if kind == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "kernel" and value.ndim == 2:
    value = value.T
  return np.asarray(value, dtype=np.float32).astype(np.dtype(param_dtype))


def _shapes_of(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Tuple[int, ...]]:
  if hasattr(state_dict, "shape"):
    return {k: state_dict.shape(k) for k in state_dict}
  return {k: tuple(np.shape(v)) for k, v in state_dict.items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected: PyTree, *,
                       component: str, rename: Callable[[list], list] = lambda p: p,
                       param_dtype: Any = jnp.float32) -> PyTree:
  """Maps a PyTorch state dict onto the param tree `expected` (shapes, e.g. from eval_shape).

  Raises:
    ValueError: on unexpected keys, missing parameters or shape mismatches (naming them).
  """
  plan = plan_conversion(_shapes_of(state_dict), expected, component=component, rename=rename)
  # Cast on the host: a device-side astype would compile one op per tensor shape.
  out = {path: jnp.asarray(read_converted(state_dict, key, kind, component=component,
                                          param_dtype=param_dtype))
         for path, (key, kind) in plan.items()}
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
  return convert_state_dict(state_dict, unet_shapes(config), component="unet",
                            param_dtype=param_dtype)


def vae_params_from_state_dict(config: VAEConfig, state_dict: Mapping[str, np.ndarray], *,
                               param_dtype: Any = jnp.float32) -> PyTree:
  """Converts a diffusers AutoencoderKL state dict for `AutoencoderKL(config)`."""
  return convert_state_dict(state_dict, vae_shapes(config), component="vae", rename=_vae_rename,
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
  """Pops DiffewS's support input conv (`conv_in_ref.*`) out of a UNet state dict ->
  {kernel [3, 3, in_channels_ref, C0] (HWIO), bias [C0]}, or None when the checkpoint has none.

  The config field `in_channels_ref` is optional: the published starting checkpoint
  (`stable-diffusion-2-1-ref8inchannels`) has the tensors but not the field, so the input
  channels come from `conv_in_ref.weight`'s shape; a field without the tensors is an error,
  and a field that disagrees with the tensor is a shape error.
  """
  has_field = "in_channels_ref" in raw_config
  has_tensors = any(k.startswith("conv_in_ref.") for k in state_dict)
  if not has_tensors:
    if has_field:
      raise ValueError(f"{component}: config field in_channels_ref="
                       f"{raw_config['in_channels_ref']} but no conv_in_ref.* tensors")
    return None
  weight = state_dict.pop("conv_in_ref.weight", None)
  bias = state_dict.pop("conv_in_ref.bias", None)
  odd = sorted(k for k in state_dict if k.startswith("conv_in_ref."))
  if weight is None or bias is None or odd:
    raise ValueError(f"{component}: expected conv_in_ref.weight and conv_in_ref.bias, got "
                     f"{'weight ' if weight is not None else ''}"
                     f"{'bias ' if bias is not None else ''}{odd}")
  weight = np.asarray(weight, np.float32)
  c_in = int(raw_config.get("in_channels_ref", weight.shape[1] if weight.ndim == 4 else -1))
  c_out = config.block_out_channels[0]
  k = config.conv_in_kernel
  kernel = _convert_tensor("conv_in_ref.weight", weight, "kernel", (k, k, c_in, c_out),
                           component, "conv_in_support/kernel")
  bias = _convert_tensor("conv_in_ref.bias", np.asarray(bias, np.float32), "bias", (c_out,),
                         component, "conv_in_support/bias")
  return {"kernel": jnp.asarray(kernel.astype(np.dtype(param_dtype))),
          "bias": jnp.asarray(bias.astype(np.dtype(param_dtype)))}


def unet_shapes(config: UNetConfig) -> PyTree:
  """The UNet's parameter shapes (`jax.ShapeDtypeStruct`s; nothing is computed)."""
  module = UNet2DConditionModel(config)
  side = 2 ** (len(config.block_out_channels) - 1)
  sample = jnp.zeros((1, side, side, config.in_channels))
  context = jnp.zeros((1, 1, config.cross_attention_dim[0]))
  return jax.eval_shape(module.init, jax.random.key(0), sample, 0, context)["params"]


def vae_shapes(config: VAEConfig) -> PyTree:
  """The VAE's parameter shapes."""
  side = 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((1, side, side, config.in_channels))
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def unet_config(path: str, *, ignore_config_fields: Sequence[str] = ()) -> UNetConfig:
  """The UNetConfig of `unet/config.json` (or `path/config.json`), DiffewS fields ignored."""
  raw = read_config(_component_dir(path, "unet"))
  return UNetConfig.from_diffusers(raw, ignore_fields=tuple(ignore_config_fields) +
                                   ("in_channels_ref",))


def vae_config(path: str) -> VAEConfig:
  return VAEConfig.from_diffusers(read_config(_component_dir(path, "vae")))


Streamed = list  # [(Flax path 'a/b/kernel', thunk -> NumPy array)]


def stream_component(path: str, component: str, *, variant: Optional[str] = None,
                     allow_pickle: bool = False, param_dtype: Any = jnp.float32
                     ) -> Tuple[Streamed, Optional[Streamed]]:
  """Plans the conversion of `unet` or `vae` under `path` without reading tensors.

  Returns:
    (items, support): `items` lists (Flax path, thunk) for every parameter, each thunk reading
    and converting one tensor; `support` (UNet only) the DiffewS support conv's
    [('kernel', thunk), ('bias', thunk)] when the checkpoint has `conv_in_ref.*`, else None.
    The key / shape checks of `convert_state_dict` run here, before anything is read.
  """
  directory = _component_dir(path, component)
  raw = read_config(directory)
  files = tensors.open_weights(directory, "diffusion_pytorch_model", variant=variant,
                               allow_pickle=allow_pickle)
  shapes = _shapes_of(files)
  support = None
  if component == "unet":
    config = UNetConfig.from_diffusers(raw, ignore_fields=("in_channels_ref",))
    expected = unet_shapes(config)
    ref = {k: v for k, v in shapes.items() if k.startswith("conv_in_ref.")}
    if ref or "in_channels_ref" in raw:
      # Checks (and infers in_channels_ref) on the two small tensors only.
      conv = support_conv_from_state_dict({k: files[k] for k in ref}, raw, config,
                                          param_dtype=param_dtype)
      support = [("kernel", lambda: np.asarray(conv["kernel"])),
                 ("bias", lambda: np.asarray(conv["bias"]))]
      shapes = {k: v for k, v in shapes.items() if k not in ref}
    rename = lambda p: p  # noqa: E731
  elif component == "vae":
    expected = vae_shapes(VAEConfig.from_diffusers(raw))
    rename = _vae_rename
  else:
    raise ValueError(f"stream_component: component {component!r}; expected 'unet' or 'vae'")
  plan = plan_conversion(shapes, expected, component=component, rename=rename)

  def thunk(key, kind):
    return lambda: read_converted(files, key, kind, component=component,
                                  param_dtype=param_dtype)

  items = [("/".join(p), thunk(key, kind)) for p, (key, kind) in plan.items()]
  return items, support


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
