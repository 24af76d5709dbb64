"""Lets `clu.metric_writers` (and `clu.periodic_actions`) import without TensorFlow.

`clu/metric_writers/__init__.py` imports clu's TensorFlow summary writer unconditionally.
`install()` registers `clu.metric_writers.summary_writer` in `sys.modules` first, with
`SummaryWriter(logdir)` = `fssjax.monitoring.TensorBoardWriter(logdir)` (event files written
with the `tensorboard` package, no TensorFlow), so clu never imports TensorFlow. Cheap (no
import of clu or TensorFlow) and idempotent; `fssjax/__init__.py` and `fssjax.monitoring` call
it, so the order of imports does not matter once `fssjax` is imported.
"""

from __future__ import annotations

import sys
import types

NAME = "clu.metric_writers.summary_writer"


def _summary_writer(logdir):
  from fssjax import monitoring  # pylint: disable=g-import-not-at-top
  return monitoring.TensorBoardWriter(logdir)


def install() -> bool:
  """Registers the stand-in unless clu's writers are already imported; True if it did."""
  if "clu.metric_writers" in sys.modules or NAME in sys.modules:
    return False
  shim = types.ModuleType(NAME, "fssjax's stand-in for clu's TensorFlow summary writer: "
                          "SummaryWriter(logdir) is fssjax.monitoring.TensorBoardWriter.")
  shim.SummaryWriter = _summary_writer
  sys.modules[NAME] = shim
  return True
