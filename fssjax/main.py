"""Train or evaluate one config.

  python -m fssjax.main --config=configs/hsnet_coco.py:demo --workdir=runs/demo
  python -m fssjax.main --config=configs/hsnet_coco.py:demo --print_config
  python -m fssjax.main --config=configs/hsnet_coco.py:fold=1 --config.optimizer.lr=5e-4 \\
      --config.train.num_steps=2000 --workdir=runs/f1
  python -m fssjax.main --config=configs/hsnet_coco.py:demo --workdir=runs/demo --mode=eval \\
      --outdir=/tmp/eval_demo

`--config` is an ml_collections config file whose `get_config(arg)` parses `arg` strictly;
single keys can be overridden with `--config.<section>.<key>=value` (for example
`--config.optimizer.lr=5e-4`, `--config.train.batch_size=16`, `--config.data.fold=1`). An
unknown key is an error naming the full path and the nearest valid keys; `--print_config`
prints the resolved config and exits.

mode=train (default): trains, evaluating per `config.evals`; resumes from the latest
checkpoint of `--workdir` (refused when data set, fold, model or batch differ from the
checkpoint's config, unless --allow_config_change); re-running a finished run evaluates its
last checkpoint if needed and exits 0. The resolved config is written to `WORKDIR/config.json`
once every check has passed.
mode=eval: evaluates the best checkpoint by validation mIoU (else the latest, or --step) of
`--workdir`, which is only read; results go to --outdir (default the workdir).

Mistakes in the config, the data or the inputs print one paragraph and exit with status 1.
Multi-host runs call `jax.distributed.initialize()` first when the environment describes one
(see `fssjax.sharding.initialize_distributed`); run the same command on every host.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
from typing import Sequence

# TensorFlow (imported by ml_collections' config flags and clu's writer) prints C++ INFO lines
# at import; silence them before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: path/to/config.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only "
                          "evaluate a checkpoint of --workdir.")
_STEP = flags.DEFINE_integer("step", None, "mode=eval: the checkpoint step to evaluate "
                             "(default: the best by validation mIoU, else the latest).")
_OUTDIR = flags.DEFINE_string("outdir", None, "mode=eval: where results go (default: "
                              "--workdir; use it for a read-only checkpoint directory).")
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume or evaluate although data "
                           "set, fold, model or batch differ from the checkpoint's config.")
flags.mark_flags_as_required(["config"])

# Libraries whose INFO lines are noise at start-up and on every checkpoint (orbax, absl's
# jax backend probing, clu's platform notes are kept: they carry the progress line).
_QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}xla_bridge",
          f"{os.sep}etils{os.sep}")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO / DEBUG records (and orbax's routine warnings) of chatty libraries."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    quiet = any(q in record.pathname for q in _QUIET)
    if quiet and f"{os.sep}orbax{os.sep}" in record.pathname:
      return record.levelno >= std_logging.ERROR
    return record.levelno >= std_logging.WARNING or not quiet


def _load_config_module(spec: str):
  filename = spec.split(":", 1)[0]
  module_spec = importlib.util.spec_from_file_location("_fssjax_config", filename)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def check_overrides(argv: Sequence[str]) -> str | None:
  """One paragraph for the first problem in `argv`'s --config / --config.* flags, or None.

  Builds the config like the flag does and checks every overridden key exists, so a
  mistyped key names the full path and the nearest valid keys instead of a traceback.
  """
  from fssjax import configlib  # pylint: disable=g-import-not-at-top
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None:
    return None
  if not os.path.isfile(spec.split(":", 1)[0]):
    return f"--config={spec}: no such config file ({os.path.abspath(spec.split(':', 1)[0])})"
  try:
    config = _load_config_module(spec).get_config(spec.split(":", 1)[1] if ":" in spec
                                                  else None)
  except ValueError as e:  # the config's own argument parsing (ConfigError)
    return f"--config={spec}: {e}"
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      message = configlib.unknown_key_message(key, config)
      if message:
        return message
  return None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"fssjax: unexpected arguments {list(argv[1:])}; every setting is a "
                     "flag (--config=..., --workdir=..., --config.<key>=value). See --help.")
  config = _CONFIG.value
  if _PRINT.value:
    from fssjax import configlib  # pylint: disable=g-import-not-at-top
    print(configlib.to_yaml(config), end="")
    return
  if not _WORKDIR.value:
    raise SystemExit(_missing_workdir())
  # On the handler: records of library loggers reach it by propagation, past logger filters.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from fssjax import sharding  # pylint: disable=g-import-not-at-top

  sharding.initialize_distributed()
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax import xla_cache  # pylint: disable=g-import-not-at-top

  xla_cache.enable()  # a second run (or a resume) compiles nothing

  from fssjax.methods import get_method_class  # pylint: disable=g-import-not-at-top

  own_loop = getattr(get_method_class(config), "own_training_loop", None)
  if own_loop is not None:  # a method the generic trainer cannot train yet (LLMFormer)
    if _MODE.value != "train":
      raise SystemExit(f"fssjax: method {config.method!r} trains and evaluates in one run "
                       "(--mode=train); it has no separate --mode=eval yet.")
    own_loop(config, _WORKDIR.value)
    return
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW.value)
    else:
      train.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value,
                                outdir=_OUTDIR.value, allow_config_change=_ALLOW.value)
  except train.MissingInputsError as e:
    raise SystemExit(f"fssjax: {e}\n{_demo_hint()}") from None
  except train.user_errors() as e:
    raise SystemExit(f"fssjax: {e}") from None


def _missing_workdir() -> str:
  """The one line for a run without --workdir (naming the flag and an example)."""
  spec = flags.FLAGS["config"].config_filename or "configs/hsnet_coco.py:demo"
  return (f"fssjax: --workdir is required (the run directory for checkpoints and results), "
          f"e.g. python -m fssjax.main --config={spec} --workdir=runs/demo")


def _demo_hint() -> str:
  """How to run this config's offline demo instead (when the config file has one)."""
  filename = flags.FLAGS["config"].config_filename.split(":", 1)[0]
  try:
    has_demo = "demo" in getattr(_load_config_module(filename), "DEFAULTS", {})
  except Exception:  # pylint: disable=broad-except
    has_demo = False
  if not has_demo:
    return "Point the config at the files (see the docstring of " + filename + ")."
  return ("Point the config at the files (see the docstring of " + filename + "), or run the "
          "offline demo, which needs nothing downloaded:\n  python -m fssjax.main "
          f"--config={filename}:demo --workdir=runs/demo")


def run() -> None:
  """The console entry point: argument checks that need no flags parsed, then `main`."""
  helps = {"--help": False, "-h": False, "-?": False, "--helpshort": False, "--helpfull": True}
  asked = [a for a in sys.argv[1:] if a in helps]
  if asked:  # absl exits 1 after --help; asking for help is not an error
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp=not helps[asked[0]], writeto_stdout=True)
    sys.exit(0)
  message = check_overrides(sys.argv[1:])
  if message:
    raise SystemExit(f"fssjax: {message}")
  app.run(main)


if __name__ == "__main__":
  run()
