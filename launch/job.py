"""`TrainRun`: one sweep point, the callable every backend runs.

`TrainRun(config, workdir, ...)()` is the ordinary `fssjax.train.train_and_evaluate(config,
workdir)` with, around it:

  * multi-process set-up first (`initialize_distributed`): inside a submitit job of several
    tasks (a multi-node Slurm job), `jax.distributed.initialize()` with the coordinator on the
    job's first host and the process count / index of submitit's `JobEnvironment`; elsewhere
    `fssjax.sharding.initialize_distributed()` (multi-host TPU VMs, `JAX_COORDINATOR_ADDRESS`);
  * a finished run (its results file at the last step exists) is skipped;
  * the run record `workdir/launch.json` (status, attempts, wall time, log paths, the error of
    a failed attempt) and the resolved `workdir/config.json`, written by process 0.

Requeue. `TrainRun` is a `submitit.helpers.Checkpointable`: when Slurm (or the local
executor) signals a timeout or preemption, submitit calls `checkpoint()`, which returns a
`DelayedSubmission` of this same callable; submitit requeues it and the new attempt's
`train_and_evaluate` resumes from the last checkpoint in `workdir/checkpoints` with the
trainer's exact resume (parameters, optimiser state, step, RNG and the data iterator's
position), so the requeued run ends where an uninterrupted run would. Work since the last
checkpoint is redone; `train.checkpoint_every` bounds it.
"""

from __future__ import annotations

import logging as std_logging
import os
import socket
import time
import traceback
from typing import Any, Callable, Mapping

import ml_collections
import submitit

from launch import results as results_lib

StepCallback = Callable[[int, Mapping[str, Any], Any], None]


def _job_environment():
  """submitit's JobEnvironment when running inside a submitit job, else None."""
  if not os.environ.get("SUBMITIT_EXECUTOR"):
    return None
  try:
    return submitit.JobEnvironment()
  except RuntimeError:
    return None


def coordinator_port(job_id: str) -> int:
  """A port in [20000, 29999] derived from the job id (one coordinator per job)."""
  digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
  return 20000 + int(digits[-6:]) % 10000


def initialize_distributed() -> bool:
  """Joins the job's processes into one JAX run when there are several (see module doc).

  Returns whether `jax.distributed.initialize` was called.
  """
  env = _job_environment()
  if env is not None and env.num_tasks > 1:
    import jax  # pylint: disable=g-import-not-at-top
    kwargs = dict(coordinator_address=f"{env.hostnames[0]}:{coordinator_port(env.job_id)}",
                  num_processes=env.num_tasks, process_id=env.global_rank)
    tasks_per_node = env.num_tasks // max(env.num_nodes, 1)
    if tasks_per_node > 1 and os.environ.get("FSSJAX_ONE_DEVICE_PER_TASK", "1") == "1":
      kwargs["local_device_ids"] = [env.local_rank]
    jax.distributed.initialize(**kwargs)
    return True
  from fssjax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.initialize_distributed()


def _is_lead() -> bool:
  env = _job_environment()
  if env is not None:
    return env.global_rank == 0
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def log_paths() -> dict[str, str]:
  """stdout / stderr of the current submitit task ({} outside submitit)."""
  env = _job_environment()
  if env is None:
    return {}
  try:
    paths = env.paths
    return {"stdout": str(paths.stdout), "stderr": str(paths.stderr)}
  except (KeyError, RuntimeError):
    return {}


class _QuietLibraryInfo(std_logging.Filter):
  """Drops INFO records of orbax (which logs every save step by step)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _prepare_process() -> None:
  """absl flags parsed (library code may read them); in a submitit job, INFO logs (the job
  log shows the trainer's progress, as `fssjax.main` does)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if _job_environment() is not None:
    logging.set_verbosity(logging.INFO)
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraryInfo) for f in logger.filters):
    logger.addFilter(_QuietLibraryInfo())


class TrainRun(submitit.helpers.Checkpointable):
  """One training run of a sweep (picklable: submitit ships it to the job).

  Args:
    config: the resolved config (overrides applied).
    workdir: the run's work directory.
    name: the run's name in its sweep.
    overrides: the overrides that made `config` (recorded in launch.json, used by collect).
    config_spec: 'path.py[:arg]' the config came from (recorded).
    step_callback: optional `fn(step, metrics, state)` passed to `train_and_evaluate` (hooks;
      it must be picklable).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, name: str = "",
               overrides: Mapping[str, Any] | None = None, config_spec: str = "",
               step_callback: StepCallback | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.name = name or os.path.basename(self.workdir)
    self.overrides = dict(overrides or {})
    self.config_spec = config_spec
    self.step_callback = step_callback

  # --- the run record -----------------------------------------------------------------

  def record(self) -> dict:
    return results_lib.read_record(self.workdir)

  def _write_record(self, **updates) -> dict:
    from fssjax import utils  # pylint: disable=g-import-not-at-top
    rec = self.record()
    rec.update(name=self.name, overrides=self.overrides, config=self.config_spec,
               workdir=self.workdir)
    rec.update(updates)
    utils.atomic_write_json(os.path.join(self.workdir, results_lib.RUN_RECORD), rec,
                            indent=2, default=str)
    return rec

  def finished(self) -> bool:
    return results_lib.finished(self.workdir, int(self.config.train.num_steps))

  # --- running ---------------------------------------------------------------------------

  def __call__(self) -> dict:
    _prepare_process()
    initialize_distributed()
    from fssjax import train  # pylint: disable=g-import-not-at-top
    from fssjax import utils  # pylint: disable=g-import-not-at-top
    lead = _is_lead()
    if self.finished():
      if lead:
        self._write_record(status="done")
      print(f"launch: {self.name} already finished in {self.workdir}; skipped", flush=True)
      return dict(name=self.name, workdir=self.workdir, skipped=True)
    os.makedirs(self.workdir, exist_ok=True)
    start = time.time()
    prev = self.record()
    wall = float(prev.get("wall_time_s") or 0.0)
    attempt = int(prev.get("attempts") or 0) + 1
    logs = log_paths()
    if lead:
      utils.atomic_write_bytes(os.path.join(self.workdir, "config.json"),
                               train.config_json(self.config).encode("utf-8"))
      history = list(prev.get("log_history") or [])
      if logs and logs not in history:
        history.append(logs)
      self._write_record(status="running", attempts=attempt, started=start,
                         host=socket.gethostname(), logs=logs, log_history=history,
                         error=None)
    self._attempt_start, self._wall_before = start, wall
    try:
      out = train.train_and_evaluate(self.config, self.workdir,
                                     step_callback=self.step_callback)
    except Exception as e:  # pylint: disable=broad-except
      if lead:
        self._write_record(status="failed", wall_time_s=wall + time.time() - start,
                           error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-4000:])
      raise
    if lead:
      self._write_record(status="done", wall_time_s=wall + time.time() - start,
                         finished=time.time(), step=out.get("step"),
                         start_step=out.get("start_step"))
    summary = {k: v for k, v in (out.get("results") or {}).items()
               if k in results_lib.METRICS}
    return dict(name=self.name, workdir=self.workdir, step=out.get("step"),
                start_step=out.get("start_step"), **summary)

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Called by submitit on timeout / preemption: requeue this same run.

    Nothing needs saving here: the resubmitted callable resumes from the trainer's last
    checkpoint in `workdir/checkpoints` (exact resume). Records the requeue in launch.json.
    """
    start = getattr(self, "_attempt_start", None)
    try:
      if _is_lead():
        wall = getattr(self, "_wall_before", 0.0) + (time.time() - start if start else 0.0)
        self._write_record(status="requeued", wall_time_s=wall,
                           requeues=int(self.record().get("requeues") or 0) + 1)
    except Exception:  # pylint: disable=broad-except
      pass  # the record is informative; never block the requeue
    for attr in ("_attempt_start", "_wall_before"):
      self.__dict__.pop(attr, None)
    return super().checkpoint(*args, **kwargs)
