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
last checkpoint if needed (no evaluation yet, or one made with another evaluation config:
evals.*, eval.*, test-episode keys, the method's `evaluation_keys`; the changes are named)
and exits 0. The resolved config is written to `WORKDIR/config.json`
once every check has passed.
With `config.variants` ({name: overrides of config.model}) each variant is a run of its own
in WORKDIR/<name>, and a table of their mIoUs ends the output (`run_config`), also written with
each variant's headline numbers and results path to WORKDIR/variants.json.
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

  try:
    run_config(config, _WORKDIR.value, mode=_MODE.value, step=_STEP.value,
               outdir=_OUTDIR.value, allow_config_change=_ALLOW.value)
  except train.MissingCheckpointError as e:  # nothing to download: no demo hint
    raise SystemExit(f"fssjax: {e}") from None
  except train.MissingInputsError as e:
    hint = _demo_hint()
    raise SystemExit(f"fssjax: {e}" + (f"\n{hint}" if hint else "")) from None
  except train.user_errors() as e:
    raise SystemExit(f"fssjax: {e}") from None


def variant_configs(config) -> dict:
  """{name: config} of `config.variants` ({name: overrides of config.model}; each config
  without the `variants` key), or {} when the config has none."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  variants = config.get("variants", None)
  if not variants:
    return {}
  out = {}
  for name, overrides in variants.items():
    d = config.to_dict()
    d.pop("variants")
    cfg = ml_collections.ConfigDict(d)
    for key, value in dict(overrides).items():
      cfg.model[key] = value
    out[str(name)] = cfg
  return out


def run_config(config, workdir: str, *, mode: str = "train", step: int | None = None,
               outdir: str | None = None, allow_config_change: bool = False) -> dict:
  """Trains (`mode='train'`: `fssjax.train.train_and_evaluate`) or evaluates (`'eval'`:
  `evaluate_checkpoint`) `config` in `workdir`.

  With `config.variants` ({name: overrides of config.model}, e.g. an ablation of one
  switch) each variant is its own run, one after the other, in `workdir/<name>` (own
  checkpoints, resume, results; `outdir/<name>` in eval mode), and a table of every
  variant's evaluator mIoUs is printed at the end and written, with each variant's headline
  numbers and results path, to `workdir/variants.json` (`outdir` in eval mode; atomic). Returns the run's result dict, or
  {name: result dict} with variants.
  """
  from fssjax import train  # pylint: disable=g-import-not-at-top

  def one(cfg, wd, od):
    if mode == "train":
      return train.train_and_evaluate(cfg, wd, allow_config_change=allow_config_change)
    return train.evaluate_checkpoint(cfg, wd, step=step, outdir=od,
                                     allow_config_change=allow_config_change)

  variants = variant_configs(config)
  if not variants:
    return one(config, workdir, outdir)
  out = {}
  for name, cfg in variants.items():
    print(f"[variant {name}] {dict(config.variants[name])}", flush=True)
    out[name] = one(cfg, os.path.join(workdir, name),
                    os.path.join(outdir, name) if outdir else None)
  table = variants_table(out)
  print(table, flush=True)
  if jax_process_index() == 0:
    from fssjax import utils  # pylint: disable=g-import-not-at-top
    base = outdir if (mode == "eval" and outdir) else workdir
    utils.atomic_write_json(os.path.join(base, "variants.json"),
                            variants_record(out, base, mode), indent=2)
  return out


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def variants_record(results: dict, base: str, mode: str = "train") -> dict:
  """What `run_config` writes to `base/variants.json` after the variants: for each variant
  its headline ('miou' of its primary evaluator), each evaluator's mIoU and its results file
  (`base/<name>/results.json`, or `eval_results.json` in eval mode), plus the table."""
  name = "results.json" if mode == "train" else "eval_results.json"
  variants = {}
  for variant, res in results.items():
    head = res.get("results") or {}
    variants[variant] = dict(
        miou=head.get("miou"), primary=res.get("primary"), step=res.get("step"),
        evals={k: {"miou": v.get("miou")} for k, v in (res.get("evals") or {}).items()},
        results_path=os.path.join(os.path.abspath(base), variant, name))
  return dict(mode=mode, variants=variants, table=variants_table(results))


def variants_table(results: dict) -> str:
  """A Markdown table: one row per variant, one column per evaluator (its mIoU), the primary
  evaluator (`eval.primary`) first."""
  names = []
  for res in results.values():
    primary = res.get("primary")
    for key in [primary] + list(res.get("evals") or {}):
      if key and key in (res.get("evals") or {}) and key not in names:
        names.append(key)
  lines = ["| variant | " + " | ".join(f"{n} mIoU" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  for variant, res in results.items():
    evals = res.get("evals") or {}
    cells = [f"{evals[n]['miou']:.2f}" if n in evals and evals[n].get("miou") is not None
             else "-" for n in names]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _missing_workdir() -> str:
  """The one line for a run without --workdir (naming the flag and an example)."""
  spec = flags.FLAGS["config"].config_filename or "configs/hsnet_coco.py:demo"
  return (f"fssjax: --workdir is required (the run directory for checkpoints and results), "
          f"e.g. python -m fssjax.main --config={spec} --workdir=runs/demo")


def _demo_hint() -> str:
  """How to run this config's offline demo instead (when the config file has one and the
  demo is not what is being run), or ''."""
  spec = flags.FLAGS["config"].config_filename
  filename, _, arg = spec.partition(":")
  if "demo" in [a.split("=", 1)[0].strip() for a in arg.split(",")]:
    return ""
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
