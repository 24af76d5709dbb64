"""The command line: --help, --print_config, unknown keys, and user errors as one paragraph
before anything is written (each case one `python -m fssjax.main` subprocess, run together)."""

import os
import re
import subprocess
import sys

import pytest

from fssjax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "hsnet_coco.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("cli"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             FSSJAX_CACHE_DIR=os.path.join(tmp, "cache"))
  cases = {
      "help": ["--help"],
      "print": [f"--config={CONFIG}:demo", "--config.optimizer.lr=0.01", "--print_config"],
      "unknown": [f"--config={CONFIG}:demo", "--config.train.lr=0.1",
                  f"--workdir={tmp}/unknown"],
      "negative_lr": [f"--config={CONFIG}:demo", "--config.optimizer.lr=-0.001",
                      f"--workdir={tmp}/negative_lr"],
      "warmup": [f"--config={CONFIG}:demo", "--config.train.num_steps=20",
                 f"--workdir={tmp}/warmup"],
      "eval_missing": [f"--config={CONFIG}:demo", "--mode=eval", f"--workdir={tmp}/nothing"],
      "no_workdir": [f"--config={CONFIG}:demo"],
      "frozen_random_backbone": [f"--config={CONFIG}:fold=0,root={tmp}/coco",
                                 f"--workdir={tmp}/frozen_random_backbone"],
  }
  procs = {k: subprocess.Popen([sys.executable, "-m", "fssjax.main", *a], env=env, cwd=tmp,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, a in cases.items()}
  out = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=300)
    out[k] = (p.returncode, stdout, stderr)
  return tmp, out


def test_help_exits_zero_and_its_example_keys_exist(runs):
  _, out = runs
  rc, stdout, stderr = out["help"]
  assert rc == 0, stderr[-2000:]
  text = stdout + stderr
  keys = set(re.findall(r"--config\.([a-z_]+\.[a-z_]+)", text))
  assert keys, text[:2000]
  schema = configlib.flat_keys(configlib.base_config())
  assert keys <= set(schema), keys - set(schema)


def test_print_config_prints_the_resolved_config(runs):
  _, out = runs
  rc, stdout, stderr = out["print"]
  assert rc == 0, stderr[-2000:]
  assert "lr: 0.01" in stdout and "dataset: synthetic" in stdout
  # Plain YAML: tuples print as lists, without Python tags.
  assert "!!python" not in stdout
  assert "trainable: [params/learner/.*, params/backbone/.*]" in stdout
  assert "learner_channels: [16, 64, 128]" in stdout


def test_missing_workdir_is_one_line_naming_the_flag_and_an_example(runs):
  _, out = runs
  rc, stdout, stderr = out["no_workdir"]
  assert rc == 1
  assert stderr.strip().splitlines() == [
      "fssjax: --workdir is required (the run directory for checkpoints and results), e.g. "
      f"python -m fssjax.main --config={CONFIG}:demo --workdir=runs/demo"], stderr[-2000:]
  assert stdout == ""


def test_hsnet_with_a_frozen_random_backbone_stops_naming_the_weights_and_the_demo(runs):
  tmp, out = runs
  rc, _, stderr = out["frozen_random_backbone"]
  assert rc == 1 and "Traceback" not in stderr, stderr[-2000:]
  assert "model.backbone_weights is empty, but the resnet50 backbone is frozen" in stderr
  assert f"--config={CONFIG}:demo --workdir=runs/demo" in stderr
  assert not os.path.exists(os.path.join(tmp, "frozen_random_backbone"))


def test_unknown_key_names_the_path_and_the_nearest_keys(runs):
  tmp, out = runs
  rc, _, stderr = out["unknown"]
  assert rc == 1
  assert "Unknown config key --config.train.lr" in stderr
  assert "--config.optimizer.lr" in stderr
  assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 3
  assert not os.path.exists(os.path.join(tmp, "unknown"))


@pytest.mark.parametrize("case,expected", [
    ("negative_lr", "optimizer.lr=-0.001 must be a finite number > 0"),
    ("warmup", "optimizer.warmup_steps=50 must be >= 0 and < train.num_steps=20"),
])
def test_bad_values_fail_before_anything_is_written(runs, case, expected):
  tmp, out = runs
  rc, _, stderr = out[case]
  assert rc == 1 and expected in stderr, stderr[-2000:]
  assert "Traceback" not in stderr
  assert not os.path.exists(os.path.join(tmp, case))


def test_demo_warmup_scales_with_its_steps():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("hsnet_coco", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config("demo").optimizer.warmup_steps == 50
  assert module.get_config("demo,steps=20").optimizer.warmup_steps == 1


def test_evaluating_a_missing_run_creates_nothing(runs):
  tmp, out = runs
  rc, _, stderr = out["eval_missing"]
  assert rc == 1 and "No checkpoints in" in stderr and "Traceback" not in stderr
  assert "offline demo" not in stderr  # no unrelated hint (and this is the demo already)
  assert not os.path.exists(os.path.join(tmp, "nothing"))


@pytest.mark.parametrize("key,value,message", [
    ("fold", 7, "data.fold=7 does not exist for 'synthetic': its folds are 0..3"),
    ("shot", 0, "data.shot=0 must be >= 1"),
])
def test_fold_and_shot_are_checked_before_any_data_is_read(key, value, message):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from fssjax import checks  # pylint: disable=g-import-not-at-top
  from fssjax.methods.base import ConfigError  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "hsnet_coco_cfg", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                     "hsnet_coco.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo")
  config.data[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    checks.check_config(config)
