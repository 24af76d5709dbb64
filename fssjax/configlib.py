"""Helpers for config files: parse `get_config(arg)` strings and apply them strictly.

A config file's `get_config(arg)` takes a string such as "demo" or "fold=1,shot=5,demo".
Bare words are flags (True); `key=value` pairs are literals (int, float, bool, None or str).
Unknown keys are an error naming the key and the known ones.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Mapping


def _config_error(message: str) -> Exception:
  from fssjax.methods.base import ConfigError  # pylint: disable=g-import-not-at-top
  return ConfigError(message)


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Parses "a=1,b=x,flag" against `defaults` (which lists every allowed key).

  Returns a dict with every key of `defaults`, overridden by the arg string. Values are
  converted to the type of the default when the default is not None.

  Raises:
    ConfigError (a ValueError): on an unknown key (naming the nearest known ones) or a value
      that does not convert.
  """
  out = dict(defaults)
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, raw = part.split("=", 1)
      key, raw = key.strip(), raw.strip()
    else:
      key, raw = part, "True"
    if key not in defaults:
      near = difflib.get_close_matches(key, sorted(defaults), n=3, cutoff=0.5)
      raise _config_error(
          f"Unknown config argument {key!r} in {arg!r}"
          f"{' (did you mean ' + ' or '.join(near) + '?)' if near else ''}; known arguments: "
          f"{sorted(defaults)}")
    out[key] = _convert(key, raw, defaults[key])
  return out


def _convert(key: str, raw: str, default: Any) -> Any:
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # a bare string such as resnet101
  if default is None or value is None:
    return value
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    raise _config_error(f"Config argument {key}={raw!r}: expected a bool")
  if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
    return value
  if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(default, str):
    return str(value) if not isinstance(value, str) else value
  if isinstance(value, type(default)):
    return value
  raise _config_error(
      f"Config argument {key}={raw!r}: expected a {type(default).__name__} like {default!r}")


def base_config():
  """The config schema every method shares; a config file fills in and extends it.

  Keys (method-specific settings live under `model`):
    method: name in `fssjax.methods.REGISTRY`.
    seed: seeds parameter init and the training episode stream.
    data.dataset: synthetic | coco20i | coco20i_contiguous | pascal5i | fss1000 | lvis92i.
    data.root: data root ('' for synthetic: the cache directory, see fssjax.data.synthetic).
    data.fold, data.shot: benchmark fold and K of the test episodes (and of training, unless
      data.train_shot_max > 0, in which case every training step draws K from 1..N).
    data.image_size: side of the square network input.
    data.resize: 'square' (HSNet: resize to image_size x image_size) or 'pad' (keep aspect,
      pad to the square; padded mask pixels are 255 = ignore).
    data.augment: random flip + zoom / crop of training episodes.
    data.train_image_interpolation: 'bilinear' or 'nearest' resize of training images
      (evaluation images are always bilinear).
    data.test_episodes, data.test_seed: the fixed evaluation episode list.
    data.workers: grain worker processes (0 = in-process).
    data.eval_resolution: 'resized' (score at the network resolution) or 'original'
      (upsample scores to the original query size and score against the original mask).
    data.support_check_size: 0 (published: no check) or the smallest feature side (e.g. 13
      for HSNet at 400): a support whose mask is empty at that size is redrawn in training
      and counted in evaluation (`support_empty`).
    train.*: global batch size, steps, logging / eval / checkpoint cadence, gradient
      accumulation, compute precision.
    optimizer.*: name (adam | adamw | sgd), lr, schedule (constant | linear | cosine),
      warm-up, weight decay, gradient clipping, Adam's b1 / b2 / eps.
    evals: named evaluators (`fssjax.evaluators`; empty: the episodic one of `eval`).
    model.trainable: regular expressions over the variable paths that are trained (None: the
      method's published choice, `Method.TRAINABLE`); the method's other keys go in `model`.
  """
  import ml_collections

  c = ml_collections.ConfigDict()
  c.method = ""
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      dataset="synthetic",
      root="",
      fold=0,
      shot=1,
      train_shot_max=0,
      image_size=400,
      resize="square",
      augment=False,
      train_image_interpolation="bilinear",  # or 'nearest' (DiffewS's training loader)
      test_episodes=1000,
      test_seed=0,
      workers=0,
      skip_corrupt=False,
      eval_resolution="resized",
      max_original_size=1024,  # canvas for original-size masks (eval_resolution='original')
      support_check_size=0,  # > 0: flag supports empty at this side (fssjax.data.pipeline)
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8,
      num_steps=10_000,
      log_every=50,
      eval_every=2_000,
      checkpoint_every=1_000,
      keep_checkpoints=3,
      grad_accum=1,
      fsdp=1,  # size of the mesh's 'fsdp' axis (parameters sharded over it when > 1)
      precision="float32",  # or bfloat16 (compute dtype; params stay float32)
      profile_steps=0,  # >0: write a profiler trace of this many steps after warm-up
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam",
      lr=1e-3,
      schedule="constant",
      warmup_steps=0,
      weight_decay=0.0,
      grad_clip=0.0,
      b1=0.9,  # Adam / AdamW moment decays and epsilon (PyTorch's defaults)
      b2=0.999,
      eps=1e-8,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=8,
      num_summary_images=4,
      # The evaluator whose mIoU is the headline (results.json 'results', the best
      # checkpoint); '' = the first of config.evals.
      primary="",
  ))
  c.evals = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.trainable = ml_collections.config_dict.placeholder(tuple)
  return c


def flat_keys(config) -> list[str]:
  """Every dotted key of a ConfigDict ('train.batch_size', ...)."""
  out = []
  for k, v in config.items():
    subs = flat_keys(v) if hasattr(v, "items") and not isinstance(v, dict) else []
    if subs:
      out += [f"{k}.{sub}" for sub in subs]
    else:
      out.append(str(k))
  return out


def unknown_key_message(key: str, config) -> str | None:
  """None when `key` (dotted) exists in `config`, else one paragraph naming the full path and
  the nearest valid keys (difflib)."""
  keys = flat_keys(config)
  if key in keys or any(k.startswith(key + ".") for k in keys):
    return None
  leaf = key.rsplit(".", 1)[-1]
  near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # the same name elsewhere first
  near += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.4) if k not in near]
  return (f"Unknown config key --config.{key}: this config has no key '{key}'."
          + (f" Nearest valid keys: {', '.join('--config.' + n for n in near[:4])}."
             if near else "")
          + " See every key with --print_config.")


def plain(value: Any) -> Any:
  """`value` (a ConfigDict, dict, list, tuple or leaf) as plain dicts, lists and scalars."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def to_yaml(config) -> str:
  """The resolved config as plain YAML (`--print_config`): sorted keys, short lists inline,
  no Python-specific tags (a tuple prints as a list)."""
  import yaml  # pylint: disable=g-import-not-at-top

  class Dumper(yaml.SafeDumper):
    pass

  Dumper.add_representer(list, lambda d, v: d.represent_sequence(
      "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (dict, list)) for x in v)))
  return yaml.dump(plain(config), Dumper=Dumper, default_flow_style=False, sort_keys=True,
                   width=100)
