"""Reading published weight files one tensor at a time: safetensors (also sharded, with an
`.index.json`, and BF16) and, only when asked by name, PyTorch pickles.

`TensorFile(path)` opens a safetensors file through a memory map: `keys()`, `shape(key)` and
`get(key)` (a NumPy array; BF16 as `ml_dtypes.bfloat16`) read nothing but the header until a
tensor is asked for, so a converter that places each tensor on its devices and drops it holds
one tensor in host memory at a time. `open_weights(directory, stem)` resolves
`<stem>.safetensors`, its sharded index, or (with `allow_pickle`) a pickle.

`read_torch_pickle(path, allow_pickle)` is the one reader of PyTorch pickles in fssjax: it
refuses unless `allow_pickle` is true (unpickling can execute code), imports torch only then,
loads with `torch.load(weights_only=True)`, unwraps a `{'state_dict': ...}` checkpoint, and
returns float tensors as float32 NumPy arrays (BF16 too; other dtypes unchanged). Non-tensor
entries are an error naming the key.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator, Mapping

import numpy as np

PICKLE_EXTS = (".bin", ".ckpt", ".pt", ".pth")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def is_safetensors(path: str) -> bool:
  """True if the file starts with a safetensors header (u64 length + JSON object)."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


class TensorFile:
  """One safetensors file, read lazily (see the module docstring)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
      (n,) = struct.unpack("<Q", head)
      try:
        self._header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    self._base = 8 + n
    self._header.pop("__metadata__", None)
    self._map = None
    # A file cut short (an interrupted download or copy) is named here, not at the first read.
    try:
      need = self._base + max((int(v["data_offsets"][1]) for v in self._header.values()),
                              default=0)
    except (TypeError, KeyError, IndexError, ValueError):
      raise ValueError(f"{path}: corrupt safetensors header (a tensor entry without "
                       "'data_offsets')") from None
    size = os.path.getsize(path)
    if size < need:
      raise ValueError(f"{path}: truncated safetensors file: its header needs {need} bytes, "
                       f"the file has {size} (an interrupted download or copy?)")

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self._header[key]
    dtypes = dict(_DTYPES)
    if info["dtype"] == "BF16":
      import ml_dtypes  # a jax dependency  # pylint: disable=g-import-not-at-top
      dtypes["BF16"] = ml_dtypes.bfloat16
    if info["dtype"] not in dtypes:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    if self._map is None:
      with open(self.path, "rb") as f:
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    begin, end = info["data_offsets"]
    arr = np.frombuffer(self._map, dtype=dtypes[info["dtype"]], count=(end - begin) //
                        np.dtype(dtypes[info["dtype"]]).itemsize, offset=self._base + begin)
    return arr.reshape(info["shape"]).copy()


class WeightFiles(Mapping):
  """A read-only {key: tensor} view over one safetensors file or a sharded set; each
  `[key]` reads that tensor only."""

  def __init__(self, files: list[TensorFile], where: str):
    self.where = where
    self._owner = {}
    for tf in files:
      for k in tf.keys():
        self._owner[k] = tf

  def __getitem__(self, key: str) -> np.ndarray:
    return self._owner[key].get(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._owner)

  def __len__(self) -> int:
    return len(self._owner)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._owner[key].shape(key)


class _Eager(dict):
  """A pickled state dict (already in memory) with the `WeightFiles` interface."""

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self[key].shape)


def read_torch_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  """A PyTorch pickle's state dict as NumPy arrays (see the module docstring).

  Raises:
    ValueError: without `allow_pickle`, or for an entry that is not a tensor.
    ImportError: torch is not installed.
  """
  if not allow_pickle:
    raise ValueError(
        f"{path} is a PyTorch pickle; loading it can execute arbitrary code. Convert it to "
        "safetensors (safetensors.torch.save_file(state_dict, path)) or opt in by name "
        "(config: model.allow_pickle_weights=True)")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading the pickled checkpoint {path} needs PyTorch "
                      "(pip install torch)") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
  out = _Eager()
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def open_file(path: str, allow_pickle: bool = False):
  """One weight file: safetensors (lazy) or, with `allow_pickle`, a pickle (eager)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if is_safetensors(path):
    return WeightFiles([TensorFile(path)], path)
  return read_torch_pickle(path, allow_pickle)


def open_weights(directory: str, stem: str, *, variant: str | None = None,
                 allow_pickle: bool = False):
  """`<stem>[.<variant>].safetensors`, its sharded index, or (with `allow_pickle`) a pickle
  `<stem>[.<variant>].bin/.ckpt/.pt/.pth` in `directory`, as a lazy {key: tensor} mapping.

  Raises:
    FileNotFoundError: no weight file.
    ValueError: a pickle without `allow_pickle`, a corrupt file, or an index naming tensors
      its shards lack.
  """
  name = stem if variant is None else f"{stem}.{variant}"
  single = os.path.join(directory, name + ".safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    return WeightFiles([TensorFile(single)], single)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dict")
    files = WeightFiles([TensorFile(os.path.join(directory, shard))
                         for shard in sorted(set(weight_map.values()))], index)
    missing = sorted(set(weight_map) - set(files))
    if missing:
      raise ValueError(f"{index}: tensors {missing[:5]} listed but not found in the shards")
    return files
  for ext in PICKLE_EXTS:
    path = os.path.join(directory, name + ext)
    if os.path.exists(path):
      return read_torch_pickle(path, allow_pickle)
  raise FileNotFoundError(f"no weights {name}.safetensors (or a sharded index) in {directory}")
