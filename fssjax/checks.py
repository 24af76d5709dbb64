"""Checks of a run before anything heavy or anything written: config values, inputs on
disk, the config a checkpoint was trained with, and the frozen weights rebuilt from it.

Every failure is a user error with one paragraph naming the key, the value or the file
(`user_errors()` lists the exception types; `fssjax.main` prints them without a traceback).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fssjax import sharding as shd
from fssjax.methods import base, get_method_class
from fssjax.methods.base import ConfigError
from fssjax.optim import make_optimizer, make_schedule

PyTree = Any


class MissingInputsError(FileNotFoundError):
  """A job's data or weights are not where its config says (the message lists each)."""


class DivergenceError(FloatingPointError):
  """Training produced a non-finite loss, gradient or parameter."""


class ConfigMismatchError(ConfigError):
  """The config differs from the one a checkpoint was trained with (keys named)."""


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types that mean a user mistake (one paragraph, no traceback)."""
  from fssjax.data.base import DataError  # pylint: disable=g-import-not-at-top
  return (ConfigError, MissingInputsError, DivergenceError, DataError)


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
                 ) -> None:
  """Fails early, naming the key, on settings the loop cannot honour (before any data is
  indexed). Raises ConfigError."""
  t, o = config.train, config.optimizer
  base.precision_dtype(str(t.precision), "train.precision")
  for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size",
              "grad_accum"):
    if int(t[key]) < 1:
      raise ConfigError(f"train.{key}={t[key]} must be >= 1")
  lr = float(o.lr)
  if not (math.isfinite(lr) and lr > 0):
    raise ConfigError(f"optimizer.lr={o.lr!r} must be a finite number > 0")
  for key in ("weight_decay", "grad_clip", "warmup_steps"):
    if not float(o[key]) >= 0:
      raise ConfigError(f"optimizer.{key}={o[key]!r} must be >= 0")
  d = config.data
  if int(d.shot) < 1:
    raise ConfigError(f"data.shot={d.shot} must be >= 1 (K supports per episode)")
  from fssjax.data import folds, sources  # pylint: disable=g-import-not-at-top
  bench = sources.benchmark_of(d)
  if bench in folds.BENCHMARKS and not 0 <= int(d.fold) < folds.num_folds(bench):
    raise ConfigError(f"data.fold={d.fold} does not exist for {bench!r}: its folds are "
                      f"0..{folds.num_folds(bench) - 1}")
  make_schedule(o, int(t.num_steps))  # warm-up vs steps, schedule name
  make_optimizer(config)  # optimiser name
  if mesh is not None:
    shards = shd.batch_shards(mesh)
    if t.batch_size % (t.grad_accum * shards):
      raise ConfigError(
          f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
          f"{t.grad_accum} x {shards} batch shards (devices) = {t.grad_accum * shards}")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the process "
                      f"count {jax.process_count()}")
  get_method_class(config).model_keys(config)


def config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def preflight(config: ml_collections.ConfigDict, *, train: bool = True) -> None:
  """Checks that the config's data and weight files exist before anything heavy runs.

  Raises:
    MissingInputsError: one message naming every missing input (config key, value, and the
      absolute path that was looked at).
  """
  from fssjax.data import sources  # pylint: disable=g-import-not-at-top
  problems = sources.missing_inputs(config.data, ("train", "test") if train else ("test",))
  dense = missing_dense_data(config, train=train)
  keys = {p.split(":", 1)[0] for p in dense}
  problems += dense
  # (a method's own line for a dense block reported above is left out: no repetition)
  problems += [p for p in get_method_class(config).missing_inputs(config)
               if p.split(":", 1)[0] not in keys]
  if problems:
    raise MissingInputsError(
        f"{len(problems)} input(s) of this config are missing (working directory "
        f"{os.getcwd()}):\n" + "\n".join(
            "  - " + p.replace("\n", "\n    ") for p in problems))


def missing_dense_data(config: ml_collections.ConfigDict, *, train: bool = True) -> list[str]:
  """One entry per dense data block (`data.train` when training, `evals.*.data` of dense
  evaluators) of a registered benchmark layout (`fssjax.data.dense.LAYOUTS`) whose root is
  not there: '<key>: <benchmark>: data not found under root ... (looked in ...).' followed by
  the expected folder layout (further lines). For every method."""
  from fssjax.data import dense  # pylint: disable=g-import-not-at-top
  from fssjax.data.base import DataError  # pylint: disable=g-import-not-at-top
  blocks = []
  block = config.get("data", {}).get("train", None)
  if train and block:
    blocks.append(("data.train", block))
  for name, spec in (config.get("evals", None) or {}).items():
    if spec.get("type", "") == "dense" and spec.get("data", None):
      blocks.append((f"evals.{name}.data", spec.data))
  out, shown = [], set()
  for key, data in blocks:
    ds = str(data.get("dataset", ""))
    if ds not in dense.LAYOUTS:
      continue
    try:
      dense.resolve_root(ds, str(data.get("root", "") or ""))
    except DataError as e:
      first, _, layout = str(e).partition("\n")
      if ds in shown or not layout:
        out.append(f"{key}: {first}" + (" (expected layout: above)" if layout else ""))
      else:
        out.append(f"{key}: {first}\n{layout}")
      shown.add(ds)
  return out


# Keys that must match between a checkpoint's config and the one resuming / evaluating it.
_RUN_KEYS = ("method", "data.dataset", "data.fold", "data.image_size", "model.")
_RESUME_KEYS = _RUN_KEYS + ("train.batch_size", "train.grad_accum", "data.shot",
                            "data.train_shot_max", "data.train.", "seed")


# Keys that only affect evaluation (not the trained parameters): a finished run whose stored
# evaluation differs in them is evaluated again (`fssjax.train`). `every` (only the cadence)
# is left out. A method adds its own evaluation-only model keys with the class attribute
# `evaluation_keys` (e.g. `evaluation_keys = ('candidates',)`: `model.candidates`), which
# the run / resume checks (`check_stored_config(..., ignore=method_evaluation_keys(config))`)
# then do not count as a model change.
_EVAL_KEYS = ("evals.", "eval.", "data.test_episodes", "data.test_seed", "data.eval_resolution",
              "data.max_original_size", "data.support_check_size")
_EVAL_IGNORED_LEAVES = ("every",)


def method_evaluation_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """'model.<key>' for each key the method of `config` declares evaluation-only (its class
  attribute `evaluation_keys`, default none)."""
  try:
    cls = get_method_class(config)
  except Exception:  # pylint: disable=broad-except
    return ()
  return tuple(f"model.{k}" for k in getattr(cls, "evaluation_keys", ()) or ())


def evaluation_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Every config key (prefix) that only affects evaluation: `evals.*`, `eval.*`, the test
  episodes' data keys (`data.test_episodes`, `data.test_seed`, ...) and the method's
  `evaluation_keys`."""
  return _EVAL_KEYS + method_evaluation_keys(config)


def evaluation_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{flat key: value} of the evaluation part of `config` (`evaluation_keys`, without the
  cadence `every`): what a finished run's results.json records of how it was evaluated."""
  keys = evaluation_keys(config)
  flat = _flat(json.loads(config_json(config)))
  try:  # the method's evaluation-only model keys at their defaults when not set
    defaults = dict(getattr(get_method_class(config), "MODEL_DEFAULTS", {}) or {})
  except Exception:  # pylint: disable=broad-except
    defaults = {}
  for key in method_evaluation_keys(config):
    name = key[len("model."):]
    if key not in flat and name in defaults:
      flat[key] = _flat({"v": defaults[name]})["v"] if not isinstance(
          defaults[name], Mapping) else defaults[name]
  return {k: v for k, v in sorted(flat.items())
          if _matches(k, keys) and k.rsplit(".", 1)[-1] not in _EVAL_IGNORED_LEAVES}


def _matches(k: str, keys: tuple[str, ...]) -> bool:
  return any(k == p or (p.endswith(".") and k.startswith(p)) for p in keys)


def config_differences(stored: Mapping[str, Any], current: ml_collections.ConfigDict,
                       keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
  """'key: stored -> current' for each of `keys` (a trailing '.' takes the whole section),
  leaving out those matching `ignore` (e.g. `method_evaluation_keys(config)`)."""
  a, b = _flat(stored), _flat(json.loads(config_json(current)))
  out = []
  for k in sorted(set(a) | set(b)):
    if _matches(k, keys) and not _matches(k, ignore) and a.get(k) != b.get(k):
      out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
  return out


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_stored_config(meta: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                        keys: tuple[str, ...], allow: bool, what: str,
                        ignore: tuple[str, ...] = ()) -> list[str]:
  """Refuses (ConfigMismatchError) a config that differs from the checkpoint's in `keys`
  (other than `ignore`) unless `allow`; returns the differences (logged as a warning when
  allowed)."""
  stored = meta.get("config")
  if not stored:
    return []
  diff = config_differences(stored, config, keys, ignore)
  if diff and not allow:
    raise ConfigMismatchError(
        f"The config differs from the one the checkpoint was trained with, so {what} would "
        f"not be what it claims: {'; '.join(diff)}. Use the run's own config (its "
        f"config.json), another --workdir, or pass --allow_config_change to accept this.")
  for d in diff:
    logging.warning("Config differs from the checkpoint's (allowed): %s", d)
  return diff


def trained_on_test_classes(meta: Mapping[str, Any], config: ml_collections.ConfigDict
                            ) -> list[int]:
  """The current fold's test classes that the checkpoint's fold trained on ([] if unknown)."""
  stored = (meta.get("config") or {}).get("data") or {}
  data = config.data
  if stored.get("dataset") != data.dataset or int(stored.get("fold", -1)) == int(data.fold):
    return []
  from fssjax.data import folds  # pylint: disable=g-import-not-at-top
  try:
    trained = folds.fold_classes(data.dataset, int(stored["fold"]), "train")
    tested = folds.fold_classes(data.dataset, int(data.fold), "test")
  except (ValueError, KeyError):
    return []
  return sorted(set(trained) & set(tested))


def fingerprint(tree: PyTree) -> list[float]:
  """[number of leaves, sum |x|, sum x^2] in float64 on the host: a cheap identity check."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return [0.0, 0.0, 0.0]
  sums = jax.jit(lambda ls: [(jnp.sum(jnp.abs(x.astype(jnp.float32))),
                              jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in ls])(leaves)
  return [float(len(leaves)), sum(float(s[0]) for s in sums), sum(float(s[1]) for s in sums)]


def _check_frozen(meta: Mapping[str, Any], frozen: PyTree, *, strict: bool = True) -> None:
  """Compares the rebuilt frozen tree with the fingerprint stored at save time."""
  saved = meta.get("frozen_fingerprint")
  if not saved:
    return
  now = fingerprint(frozen)
  if saved[0] == now[0] and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
                                for a, b in zip(saved[1:], now[1:])):
    return
  msg = (f"The frozen weights rebuilt from the config (fingerprint {now}) differ from those "
         f"the checkpoint was trained with ({saved}): check the weight files / seed.")
  if strict:
    raise ConfigMismatchError(msg)
  logging.warning(msg)


def check_finite(pending: list[tuple[int, dict]], ckpt) -> list:
  """Fetches the pending per-step metrics; raises DivergenceError at the first bad step."""
  fetched = jax.device_get(pending)
  for step, m in fetched:
    if not bool(m["finite"]):
      what = [w for w, bad in (("the loss", not np.isfinite(m["loss"])),
                               ("the gradient", not np.isfinite(m["grad_norm"])),
                               ("the updated parameters", not bool(m["params_finite"]))) if bad]
      ckpt.wait()
      last = ckpt.latest_step()
      where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
               else "no checkpoint was written")
      raise DivergenceError(
          f"Training diverged at step {step}: loss={float(m['loss'])!r}, grad_norm="
          f"{float(m['grad_norm'])!r}; {' and '.join(what)} not finite. Nothing was saved "
          f"from this step on; {where}. Lower optimizer.lr, set optimizer.grad_clip or "
          f"check the data.")
  return fetched


def log_sizes(config, setup) -> int:
  n_p, b_p = base.tree_size(setup.abstract_state["params"])
  n_f, b_f = base.tree_size(setup.abstract_frozen)
  logging.info("%s: %s trainable parameters (%.1f MB; patterns %s), %s frozen (%.1f MB)",
               config.method, f"{n_p:,}", b_p / 1e6, setup.patterns, f"{n_f:,}", b_f / 1e6)
  return n_p
