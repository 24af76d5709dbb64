r"""One run on this host (the command `--backend=tpu_vm` runs on every host of a slice).

  python3 -m launch.worker --config=configs/hsnet_coco.py:demo --workdir=runs/NAME/fold=0 \
      --override=data.fold=0

Builds the config, applies the overrides strictly (an unknown key is an error naming it) and
runs `launch.job.TrainRun`: `jax.distributed.initialize()` when the hosts form one run
(multi-host TPU VM), skip if finished, `fssjax.train.train_and_evaluate`, the run record.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app
from absl import flags

from launch import job as job_lib
from launch import sweeps

_CONFIG = flags.DEFINE_string("config", None, "Config file with its argument: path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's work directory.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "key=value on the config (repeatable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  overrides = dict(sweeps.parse_override(o) for o in _OVERRIDE.value)
  config = sweeps.load_config(_CONFIG.value)
  try:
    sweeps.apply_overrides(config, overrides, where="--override")
  except ValueError as e:
    sys.exit(f"launch.worker: {e}")
  run = job_lib.TrainRun(config, _WORKDIR.value, name=os.path.basename(
      os.path.normpath(_WORKDIR.value)), overrides=overrides, config_spec=_CONFIG.value)
  run()


if __name__ == "__main__":
  app.run(main)
