"""Where the runs of a sweep execute: local subprocesses, Slurm job arrays, TPU VM slices.

local   submitit's `LocalExecutor`: each run is a subprocess running the very code a cluster
        job runs (pickled `TrainRun`, submitit's job runner, its requeue protocol); at most
        `max_parallel` at a time. Waits for all runs and reports each failed one with its
        log file.
slurm   one submitit job array (`AutoExecutor` + `executor.batch()`): partition, nodes, GPUs
        and tasks per node, time limit, array parallelism, account / QoS / constraint, setup
        lines, from flags or a YAML profile (`SlurmProfile.from_yaml`). submitit adds
        `--signal=USR2@<delay>` and requeues a run on timeout or preemption through
        `TrainRun.checkpoint` (exact resume from the run's last checkpoint). Returns once the
        array is submitted (or waits, with `wait=True`).
tpu_vm  Google's documented way to start a job on every host of a Cloud TPU VM slice (as in
        the big_vision and t5x READMEs): the same command on all workers,
          gcloud compute tpus tpu-vm ssh NAME --zone=ZONE [--project=P] --worker=all \\
            --command='cd REPO && python3 -m launch.worker --config=... --workdir=...'
        one run after the other (each uses the whole slice; `launch.worker` joins the hosts
        with `jax.distributed.initialize()` and skips a finished run). `dry_run` prints the
        commands instead of running them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import submitit

from launch import job as job_lib
from launch import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Outcome:
  """What happened to one run: status done | failed | skipped | submitted | dry_run."""

  name: str
  workdir: str
  status: str
  job_id: str = ""
  log: str = ""
  error: str = ""
  result: Mapping[str, Any] | None = None


def _python_path_env() -> None:
  """Job processes import `launch` and `fssjax` from this checkout."""
  paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  if REPO not in paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + paths)


def _job_log(job) -> str:
  try:
    return str(job.paths.stderr)
  except Exception:  # pylint: disable=broad-except
    return ""


def _short_error(text: str, lines: int = 3) -> str:
  rows = [r for r in str(text).strip().splitlines() if r.strip()]
  return " | ".join(rows[-lines:])


# ----------------------------------------------------------------------------------------
# local


def run_local(runs: Sequence[job_lib.TrainRun], logs_dir: str, *, max_parallel: int = 1,
              timeout_min: float = 24 * 60, poll_s: float = 1.0,
              on_submit: Callable[[job_lib.TrainRun, Any], None] | None = None,
              ) -> list[Outcome]:
  """Runs `runs` as local submitit jobs, `max_parallel` at a time; waits for all.

  Logs: `logs_dir/<run name>/<job id>_0_log.{out,err}`.
  """
  if max_parallel < 1:
    raise ValueError(f"max_parallel={max_parallel} must be >= 1")
  _python_path_env()
  queue = list(runs)
  running: list[tuple[job_lib.TrainRun, Any]] = []
  outcomes: dict[str, Outcome] = {}
  while queue or running:
    while queue and len(running) < max_parallel:
      run = queue.pop(0)
      executor = submitit.LocalExecutor(folder=os.path.join(logs_dir, run.name))
      executor.update_parameters(timeout_min=timeout_min)
      job = executor.submit(run)
      print(f"launch: started {run.name} (local job {job.job_id}; log {_job_log(job)})",
            flush=True)
      if on_submit is not None:
        on_submit(run, job)
      running.append((run, job))
    time.sleep(poll_s)
    still = []
    for run, job in running:
      if not job.done():
        still.append((run, job))
        continue
      outcomes[run.name] = _finished_outcome(run, job)
      o = outcomes[run.name]
      print(f"launch: {run.name} {o.status}" + (f": {o.error} (log {o.log})" if o.error
                                                 else ""), flush=True)
    running = still
  return [outcomes[r.name] for r in runs]


def _finished_outcome(run: job_lib.TrainRun, job) -> Outcome:
  log = _job_log(job)
  try:
    result = job.result()
  except Exception as e:  # pylint: disable=broad-except  (submitit raises on a failed job)
    # The run record holds the exception; submitit's message ends with the trace.
    error = job_lib.results_lib.read_record(run.workdir).get("error") or ""
    if not error:
      text = str(e).split("----")
      error = _short_error(text[1] if len(text) > 2 else str(e), lines=1)
    return Outcome(run.name, run.workdir, "failed", str(job.job_id), log, error)
  status = "skipped" if result and result.get("skipped") else "done"
  return Outcome(run.name, run.workdir, status, str(job.job_id), log, result=result)


# ----------------------------------------------------------------------------------------
# slurm


@dataclasses.dataclass
class SlurmProfile:
  """Slurm resources of every run of a sweep (one job array).

  partition, account, qos, constraint: the usual sbatch options ('' = cluster default).
  nodes, gpus_per_node, tasks_per_node (JAX: 1 process per node driving all its GPUs, the
  default; or one per GPU), cpus_per_task, mem_gb (0 = default).
  timeout_min: the time limit of one attempt; a run that needs longer is requeued and resumes.
  array_parallelism: how many runs of the array run at once.
  signal_delay_s: USR2 this long before the time limit (time to stop cleanly).
  max_num_timeout: how many times a run may be requeued after a timeout.
  setup: shell lines run before the job (module load, source venv/bin/activate, ...).
  additional: extra sbatch options {name: value}.
  """

  partition: str = ""
  account: str = ""
  qos: str = ""
  constraint: str = ""
  nodes: int = 1
  gpus_per_node: int = 0
  tasks_per_node: int = 1
  cpus_per_task: int = 0
  mem_gb: float = 0
  timeout_min: int = 240
  array_parallelism: int = 64
  signal_delay_s: int = 120
  max_num_timeout: int = 10
  setup: list[str] = dataclasses.field(default_factory=list)
  additional: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_yaml(cls, path: str, **overrides: Any) -> "SlurmProfile":
    """A profile from a YAML mapping of the fields above (`time` is accepted for
    timeout_min); `overrides` (non-None values) win."""
    import yaml  # pylint: disable=g-import-not-at-top
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
      raise ValueError(f"Slurm profile {path}: expected a mapping of fields, got "
                       f"{type(data).__name__}")
    if "time" in data:
      data["timeout_min"] = data.pop("time")
    return cls.from_dict(data, where=path, **overrides)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], where: str = "profile",
                **overrides: Any) -> "SlurmProfile":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
      raise ValueError(f"Slurm profile {where}: unknown field(s) {unknown}; known fields: "
                       f"{sorted(fields)}")
    merged = dict(data)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**merged)

  def executor_parameters(self, name: str) -> dict[str, Any]:
    p: dict[str, Any] = dict(
        name=name, nodes=self.nodes, tasks_per_node=self.tasks_per_node,
        timeout_min=self.timeout_min, slurm_array_parallelism=self.array_parallelism,
        slurm_signal_delay_s=self.signal_delay_s)
    if self.gpus_per_node:
      p["gpus_per_node"] = self.gpus_per_node
    if self.cpus_per_task:
      p["cpus_per_task"] = self.cpus_per_task
    if self.mem_gb:
      p["mem_gb"] = self.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
      if getattr(self, key):
        p[f"slurm_{key}"] = getattr(self, key)
    setup = list(self.setup) + [f"export PYTHONPATH={shlex.quote(REPO)}:${{PYTHONPATH:-}}"]
    p["slurm_setup"] = setup
    if self.additional:
      p["slurm_additional_parameters"] = dict(self.additional)
    return p


def slurm_executor(logs_dir: str, profile: SlurmProfile, name: str) -> submitit.AutoExecutor:
  """The submitit executor of a sweep's job array (logs in logs_dir/<array id>_<index>)."""
  executor = submitit.AutoExecutor(folder=os.path.join(logs_dir, "%j"), cluster="slurm",
                                   slurm_max_num_timeout=profile.max_num_timeout)
  executor.update_parameters(**profile.executor_parameters(name))
  return executor


def run_slurm(runs: Sequence[job_lib.TrainRun], logs_dir: str, profile: SlurmProfile, *,
              name: str = "fssjax", wait: bool = False) -> list[Outcome]:
  """Submits `runs` as one Slurm job array; with `wait`, waits and reports failures."""
  _python_path_env()
  executor = slurm_executor(logs_dir, profile, name)
  jobs = []
  with executor.batch():
    for run in runs:
      jobs.append(executor.submit(run))
  outcomes = []
  for run, job in zip(runs, jobs):
    print(f"launch: {run.name}: Slurm job {job.job_id} (log {_job_log(job)})", flush=True)
    outcomes.append(Outcome(run.name, run.workdir, "submitted", str(job.job_id),
                            _job_log(job)))
  if wait:
    outcomes = []
    for run, job in zip(runs, jobs):
      job.wait()
      outcomes.append(_finished_outcome(run, job))
  return outcomes


# ----------------------------------------------------------------------------------------
# tpu_vm


@dataclasses.dataclass
class TpuVm:
  """A Cloud TPU VM slice and how the repository is set up on its hosts.

  name, zone, project: the TPU (`gcloud compute tpus tpu-vm ...`; project '' = gcloud's).
  repo_dir: this repository on every host (cloned / copied there beforehand).
  python: the interpreter on the hosts.
  setup: shell run before the command on every host ('' = none), e.g.
    'source ~/venv/bin/activate'.
  gcloud: the gcloud executable.
  """

  name: str
  zone: str
  project: str = ""
  repo_dir: str = "~/fssjax"
  python: str = "python3"
  setup: str = ""
  gcloud: str = "gcloud"

  def worker_command(self, config_spec: str, workdir: str,
                     overrides: Mapping[str, Any]) -> str:
    """The shell command every host runs for one run."""
    args = [self.python, "-m", "launch.worker", f"--config={config_spec}",
            f"--workdir={workdir}"]
    args += [f"--override={k}={sweeps.format_value(v)}" for k, v in overrides.items()]
    repo = self.repo_dir
    # Keep '~' expandable by the remote shell; quote the rest.
    cd = (f"cd ~/{shlex.quote(repo[2:])}" if repo.startswith("~/") else
          "cd ~" if repo == "~" else f"cd {shlex.quote(repo)}")
    parts = [cd] + ([self.setup] if self.setup else []) + [shlex.join(args)]
    return " && ".join(parts)

  def ssh_command(self, remote: str) -> list[str]:
    """argv of `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command=...`."""
    cmd = [self.gcloud, "compute", "tpus", "tpu-vm", "ssh", self.name, f"--zone={self.zone}"]
    if self.project:
      cmd.append(f"--project={self.project}")
    cmd += ["--worker=all", f"--command={remote}"]
    return cmd


def run_tpu_vm(points: Sequence[tuple[str, str, Mapping[str, Any]]], tpu: TpuVm,
               config_spec: str, logs_dir: str, *, dry_run: bool = False,
               ) -> list[Outcome]:
  """Runs each (name, workdir, overrides) on every host of `tpu`, one after the other.

  With `dry_run`, prints each command (shell-quoted, ready to paste) and runs nothing. A run
  whose command fails is reported with its local log `logs_dir/<name>.log`; later runs go on.
  """
  outcomes = []
  for name, workdir, overrides in points:
    argv = tpu.ssh_command(tpu.worker_command(config_spec, workdir, overrides))
    line = shlex.join(argv)
    if dry_run:
      print(line, flush=True)
      outcomes.append(Outcome(name, workdir, "dry_run"))
      continue
    os.makedirs(logs_dir, exist_ok=True)
    log = os.path.join(logs_dir, f"{name}.log")
    print(f"launch: {name}: {line}\n  (log {log})", flush=True)
    with open(log, "a", encoding="utf-8") as f:
      f.write(f"$ {line}\n")
      f.flush()
      rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
    if rc == 0:
      outcomes.append(Outcome(name, workdir, "done", log=log))
    else:
      outcomes.append(Outcome(name, workdir, "failed", log=log,
                              error=f"exit status {rc}"))
      print(f"launch: {name} failed (exit status {rc}); log {log}", file=sys.stderr,
            flush=True)
  return outcomes
