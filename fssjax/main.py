"""Command line entry point: train or evaluate one config.

  python -m fssjax.main --config=configs/hsnet_coco.py[:arg] --workdir=DIR [--mode=train|eval]

`--config` is an ml_collections config file whose `get_config(arg)` parses `arg` strictly
(`fssjax.configlib.parse_arg`); single keys can be overridden with `--config.train.lr=...`.
The config is locked: overriding a key that does not exist is an error naming the key.

mode=train (default): `fssjax.train.train_and_evaluate`; resumes from the latest checkpoint
in `DIR/checkpoints` when there is one. The resolved config is written to `DIR/config.json`.
mode=eval: restores the best checkpoint by validation mIoU (else the latest, or `--step`) and
evaluates it on the config's test episodes; results go to `DIR/eval_results.json` (and the
resolved config to `DIR/eval_config.json`).

Multi-host runs call `jax.distributed.initialize()` first when the environment describes one
(JAX_COORDINATOR_ADDRESS, Slurm srun with several tasks, mpirun, multi-host TPU; see
`fssjax.sharding.initialize_distributed` for the exact rule). Run the same command on every
host; only process 0 writes TensorBoard events and JSON files.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
from typing import Sequence

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
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraryInfo(std_logging.Filter):
  """Drops INFO / DEBUG records of chatty libraries (orbax logs every save step by step)."""

  QUIET = (f"{os.sep}orbax{os.sep}",)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        q in record.pathname for q in self.QUIET)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  logging.get_absl_logger().addFilter(_QuietLibraryInfo())
  from fssjax import sharding  # pylint: disable=g-import-not-at-top

  sharding.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax import utils  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  logging.info("JAX: %d processes, %d devices (%s); config %s; workdir %s",
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind,
               flags.FLAGS["config"].config_filename, workdir)
  name = "config.json" if _MODE.value == "train" else "eval_config.json"
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    utils.atomic_write_bytes(os.path.join(workdir, name),
                             train.config_json(config).encode("utf-8"))
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir, step=_STEP.value)
  except train.MissingInputsError as e:
    raise SystemExit(f"fssjax: {e}\n{_demo_hint()}") from None


def _demo_hint() -> str:
  """How to run this config's offline demo instead (when the config file has one)."""
  # config_filename is the flag's whole value, 'path.py[:arg]'.
  filename = flags.FLAGS["config"].config_filename.split(":", 1)[0]
  try:
    spec = importlib.util.spec_from_file_location("_fssjax_config", filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    has_demo = "demo" in getattr(module, "DEFAULTS", {})
  except Exception:  # pylint: disable=broad-except
    has_demo = False
  if not has_demo:
    return "Point the config at the files (see the docstring of " + filename + ")."
  return ("Point the config at the files (see the docstring of " + filename + "), or run the "
          "offline demo, which needs nothing downloaded:\n  python -m fssjax.main "
          f"--config={filename}:demo --workdir=runs/demo")


if __name__ == "__main__":
  app.run(main)
