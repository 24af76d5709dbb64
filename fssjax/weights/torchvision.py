"""Load torchvision ImageNet ResNet / VGG16 state dicts into fssjax's Flax backbones.

Input: a torchvision state dict (`torchvision.models.resnet50().state_dict()` and friends)
saved as safetensors (`safetensors.torch.save_file(model.state_dict(), path)`). A pickled
`.pth` file is read only when the caller opts in with `allow_pickle=True` (config key
`model.allow_pickle_weights`); torch is imported lazily, only then.

Mapping (fssjax.nn.resnet / fssjax.nn.vgg name their modules after torchvision's keys):

  flax params  conv `kernel` [kh, kw, in, out]   <- torch `weight` [out, in, kh, kw] (OIHW->HWIO)
               conv `bias`                        <- `bias`
               BatchNorm `scale`, `bias`          <- `weight`, `bias`
  batch_stats  BatchNorm `mean`, `var`            <- `running_mean`, `running_var`
  module names `layer1_0` <- `layer1.0`, `features_17` <- `features.17`,
               `downsample_conv` <- `downsample.0`, `downsample_bn` <- `downsample.1`.

Keys the backbones do not use are dropped by name: the classifier (`fc.*`, `classifier.*`) and
`*.num_batches_tracked`. Any other key of the file the backbone does not use, any key it needs
that the file lacks, and any shape that does not fit raise ValueError naming the key(s).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from fssjax.weights import tensors

PyTree = Any

_DROPPED = re.compile(r"^(fc\.|classifier\.)|\.num_batches_tracked$")
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def read_state_dict(path: str, allow_pickle: bool = False):
  """The state dict of `path` as a lazy {key: NumPy array} mapping (`fssjax.weights.tensors`).

  Args:
    path: a safetensors file, or (only with allow_pickle) a torch pickle (.pth / .pt).
    allow_pickle: permit unpickling a torch checkpoint (torch is imported only then).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not safetensors and allow_pickle is False, or it cannot be read.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Backbone weights file not found: {path}")
  return tensors.open_file(path, allow_pickle)


def _torch_module_name(flax_name: str) -> str:
  if flax_name == "downsample_conv":
    return "downsample.0"
  if flax_name == "downsample_bn":
    return "downsample.1"
  m = re.fullmatch(r"(layer\d+|features)_(\d+)", flax_name)
  if m:
    return f"{m.group(1)}.{m.group(2)}"
  return flax_name


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """torchvision key of a Flax variable, e.g. ('params', ('layer1_0', 'conv1', 'kernel'))."""
  leaf = path[-1]
  if (collection, leaf) not in _LEAF_TO_TORCH:
    raise ValueError(f"No torchvision counterpart for Flax variable {collection}/{'/'.join(path)}")
  modules = [_torch_module_name(p) for p in path[:-1]]
  return ".".join(modules + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  return value


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel":
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(flax_shape)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], template: Mapping[str, PyTree],
                       source: str = "state dict") -> dict[str, PyTree]:
  """Maps a torchvision state dict onto Flax backbone variables.

  Args:
    state_dict: {torchvision key: array}.
    template: the backbone's variables (or their ShapeDtypeStructs) from `module.init`:
      {'params': ..., 'batch_stats': ...} ('batch_stats' only for BatchNorm backbones).
    source: file name for error messages.

  Returns:
    Variables with the template's structure and float32 numpy leaves.

  Raises:
    ValueError: a needed key is missing, a key is unexpected, or a shape does not fit; the
      message names the torchvision key(s) and shapes.
  """
  plan = plan_backbone(state_dict, template, source)
  return traverse_util.unflatten_dict({path: thunk() for path, thunk in plan})


def plan_backbone(state_dict: Mapping[str, np.ndarray], template: Mapping[str, PyTree],
                  source: str = "state dict") -> list[tuple[tuple[str, ...], Any]]:
  """[(('params' | 'batch_stats',) + Flax path, thunk)] for every backbone variable of
  `template`; keys and shapes are checked first (as in `convert_state_dict`), and each thunk
  reads and converts one tensor."""
  shape_of = (state_dict.shape if hasattr(state_dict, "shape")
              else lambda k: tuple(np.shape(state_dict[k])))
  items, used, missing = [], set(), []
  for collection, tree in template.items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"Unexpected variable collection {collection!r} in the backbone template")
    for path, like in traverse_util.flatten_dict(tree).items():
      key = torch_key(collection, path)
      if key not in state_dict:
        missing.append(key)
        continue
      expected = _torch_shape(path[-1], tuple(like.shape))
      if tuple(shape_of(key)) != expected:
        raise ValueError(f"{source}: torchvision key {key!r} has shape {tuple(shape_of(key))}, "
                         f"expected {expected} (Flax {collection}/{'/'.join(path)} "
                         f"{tuple(like.shape)})")
      used.add(key)
      items.append(((collection,) + path,
                    lambda key=key, leaf=path[-1]: _to_flax(
                        leaf, np.asarray(state_dict[key])).astype(np.float32)))
  if missing:
    raise ValueError(f"{source}: {len(missing)} torchvision key(s) missing: "
                     f"{_short_list(missing)}")
  unexpected = sorted(k for k in state_dict if k not in used and not _DROPPED.search(k))
  if unexpected:
    raise ValueError(f"{source}: {len(unexpected)} unexpected key(s) the backbone does not use: "
                     f"{_short_list(unexpected)}")
  return items


def _short_list(keys: list[str], n: int = 12) -> str:
  s = ", ".join(keys[:n])
  return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_backbone_variables(path: str, template: Mapping[str, PyTree],
                            allow_pickle: bool = False) -> dict[str, PyTree]:
  """Reads `path` and converts it onto `template` (see `convert_state_dict`)."""
  return convert_state_dict(read_state_dict(path, allow_pickle), template, source=path)

