"""Tests of launch/: sweeps, the local / Slurm / TPU VM backends, requeue, collect.

Unit tests (in-process, no JAX work): sweep expansion (`sweep()`, big_vision `get_hyper`,
sweep files), strict overrides, run names, the Slurm profile.

End to end (one module fixture; a tiny HSNet -- resnet_tiny, 32 px, batch 4, 6 steps, 4
test episodes -- on a small generated synthetic set, subprocesses sharing a persistent
compilation cache), run concurrently:

  S  `python -m launch.run --sweep --backend=local --max_parallel=2`: the config file's
     2-point sweep (fold 0 / seed 0 and fold 1 / seed 1), the real submitit local executor;
  R  the sweep's first point again in another directory through `launch.backends.run_local`,
     preempted (SIGUSR2, as Slurm sends) while it holds at step 4 after its checkpoint:
     submitit calls `TrainRun.checkpoint`, requeues, and the new attempt resumes (S starts
     when R holds, so that R has put the train step into the compilation cache);

then `launch.collect` builds the table, and the tests check its rows against the runs'
results files, the requeued run's final parameters against the uninterrupted run's, the
skip of finished runs, the Slurm array script (fake `sbatch` / `srun` on PATH: the only test
double, standing in for the cluster) and the TPU VM dry-run command (whose remote command is
then run here, on the finished sweep, where it must skip the finished run).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from launch import backends  # noqa: E402
from launch import collect  # noqa: E402
from launch import job as job_lib  # noqa: E402
from launch import results as results_lib  # noqa: E402
from launch import sweeps  # noqa: E402

_CONFIG_FILE = '''
"""Tiny HSNet for launcher tests: resnet_tiny (frozen, random), 32 px, batch 4, 6 steps."""
from fssjax import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, dict(steps=6, root=""))
  c = configlib.base_config()
  c.method = "hsnet"
  c.seed = 0
  c.data.dataset = "synthetic"
  c.data.root = a["root"]
  c.data.image_size = 32
  c.data.test_episodes = 4
  c.train.batch_size = 4
  c.train.num_steps = a["steps"]
  c.train.log_every = 2
  c.train.eval_every = 0
  c.train.checkpoint_every = 2
  c.eval.batch_size = 4
  c.eval.num_summary_images = 0
  c.model.backbone = "resnet_tiny"
  return c


def sweep():
  return [{"data.fold": 0, "seed": 0}, {"data.fold": 1, "seed": 1}]
'''

# ----------------------------------------------------------------------------------------
# Unit tests.


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.fixture()
def tiny_config(tmp_path):
  return _write(str(tmp_path / "tiny.py"), _CONFIG_FILE)


def test_sweep_from_config_file_and_names(tiny_config):
  points = sweeps.load_sweep(f"{tiny_config}:steps=3")
  assert points == [{"data.fold": 0, "seed": 0}, {"data.fold": 1, "seed": 1}]
  assert sweeps.run_names(points) == ["fold=0_seed=0", "fold=1_seed=1"]
  config = sweeps.load_config(f"{tiny_config}:steps=3")
  sweeps.apply_overrides(config, points[1])
  assert config.data.fold == 1 and config.seed == 1 and config.train.num_steps == 3


def test_big_vision_get_hyper_and_sweep_files(tmp_path, tiny_config):
  hyper_file = _write(str(tmp_path / "hyper.py"), '''
def get_hyper(hyper):
  return hyper.product([
      hyper.sweep("config.data.shot", [1, 5]),
      hyper.zipit([hyper.sweep("config.data.fold", [0, 1]), hyper.sweep("config.seed", [7, 8])]),
  ])
''')
  points = sweeps.load_sweep(tiny_config, hyper_file)
  assert points == [{"data.shot": 1, "data.fold": 0, "seed": 7},
                    {"data.shot": 1, "data.fold": 1, "seed": 8},
                    {"data.shot": 5, "data.fold": 0, "seed": 7},
                    {"data.shot": 5, "data.fold": 1, "seed": 8}]
  h = sweeps.Hyper()
  assert h.chainit([h.sweep("a", [1]), h.fixed("b", 2, 2)]) == [{"a": 1}, {"b": 2}, {"b": 2}]
  json_file = _write(str(tmp_path / "s.json"), json.dumps([{"optimizer.lr": 0.01}]))
  assert sweeps.load_sweep(tiny_config, json_file) == [{"optimizer.lr": 0.01}]
  yaml_file = _write(str(tmp_path / "s.yaml"), "- {train.num_steps: 9}\n- {seed: 2}\n")
  assert sweeps.load_sweep(tiny_config, yaml_file) == [{"train.num_steps": 9}, {"seed": 2}]
  no_sweep = _write(str(tmp_path / "plain.py"), "def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="defines no sweep"):
    sweeps.load_sweep(no_sweep)


def test_overrides_are_strict(tiny_config):
  config = sweeps.load_config(tiny_config)
  with pytest.raises(ValueError, match=r"Unknown config key 'data\.fodl'.*has no key 'fodl'"
                                       r".*'fold'"):
    sweeps.apply_overrides(config, {"data.fodl": 1}, where="sweep point 3")
  with pytest.raises(ValueError, match="sweep point 3"):
    sweeps.apply_overrides(config, {"nope": 1}, where="sweep point 3")
  with pytest.raises(ValueError, match=r"Config key 'train\.num_steps'.*cannot set 'many'"):
    sweeps.apply_overrides(config, {"train.num_steps": "many"})
  with pytest.raises(ValueError, match="is a section"):
    sweeps.apply_overrides(config, {"train": 3})
  sweeps.apply_overrides(config, dict([sweeps.parse_override("optimizer.lr=3"),
                                       sweeps.parse_override("data.augment=true"),
                                       sweeps.parse_override("data.resize=pad")]))
  assert config.optimizer.lr == 3.0 and isinstance(config.optimizer.lr, float)
  assert config.data.augment is True and config.data.resize == "pad"
  for v in (0.001, "a b", True, (16, 64), 3):
    assert sweeps.parse_value(sweeps.format_value(v)) == v


def test_run_names_unique_and_short():
  pts = [{"data.fold": 0, "optimizer.lr": 1e-3}, {"data.fold": 0, "optimizer.lr": 3e-4}]
  assert sweeps.run_names(pts) == ["fold=0_lr=0.001", "fold=0_lr=0.0003"]
  assert sweeps.run_names([{"a.seed": 1, "b.seed": 2}]) == ["a.seed=1_b.seed=2"]
  assert sweeps.run_name({}) == "base"
  assert sweeps.run_name({"data.root": "/x/y z"}) == "root=-x-y-z"
  assert len(sweeps.run_name({"k": "v" * 300})) == 120
  with pytest.raises(ValueError, match="same run"):
    sweeps.run_names([{"seed": 1}, {"seed": 1}])


def test_checkpoint_resubmits_the_same_callable(tiny_config, tmp_path):
  config = sweeps.load_config(tiny_config)
  run = job_lib.TrainRun(config, str(tmp_path / "r"), name="r", overrides={"seed": 0})
  delayed = run.checkpoint()
  import submitit  # pylint: disable=g-import-not-at-top
  assert isinstance(delayed, submitit.helpers.DelayedSubmission)
  assert delayed.function is run and delayed.args == () and delayed.kwargs == {}
  assert results_lib.read_record(str(tmp_path / "r"))["status"] == "requeued"
  assert job_lib.coordinator_port("12345_7") == 20000 + 123457 % 10000


def test_multi_node_slurm_job_initializes_jax_distributed(monkeypatch):
  """Inside a 2-node x 2-task Slurm job, the coordinator, count and rank come from submitit's
  job environment (jax.distributed.initialize itself is recorded, not called)."""
  import jax  # pylint: disable=g-import-not-at-top
  for k in list(os.environ):
    if k.startswith(("SLURM_", "SUBMITIT_")):
      monkeypatch.delenv(k)
  monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
  for k, v in dict(SLURM_JOB_ID="777", SLURM_ARRAY_JOB_ID="770", SLURM_ARRAY_TASK_ID="3",
                   SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1",
                   SLURM_PROCID="3", SLURM_LOCALID="1",
                   SLURM_JOB_NODELIST="gpu[07-08]").items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert job_lib.initialize_distributed()
  assert calls == [dict(coordinator_address=f"gpu07:{job_lib.coordinator_port('770_3')}",
                        num_processes=4, process_id=3, local_device_ids=[1])]
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
  monkeypatch.setenv("FSSJAX_DISTRIBUTED", "0")  # the single-process path: nothing to join
  calls.clear()
  assert not job_lib.initialize_distributed() and not calls


def test_slurm_profile_yaml(tmp_path):
  path = _write(str(tmp_path / "p.yaml"), "partition: gpu\ntime: 90\nsetup: [module load cuda]\n")
  prof = backends.SlurmProfile.from_yaml(path, partition="big", nodes=None)
  assert prof.partition == "big" and prof.timeout_min == 90 and prof.nodes == 1
  assert prof.setup == ["module load cuda"]
  bad = _write(str(tmp_path / "bad.yaml"), "partitoin: gpu\n")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['partitoin'\]"):
    backends.SlurmProfile.from_yaml(bad)


# ----------------------------------------------------------------------------------------
# End to end.


class HoldAt:
  """step_callback: at `step` of the first attempt, note the pid and wait to be preempted."""

  def __init__(self, step: int, marker: str):
    self.step, self.marker = step, marker

  def __call__(self, step, metrics, state):
    del metrics, state
    if step == self.step and not os.path.exists(self.marker):
      with open(self.marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
      os.replace(self.marker + ".tmp", self.marker)
      time.sleep(240)  # the test sends SIGUSR2 now; submitit's handler exits from here


def _driver_requeue(cfg_spec: str, workdir: str, out: str) -> None:
  """R: point 0 of the sweep, preempted at step 4, requeued by submitit, resumed."""
  config = sweeps.load_config(cfg_spec)
  overrides = {"data.fold": 0, "seed": 0}
  sweeps.apply_overrides(config, overrides)
  marker = os.path.join(out, "held_pid")
  run = job_lib.TrainRun(config, workdir, name="requeued", overrides=overrides,
                         config_spec=cfg_spec, step_callback=HoldAt(4, marker))
  sent = {}

  def preempt():
    deadline = time.time() + 600
    while not os.path.exists(marker) and time.time() < deadline:
      time.sleep(0.2)
    with open(marker) as f:
      pid = int(f.read())
    os.kill(pid, signal.SIGUSR2)  # what Slurm sends before a time limit / preemption
    sent["pid"] = pid

  t = threading.Thread(target=preempt, daemon=True)
  t.start()
  outcomes = backends.run_local([run], os.path.join(out, "requeue_logs"), poll_s=0.5)
  t.join(timeout=5)
  with open(os.path.join(out, "requeue.json"), "w") as f:
    json.dump(dict(outcome=outcomes[0].__dict__, signalled=sent.get("pid")), f, default=str)


def _env(tmp: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", FSSJAX_CACHE_DIR=os.path.join(tmp, "index_cache"),
             JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return env


def _finish(proc: subprocess.Popen, name: str, timeout: float = 900) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
  if proc.returncode != 0:
    raise AssertionError(f"{name} failed (rc {proc.returncode}):\n{out[-6000:]}")
  return out


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("launch_e2e"))
  from fssjax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = synthetic.ensure(os.path.join(tmp, "data"), train=60, val=40, size=48, workers=1)
  cfg = _write(os.path.join(tmp, "tiny.py"), _CONFIG_FILE)
  spec = f"{cfg}:root={root}"
  sweep_dir = os.path.join(tmp, "sweep")
  out = os.path.join(tmp, "out")
  os.makedirs(out)
  popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
               env=_env(tmp))
  t0 = time.time()
  r = subprocess.Popen([sys.executable, os.path.abspath(__file__), "requeue", spec,
                        os.path.join(tmp, "requeued"), out], **popen)
  # The sweep starts once R holds at step 4: its train step is then in the compilation cache.
  while not os.path.exists(os.path.join(out, "held_pid")) and r.poll() is None:
    time.sleep(0.2)
  s = subprocess.Popen([sys.executable, "-m", "launch.run", f"--config={spec}", "--sweep",
                        "--backend=local", f"--workdir={sweep_dir}", "--max_parallel=2"],
                       **popen)
  s_log = _finish(s, "S (local sweep)")
  t_sweep = time.time() - t0
  r_log = _finish(r, "R (requeued run)")
  print(f"launch e2e: sweep {t_sweep:.0f}s, total {time.time() - t0:.0f}s")
  with open(os.path.join(out, "requeue.json")) as f:
    requeue = json.load(f)
  # A second launch of the same sweep: both runs are finished, nothing is submitted.
  again = subprocess.run([sys.executable, "-m", "launch.run", f"--config={spec}", "--sweep",
                          "--backend=local", f"--workdir={sweep_dir}"], capture_output=True,
                         text=True, cwd=REPO, env=_env(tmp), timeout=300)
  return dict(tmp=tmp, root=root, cfg=cfg, spec=spec, sweep_dir=sweep_dir, out=out,
              s_log=s_log, r_log=r_log, requeue=requeue, again=again, t_sweep=t_sweep)


def _final_params(workdir: str, step: int):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fssjax import checkpointing  # pylint: disable=g-import-not-at-top
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    assert step in c.all_steps(), c.all_steps()
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(c.restore_params(step)))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_local_sweep_runs_every_point(e2e):
  sweep_dir = e2e["sweep_dir"]
  assert "launch: 2 run(s), 2 to run, backend local" in e2e["s_log"], e2e["s_log"][-3000:]
  for name, fold, seed in (("fold=0_seed=0", 0, 0), ("fold=1_seed=1", 1, 1)):
    d = os.path.join(sweep_dir, name)
    rec = results_lib.read_record(d)
    assert rec["status"] == "done" and rec["attempts"] == 1, rec
    assert rec["overrides"] == {"data.fold": fold, "seed": seed}
    assert os.path.exists(rec["logs"]["stderr"]) and sweep_dir in rec["logs"]["stderr"]
    with open(os.path.join(d, "config.json")) as f:
      saved = json.load(f)
    assert saved["data"]["fold"] == fold and saved["seed"] == seed
    assert results_lib.finished(d, 6)
  with open(os.path.join(sweep_dir, "sweep.json")) as f:
    points = json.load(f)["points"]
  assert [p["status"] for p in points] == ["done", "done"]
  # Launching again skips both finished runs.
  again = e2e["again"]
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished already") == 2 and "0 to run" in again.stdout


def test_collect_table_rows_come_from_results_files(e2e):
  sweep_dir = e2e["sweep_dir"]
  assert collect.main([sweep_dir]) == 0
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["fold=0_seed=0", "fold=1_seed=1"]
  for row in rows:
    records = results_lib.read_results(os.path.join(sweep_dir, row["run"]))
    assert len(records) == 1
    rec = records[0]
    assert row["data.fold"] == str(rec["fold"]) and row["seed"] in ("0", "1")
    assert int(row["step"]) == rec["step"] == 6
    assert int(row["shot"]) == rec["shot"] == 1
    for m in ("miou", "fbiou", "baseline_miou", "baseline_fbiou"):
      assert float(row[m]) == pytest.approx(rec[m], abs=1e-9), m
    assert 0.0 <= float(row["miou"]) <= 100.0 and float(row["baseline_fbiou"]) > 0
    assert float(row["wall_time_s"]) > 0
  with open(os.path.join(sweep_dir, "results_summary.csv")) as f:
    summary = list(csv.DictReader(f))
  assert len(summary) == 1 and summary[0]["n"] == "2"  # fold and seed are averaged over
  for m in ("miou", "fbiou"):
    values = [float(r[m]) for r in rows]
    assert float(summary[0][f"{m}_mean"]) == pytest.approx(sum(values) / 2, abs=1e-9)
    assert float(summary[0][f"{m}_std"]) == pytest.approx(
        abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-9)
  mious = [float(r["miou"]) for r in rows]
  with open(os.path.join(sweep_dir, "results.md")) as f:
    md = f.read()
  assert "| fold=0_seed=0 | 0 | 0 | train | 0 | 1 | 6 |" in md, md
  assert f"{mious[1]:.2f}" in md
  # TensorBoard HParams: the experiment config and one session per run, with its scalars.
  tb = os.path.join(sweep_dir, "tensorboard")
  tags = _event_tags(tb)
  assert "_hparams_/experiment" in tags
  for row in rows:
    run_tags = _event_tags(os.path.join(tb, row["run"]))
    assert {"_hparams_/session_start_info", "results/miou", "results/fbiou"} <= run_tags


def _event_tags(directory: str) -> set[str]:
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(path).Load():
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_preempted_run_requeues_and_resumes_exactly(e2e):
  req = e2e["requeue"]
  assert req["signalled"], req
  assert req["outcome"]["status"] == "done", req
  workdir = os.path.join(e2e["tmp"], "requeued")
  rec = results_lib.read_record(workdir)
  assert rec["status"] == "done" and rec["attempts"] == 2 and rec["requeues"] == 1, rec
  with open(os.path.join(workdir, "results.json")) as f:
    resumed = json.load(f)
  assert resumed["start_step"] == 4 and resumed["step"] == 6
  log = open(req["outcome"]["log"]).read()
  assert "Requeued job" in log and "Caught signal SIGUSR2" in log
  straight = _final_params(os.path.join(e2e["sweep_dir"], "fold=0_seed=0"), 6)
  again = _final_params(workdir, 6)
  assert sorted(straight) == sorted(again)
  worst = max(float(abs(straight[k] - again[k]).max()) for k in straight)
  assert worst <= 1e-6, worst
  with open(os.path.join(e2e["sweep_dir"], "fold=0_seed=0", "results.json")) as f:
    straight_res = json.load(f)["results"]
  assert resumed["results"]["miou"] == pytest.approx(straight_res["miou"], abs=1e-6)


def _fake_slurm_bin(tmp: str) -> tuple[str, str]:
  bin_dir = os.path.join(tmp, "fake_slurm_bin")
  record = os.path.join(tmp, "sbatch_record")
  os.makedirs(bin_dir)
  os.makedirs(record)
  _write(os.path.join(bin_dir, "sbatch"), f"""#!/bin/sh
# Test double of the cluster's sbatch: keep the script, answer like Slurm.
cp "$1" {shlex.quote(record)}/submission.sh
echo "$@" > {shlex.quote(record)}/argv
echo "Submitted batch job 4242"
""")
  _write(os.path.join(bin_dir, "srun"), "#!/bin/sh\nexit 0\n")
  for name in ("sbatch", "srun"):
    os.chmod(os.path.join(bin_dir, name), 0o755)
  return bin_dir, record


def test_slurm_array_submission_script(tiny_config, tmp_path):
  tmp = str(tmp_path)
  spec = f"{tiny_config}:root=/shared/data/synthetic"
  bin_dir, record = _fake_slurm_bin(tmp)
  profile = _write(os.path.join(tmp, "cluster.yaml"),
                   "partition: gpu-long\ngpus_per_node: 8\nnodes: 2\ntime: 90\n"
                   "array_parallelism: 4\nsetup: ['source /venv/bin/activate']\n")
  env = _env(tmp)
  env["PATH"] = bin_dir + os.pathsep + env["PATH"]
  slurm_dir = os.path.join(tmp, "slurm_sweep")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.run", f"--config={spec}", "--sweep",
       "--backend=slurm", f"--workdir={slurm_dir}", f"--profile={profile}",
       "--array_parallelism=1", "--override=train.num_steps=8"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "Slurm job 4242_0" in proc.stdout and "Slurm job 4242_1" in proc.stdout
  with open(os.path.join(record, "submission.sh")) as f:
    script = f.read()
  for line in ("#SBATCH --partition=gpu-long", "#SBATCH --array=0-1%1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=2", "#SBATCH --time=90",
               "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1",
               "source /venv/bin/activate", f"export PYTHONPATH={REPO}:"):
    assert line in script, (line, script)
  assert f"-m submitit.core._submit {slurm_dir}/logs/%j" in script.replace("'", ""), script
  assert "srun" in script
  # The pickled jobs are the two sweep points with --override applied.
  pickles = sorted(glob.glob(os.path.join(slurm_dir, "logs", "4242_*", "*_submitted.pkl")))
  assert len(pickles) == 2, os.listdir(os.path.join(slurm_dir, "logs"))
  runs = []
  for p in pickles:
    with open(p, "rb") as f:
      runs.append(pickle.load(f).function)
  assert [r.name for r in runs] == ["fold=0_seed=0", "fold=1_seed=1"]
  assert [r.config.data.fold for r in runs] == [0, 1]
  assert all(isinstance(r, job_lib.TrainRun) and r.config.train.num_steps == 8 and
             r.config.data.root == "/shared/data/synthetic" for r in runs)
  assert runs[1].workdir == os.path.join(slurm_dir, "fold=1_seed=1")
  with open(os.path.join(slurm_dir, "sweep.json")) as f:
    assert [p["job_id"] for p in json.load(f)["points"]] == ["4242_0", "4242_1"]


def test_help_exits_zero():
  proc = subprocess.run([sys.executable, "-m", "launch.run", "--help"], capture_output=True,
                        text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--backend" in proc.stdout and "--dry_run" in proc.stdout


def test_tpu_vm_dry_run_writes_nothing(tiny_config, tmp_path):
  workdir = tmp_path / "never"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.run", f"--config={tiny_config}", "--sweep",
       "--backend=tpu_vm", f"--workdir={workdir}", "--tpu_name=t", "--tpu_zone=z",
       "--dry_run"], capture_output=True, text=True, cwd=REPO, env=_env(str(tmp_path)),
      timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("gcloud compute tpus tpu-vm ssh t") == 2, proc.stdout
  assert not workdir.exists()


def test_tpu_vm_dry_run_command(e2e):
  env = _env(e2e["tmp"])
  proc = subprocess.run(
      [sys.executable, "-m", "launch.run", f"--config={e2e['spec']}", "--sweep",
       "--backend=tpu_vm", f"--workdir={e2e['sweep_dir']}", "--tpu_name=my-v4-32",
       "--tpu_zone=us-central2-b", "--tpu_project=proj", f"--tpu_repo_dir={REPO}",
       "--tpu_setup=source ~/venv/bin/activate", "--dry_run", "--override=seed=0"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("gcloud ")]
  assert len(lines) == 2, proc.stdout
  argv = shlex.split(lines[1])
  remote = (f"cd {REPO} && source ~/venv/bin/activate && python3 -m launch.worker "
            f"--config={e2e['spec']} --workdir={e2e['sweep_dir']}/fold=1_seed=0 "
            "--override=data.fold=1 --override=seed=0")
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32",
                  "--zone=us-central2-b", "--project=proj", "--worker=all",
                  f"--command={remote}"], argv
  # The remote command as a host runs it (here, on the finished sweep, without the venv
  # line): fold=0_seed=0 is finished, so the worker skips it.
  first = shlex.split(lines[0])[-1][len("--command="):]
  cmd = first.replace("source ~/venv/bin/activate && ", "").replace(
      "python3 ", shlex.quote(sys.executable) + " ")
  ran = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env,
                       timeout=300)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert "fold=0_seed=0 already finished" in ran.stdout


def test_failed_run_is_reported_with_its_log(e2e, tmp_path):
  env = _env(e2e["tmp"])
  proc = subprocess.run(
      [sys.executable, "-m", "launch.run", f"--config={e2e['cfg']}:root=/nonexistent/data",
       "--backend=local", f"--workdir={tmp_path / 'broken'}", "--override=data.dataset=coco20i"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "FAILED broken" in proc.stderr and "log: " in proc.stderr
  log = proc.stderr.split("log: ")[1].split()[0]
  assert os.path.exists(log) and "MissingInputsError" in open(log).read()
  rec = results_lib.read_record(str(tmp_path / "broken"))
  assert rec["status"] == "failed" and "MissingInputsError" in rec["error"]
  # An unknown key fails before anything is submitted, naming the key.
  proc = subprocess.run(
      [sys.executable, "-m", "launch.run", f"--config={e2e['spec']}", "--sweep",
       f"--workdir={tmp_path / 'x'}", "--override=train.num_stepz=3"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 2 and "Unknown config key 'train.num_stepz'" in proc.stderr
  assert not os.path.exists(tmp_path / "x" / "logs")


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.FLAGS.mark_as_parsed()
  {"requeue": _driver_requeue}[sys.argv[1]](*sys.argv[2:])
