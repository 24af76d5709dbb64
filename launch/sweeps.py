"""The points of a sweep: override dicts applied strictly to a config's ConfigDict.

A sweep is a list of override dicts `{"data.fold": 0, "data.shot": 5, "seed": 1}` whose keys
are dotted paths into the config returned by `get_config(arg)`. It comes from

  * the config file itself: `def sweep(): return [...]` (optionally `sweep(arg)`, receiving
    the config argument), or big_vision's `def get_hyper(hyper): return hyper.product([...])`
    (google-research/big_vision configs; `Hyper` below implements the `sweep`, `product`,
    `chainit`, `zipit` and `fixed` it uses, with keys optionally prefixed `config.`);
  * a sweep file (`--sweep_file`): a Python file with the same `sweep()` / `get_hyper`, or a
    JSON / YAML file holding the list of dicts.

`--override k=v` adds the same overrides to every point (or makes a single run).

Every key must exist in the config (which is locked): an unknown key is a ValueError naming
the key, the point and the keys that do exist at that level. Values keep the ConfigDict's
type checks (an int field takes ints, a float field ints or floats, a tuple field a list).

Each point runs in its own work directory named from its overrides (`run_name`):
`fold=0_shot=5_seed=1` (last key component, or the full dotted key when two keys of the sweep
share their last component; characters other than letters, digits and `.-+=_,` become `-`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

Overrides = dict[str, Any]


# ----------------------------------------------------------------------------------------
# Config files.


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:demo,fold=1' -> ('configs/x.py', 'demo,fold=1'); no ':' -> (spec, None)."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_module(path: str, name: str = "_fssjax_launch_config"):
  """Imports the Python file `path` as a module (config and sweep files)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config / sweep file {path!r} does not exist (working directory "
                            f"{os.getcwd()})")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of 'path.py[:arg]', locked (unknown keys cannot be added)."""
  path, arg = split_config_spec(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path} has no get_config(arg) function")
  config = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config returned a {type(config).__name__}, expected an "
                     "ml_collections.ConfigDict")
  config.lock()
  return config


# ----------------------------------------------------------------------------------------
# big_vision-style hyper sweeps.


class Hyper:
  """The `hyper` object big_vision's `get_hyper(hyper)` receives, producing override lists.

  sweep(key, values): one point per value; product([a, b, ...]): the Cartesian product
  (dicts merged, the last list varying fastest); chainit([a, b]): a then b; zipit([a, b]):
  pointwise merge of equally long lists; fixed(key, value, length=1): `length` copies.
  Keys may carry big_vision's `config.` prefix, which is dropped.
  """

  @staticmethod
  def _key(key: str) -> str:
    return key[len("config."):] if key.startswith("config.") else key

  def sweep(self, key: str, values: Iterable[Any]) -> list[Overrides]:
    return [{self._key(key): v} for v in values]

  def fixed(self, key: str, value: Any, length: int = 1) -> list[Overrides]:
    return [{self._key(key): value} for _ in range(length)]

  def product(self, lists: Sequence[Sequence[Overrides]]) -> list[Overrides]:
    out = []
    for combo in itertools.product(*lists):
      merged: Overrides = {}
      for d in combo:
        merged.update(d)
      out.append(merged)
    return out

  def chainit(self, lists: Sequence[Sequence[Overrides]]) -> list[Overrides]:
    return [dict(d) for lst in lists for d in lst]

  def zipit(self, lists: Sequence[Sequence[Overrides]]) -> list[Overrides]:
    lengths = {len(lst) for lst in lists}
    if len(lengths) > 1:
      raise ValueError(f"hyper.zipit: lists of different lengths {sorted(lengths)}")
    out = []
    for combo in zip(*lists):
      merged: Overrides = {}
      for d in combo:
        merged.update(d)
      out.append(merged)
    return out


def _points_from_module(module, arg: str | None, where: str) -> list[Overrides] | None:
  if hasattr(module, "sweep"):
    fn = module.sweep
    takes_arg = bool(inspect.signature(fn).parameters)
    points = fn(arg) if takes_arg else fn()
  elif hasattr(module, "get_hyper"):
    points = module.get_hyper(Hyper())
  else:
    return None
  return check_points(points, where)


def check_points(points: Any, where: str) -> list[Overrides]:
  """Validates a list of override dicts (string keys)."""
  if not isinstance(points, (list, tuple)) or not points:
    raise ValueError(f"{where}: the sweep must be a non-empty list of override dicts, got "
                     f"{type(points).__name__} {points!r:.200}")
  out = []
  for i, p in enumerate(points):
    if not isinstance(p, Mapping) or not all(isinstance(k, str) for k in p):
      raise ValueError(f"{where}: sweep point {i} is {p!r:.200}; expected a dict with dotted "
                       "config keys, e.g. {'data.fold': 0}")
    out.append({Hyper._key(k): v for k, v in p.items()})
  return out


def load_sweep(config_spec: str, sweep_file: str | None = None) -> list[Overrides]:
  """The sweep points of `sweep_file` (if given) else of the config file's `sweep()` /
  `get_hyper(hyper)`.

  Raises:
    ValueError: no sweep defined, or a malformed one.
  """
  path, arg = split_config_spec(config_spec)
  if sweep_file:
    if sweep_file.endswith((".json", ".yaml", ".yml")):
      with open(sweep_file, encoding="utf-8") as f:
        if sweep_file.endswith(".json"):
          points = json.load(f)
        else:
          import yaml  # pylint: disable=g-import-not-at-top
          points = yaml.safe_load(f)
      return check_points(points, sweep_file)
    points = _points_from_module(load_module(sweep_file, "_fssjax_launch_sweep"), arg,
                                 sweep_file)
    if points is None:
      raise ValueError(f"Sweep file {sweep_file} defines neither sweep() nor get_hyper(hyper)")
    return points
  points = _points_from_module(load_module(path), arg, path)
  if points is None:
    raise ValueError(
        f"Config file {path} defines no sweep: add `def sweep(): return [{{'data.fold': 0}}, "
        "...]` (or big_vision's `get_hyper(hyper)`), or pass --sweep_file")
  return points


# ----------------------------------------------------------------------------------------
# Overrides.


def parse_override(text: str) -> tuple[str, Any]:
  """'train.lr=0.01' -> ('train.lr', 0.01). Values are Python literals, else strings."""
  key, sep, raw = text.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ValueError(f"--override {text!r}: expected key=value, e.g. data.fold=1")
  return key, parse_value(raw.strip())


def parse_value(raw: str) -> Any:
  low = raw.lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def format_value(value: Any) -> str:
  """The inverse of `parse_value` for literals (used on TPU VM command lines)."""
  return repr(value) if isinstance(value, str) else (
      repr(tuple(value)) if isinstance(value, list) else repr(value))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "") -> ml_collections.ConfigDict:
  """Sets every dotted key of `overrides` in `config` (in place; returned).

  Raises:
    ValueError: a key that does not exist (named, with the keys that do) or a value the
      field's type rejects.
  """
  at = f" ({where})" if where else ""
  for key, value in overrides.items():
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        here = ".".join(parts[:depth]) or "the config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(
            f"Unknown config key {key!r}{at}: {here} has no key {part!r}"
            + (f"; its keys are {known}" if known else f" ({here} is not a ConfigDict)"))
      if depth < len(parts) - 1:
        node = node[part]
    last = parts[-1]
    current = node[last]
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, bool) and isinstance(value, str) and value.lower() in ("true",
                                                                                 "false"):
      value = value.lower() == "true"
    if isinstance(current, ml_collections.ConfigDict) and not isinstance(value, Mapping):
      raise ValueError(f"Config key {key!r}{at} is a section; set its fields instead "
                       f"(e.g. {key}.{next(iter(current.keys()), 'x')}=...)")
    try:
      node[last] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ValueError(f"Config key {key!r}{at}: cannot set {value!r} "
                       f"(current value {current!r} of type {type(current).__name__}): {e}"
                       ) from None
  return config


# ----------------------------------------------------------------------------------------
# Run names.

_SAFE = re.compile(r"[^A-Za-z0-9.\-+=_,]")


def _value_text(v: Any) -> str:
  if isinstance(v, float):
    text = f"{v:g}"
  elif isinstance(v, (list, tuple)):
    text = "x".join(_value_text(x) for x in v)
  else:
    text = str(v)
  return _SAFE.sub("-", text) or "empty"


def short_keys(keys: Iterable[str]) -> dict[str, str]:
  """Dotted key -> its last component, unless two keys share it (then the full key)."""
  keys = list(dict.fromkeys(keys))
  last = [k.split(".")[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(overrides: Mapping[str, Any], names: Mapping[str, str] | None = None,
             max_len: int = 120) -> str:
  """'fold=0_shot=5_seed=1' for {'data.fold': 0, 'data.shot': 5, 'seed': 1}; 'base' if empty.

  Names longer than `max_len` are cut and end with a hash of the whole name.
  """
  if not overrides:
    return "base"
  names = names or short_keys(overrides)
  name = "_".join(f"{_SAFE.sub('-', names.get(k, k))}={_value_text(v)}"
                  for k, v in overrides.items())
  if len(name) > max_len:
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    name = name[:max_len - 11] + "-" + digest
  return name


def run_names(points: Sequence[Mapping[str, Any]],
              keys: Iterable[str] | None = None) -> list[str]:
  """Names of all points of a sweep (keys shortened consistently); unique.

  keys: the keys that name a run (default: all of each point's keys); the launcher passes the
    sweep's own keys, so that `--override`s shared by every point do not lengthen the names.

  Raises:
    ValueError: two points with the same name (identical overrides).
  """
  if keys is not None:
    keys = list(keys)
    points = [{k: p[k] for k in keys if k in p} for p in points]
  names = short_keys(k for p in points for k in p)
  out = [run_name(p, names) for p in points]
  seen: dict[str, int] = {}
  for i, n in enumerate(out):
    if n in seen:
      raise ValueError(f"Sweep points {seen[n]} and {i} give the same run {n!r} "
                       f"({points[seen[n]]} / {points[i]}): every point must differ")
    seen[n] = i
  return out
