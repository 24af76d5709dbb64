r"""Launch one run or a sweep of `fssjax.train.train_and_evaluate` runs.

  # the config file's sweep(), 2 runs at a time on this machine
  python -m launch.run --config=configs/hsnet_coco.py:demo --sweep --backend=local \
      --workdir=runs/demo_sweep --max_parallel=2

  # a sweep file of your own (a .py with sweep(), JSON or YAML list of override dicts) on a
  # Slurm cluster (one job array; resources from flags or --profile)
  python -m launch.run --config=configs/hsnet_coco.py:fold=0,root=/data/COCO2014 \
      --sweep --sweep_file=my_ablation.yaml --backend=slurm --workdir=/shared/runs/ablation \
      --partition=gpu --gpus_per_node=8 --time=1440 --array_parallelism=16

  # every host of a TPU VM slice (print the gcloud commands with --dry_run)
  python -m launch.run --config=configs/hsnet_coco.py:demo --sweep --backend=tpu_vm \
      --workdir=/mnt/shared/runs/demo_sweep --tpu_name=my-v4-32 --tpu_zone=us-central2-b \
      --dry_run   # a directory every host shares, so that launch.collect sees the results

  # a single run with overrides
  python -m launch.run --config=configs/hsnet_coco.py:demo --override=optimizer.lr=0.001 \
      --override=seed=1 --workdir=runs/lr1e-3

Each sweep point runs in `--workdir/<name>` (name from its overrides, `launch.sweeps.run_name`);
a single run uses `--workdir` itself. A finished run (results at its last step exist) is
skipped. `--workdir/sweep.json` lists the points; `--workdir/logs/` holds the job logs; each
run's `launch.json` its status. Collect the results with `python -m launch.collect WORKDIR`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from launch import backends
from launch import job as job_lib
from launch import sweeps

_CONFIG = flags.DEFINE_string("config", None, "Config file with its argument: path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep (or run) directory.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run the config's (or --sweep_file's) sweep.")
_SWEEP_FILE = flags.DEFINE_string(
    "sweep_file", None, "Python file with sweep() or get_hyper(hyper), or a JSON / YAML list "
    "of override dicts (implies --sweep).")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "key=value on the config (dotted key; repeatable); with a sweep, applied "
    "to every point.")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm", "tpu_vm"], "Where to run.")
_ONLY = flags.DEFINE_multi_string("only", [], "Run only the sweep points with these names.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would run (points, commands) and "
                             "run nothing.")
# local
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 1, "local: runs at the same time.")
_TIMEOUT_MIN = flags.DEFINE_float("timeout_min", None, "Time limit of one attempt in minutes "
                                  "(local default: 1 day; slurm: --time).")
# slurm
_PROFILE = flags.DEFINE_string("profile", None, "slurm: YAML file of SlurmProfile fields "
                               "(flags given explicitly win).")
_PARTITION = flags.DEFINE_string("partition", None, "slurm: partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "slurm: account.")
_QOS = flags.DEFINE_string("qos", None, "slurm: QoS.")
_CONSTRAINT = flags.DEFINE_string("constraint", None, "slurm: node constraint.")
_NODES = flags.DEFINE_integer("nodes", None, "slurm: nodes per run (>1: multi-node JAX).")
_GPUS = flags.DEFINE_integer("gpus_per_node", None, "slurm: GPUs per node.")
_TASKS = flags.DEFINE_integer("tasks_per_node", None, "slurm: processes per node (JAX: 1, "
                              "driving all local GPUs; or one per GPU).")
_CPUS = flags.DEFINE_integer("cpus_per_task", None, "slurm: CPUs per task.")
_MEM = flags.DEFINE_float("mem_gb", None, "slurm: memory per node in GB.")
_TIME = flags.DEFINE_integer("time", None, "slurm: time limit of one attempt, minutes; longer "
                             "runs are requeued and resume.")
_ARRAY_PAR = flags.DEFINE_integer("array_parallelism", None, "slurm: runs of the array at "
                                  "once.")
_SETUP = flags.DEFINE_multi_string("setup", [], "slurm: shell line run before each job "
                                   "(repeatable), e.g. 'source .venv/bin/activate'.")
_WAIT = flags.DEFINE_bool("wait", False, "slurm: wait for the array and report failures.")
# tpu_vm
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu_vm: TPU VM name.")
_TPU_ZONE = flags.DEFINE_string("tpu_zone", None, "tpu_vm: zone, e.g. us-central2-b.")
_TPU_PROJECT = flags.DEFINE_string("tpu_project", "", "tpu_vm: GCP project ('' = gcloud's).")
_TPU_REPO = flags.DEFINE_string("tpu_repo_dir", "~/fssjax", "tpu_vm: this repository on the "
                                "hosts.")
_TPU_PYTHON = flags.DEFINE_string("tpu_python", "python3", "tpu_vm: Python on the hosts.")
_TPU_SETUP = flags.DEFINE_string("tpu_setup", "", "tpu_vm: shell run first on every host, e.g. "
                                 "'source ~/venv/bin/activate'.")

flags.mark_flags_as_required(["config", "workdir"])


def _points() -> tuple[list[dict], dict, bool]:
  common = dict(sweeps.parse_override(o) for o in _OVERRIDE.value)
  if not (_SWEEP.value or _SWEEP_FILE.value):
    return [{}], common, False
  return sweeps.load_sweep(_CONFIG.value, _SWEEP_FILE.value), common, True


def plan(config_spec: str, workdir: str, points: Sequence[dict], is_sweep: bool,
         only: Sequence[str] = (), common: dict | None = None) -> list[job_lib.TrainRun]:
  """The TrainRuns of a sweep (configs built and overrides checked now, before submitting).

  Each point gets `common` (the --override's) on top; runs are named by the sweep's own keys
  (`workdir/<name>`), a single run (is_sweep False) uses `workdir` itself.

  Raises:
    ValueError: an unknown key or a bad value in any point (nothing is submitted).
  """
  keys = list(dict.fromkeys(k for p in points for k in p))
  points = [{**p, **(common or {})} for p in points]
  names = sweeps.run_names(points, keys) if is_sweep else [os.path.basename(workdir)]
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise ValueError(f"--only {unknown}: no such sweep point; points: {names}")
  runs = []
  for i, (name, point) in enumerate(zip(names, points)):
    if only and name not in only:
      continue
    config = sweeps.load_config(config_spec)
    where = f"sweep point {i} {name!r}" if is_sweep else "--override"
    sweeps.apply_overrides(config, point, where=where)
    run_dir = os.path.join(workdir, name) if is_sweep else workdir
    runs.append(job_lib.TrainRun(config, run_dir, name=name, overrides=point,
                                 config_spec=config_spec))
  return runs


def _write_sweep_json(workdir: str, backend: str, runs: Sequence[job_lib.TrainRun],
                      outcomes: Sequence[backends.Outcome]) -> None:
  from fssjax import utils  # pylint: disable=g-import-not-at-top
  by_name = {o.name: o for o in outcomes}
  path = os.path.join(workdir, "sweep.json")
  old = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  points = {p["name"]: p for p in old.get("points", [])}
  for r in runs:
    o = by_name.get(r.name)
    prev = points.get(r.name, {})
    if o is not None and o.status == "skipped":  # finished earlier: keep its job and log
      points[r.name] = dict(prev, name=r.name, overrides=r.overrides, workdir=r.workdir,
                            status="done")
      continue
    points[r.name] = dict(name=r.name, overrides=r.overrides, workdir=r.workdir,
                          status=o.status if o else prev.get("status", ""),
                          job_id=o.job_id if o else prev.get("job_id", ""),
                          log=o.log if o else prev.get("log", ""))
  utils.atomic_write_json(path, dict(config=_CONFIG.value, backend=backend,
                                     updated=time.time(), points=list(points.values())),
                          indent=2, default=str)


def _slurm_profile() -> backends.SlurmProfile:
  explicit = dict(partition=_PARTITION.value, account=_ACCOUNT.value, qos=_QOS.value,
                  constraint=_CONSTRAINT.value, nodes=_NODES.value, gpus_per_node=_GPUS.value,
                  tasks_per_node=_TASKS.value, cpus_per_task=_CPUS.value, mem_gb=_MEM.value,
                  timeout_min=_TIME.value or (int(_TIMEOUT_MIN.value) if _TIMEOUT_MIN.value
                                              else None),
                  array_parallelism=_ARRAY_PAR.value, setup=_SETUP.value or None)
  if _PROFILE.value:
    return backends.SlurmProfile.from_yaml(_PROFILE.value, **explicit)
  return backends.SlurmProfile.from_dict({}, **explicit)


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  workdir = os.path.abspath(_WORKDIR.value)
  backend = _BACKEND.value
  try:
    points, common, is_sweep = _points()
    runs = plan(_CONFIG.value, workdir, points, is_sweep, _ONLY.value, common)
  except (ValueError, FileNotFoundError) as e:
    print(f"launch: {e}", file=sys.stderr)
    return 2
  todo, outcomes = [], []
  for r in runs:
    # tpu_vm: the work directories live on the hosts, which check (launch.worker).
    if backend != "tpu_vm" and r.finished():
      print(f"launch: {r.name}: finished already ({r.workdir}); skipped", flush=True)
      outcomes.append(backends.Outcome(r.name, r.workdir, "skipped"))
    else:
      todo.append(r)
  print(f"launch: {len(runs)} run(s), {len(todo)} to run, backend {backend}", flush=True)
  if _DRY_RUN.value and backend != "tpu_vm":
    for r in todo:
      print(f"  {r.name}: {r.overrides} -> {r.workdir}")
    return 0
  logs = os.path.join(workdir, "logs")
  if not _DRY_RUN.value:  # a dry run writes nothing
    os.makedirs(workdir, exist_ok=True)
  if backend == "local":
    outcomes += backends.run_local(todo, logs, max_parallel=_MAX_PARALLEL.value,
                                   timeout_min=_TIMEOUT_MIN.value or 24 * 60)
  elif backend == "slurm":
    outcomes += backends.run_slurm(todo, logs, _slurm_profile(),
                                   name=os.path.basename(workdir), wait=_WAIT.value)
  else:
    if not (_TPU_NAME.value and _TPU_ZONE.value):
      print("launch: --backend=tpu_vm needs --tpu_name and --tpu_zone", file=sys.stderr)
      return 2
    tpu = backends.TpuVm(name=_TPU_NAME.value, zone=_TPU_ZONE.value,
                         project=_TPU_PROJECT.value, repo_dir=_TPU_REPO.value,
                         python=_TPU_PYTHON.value, setup=_TPU_SETUP.value)
    # Paths on the hosts as given here: a relative --workdir / --config is relative to the
    # repository on the hosts (use a shared or gs:// path to collect the results here).
    remote = _WORKDIR.value.rstrip("/")
    outcomes += backends.run_tpu_vm(
        [(r.name, f"{remote}/{r.name}" if is_sweep else remote, r.overrides) for r in todo],
        tpu, _CONFIG.value, logs, dry_run=_DRY_RUN.value)
  if not _DRY_RUN.value:
    _write_sweep_json(workdir, backend, runs, outcomes)
  failed = [o for o in outcomes if o.status == "failed"]
  for o in failed:
    print(f"launch: FAILED {o.name}: {o.error}\n  log: {o.log}", file=sys.stderr, flush=True)
  counts = {s: sum(o.status == s for o in outcomes) for s in dict.fromkeys(
      o.status for o in outcomes)}
  print(f"launch: {counts}", flush=True)
  return 1 if failed else 0


_HELPS = {"--help": False, "-h": False, "-?": False, "--helpshort": False, "--helpfull": True}


def run_main() -> None:
  """The entry point. Asking for help prints it and exits 0 (absl's --help exits 1)."""
  asked = [a for a in sys.argv[1:] if a in _HELPS]
  if asked:
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp=not _HELPS[asked[0]], writeto_stdout=True)
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run_main()
