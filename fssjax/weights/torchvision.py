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
import struct
from typing import Any, Mapping

import numpy as np

PyTree = Any

_DROPPED = re.compile(r"^(fc\.|classifier\.)|\.num_batches_tracked$")
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _is_safetensors(path: str) -> bool:
  """True if the file starts with a safetensors header (u64 length + JSON object)."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def read_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a state dict as {key: float32 numpy array}.

  Args:
    path: a safetensors file, or (only with allow_pickle) a torch pickle (.pth / .pt).
    allow_pickle: permit unpickling a torch checkpoint (torch is imported only then).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not safetensors and allow_pickle is False, or it cannot be read.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Backbone weights file not found: {path}")
  if _is_safetensors(path):
    from safetensors.numpy import load_file
    try:
      sd = load_file(path)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file name
      raise ValueError(f"Cannot read safetensors file {path}: {e}") from e
    return {k: np.asarray(v) for k, v in sd.items()}
  if not allow_pickle:
    raise ValueError(
        f"{path} is not a safetensors file. Loading a pickled torch checkpoint can run arbitrary "
        "code; convert it to safetensors (safetensors.torch.save_file(state_dict, path)) or opt in "
        "with allow_pickle=True (config: model.allow_pickle_weights=True).")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"Reading the pickled checkpoint {path} needs torch installed") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu()
      out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


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


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


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
  used = set()
  flat_out = {}
  missing = []
  for collection, tree in template.items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"Unexpected variable collection {collection!r} in the backbone template")
    for path, like in _flatten(tree).items():
      key = torch_key(collection, path)
      if key not in state_dict:
        missing.append(key)
        continue
      value = np.asarray(state_dict[key])
      expected = _torch_shape(path[-1], tuple(like.shape))
      if tuple(value.shape) != expected:
        raise ValueError(f"{source}: torchvision key {key!r} has shape {tuple(value.shape)}, "
                         f"expected {expected} (Flax {collection}/{'/'.join(path)} "
                         f"{tuple(like.shape)})")
      used.add(key)
      flat_out[(collection,) + path] = _to_flax(path[-1], value).astype(np.float32)
  if missing:
    raise ValueError(f"{source}: {len(missing)} torchvision key(s) missing: "
                     f"{_short_list(missing)}")
  unexpected = sorted(k for k in state_dict if k not in used and not _DROPPED.search(k))
  if unexpected:
    raise ValueError(f"{source}: {len(unexpected)} unexpected key(s) the backbone does not use: "
                     f"{_short_list(unexpected)}")
  return _unflatten(flat_out)


def _short_list(keys: list[str], n: int = 12) -> str:
  s = ", ".join(keys[:n])
  return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_backbone_variables(path: str, template: Mapping[str, PyTree],
                            allow_pickle: bool = False) -> dict[str, PyTree]:
  """Reads `path` and converts it onto `template` (see `convert_state_dict`)."""
  return convert_state_dict(read_state_dict(path, allow_pickle), template, source=path)

