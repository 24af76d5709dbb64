"""Tests of the generic training loop (fssjax.train) and the CLI (fssjax.main).

Cheap unit tests run in-process: optimiser / schedule parity with plain optax, gradient
accumulation on a small user-defined Method, config checks.

The end-to-end tests train a tiny HSNet (resnet_tiny, frozen random backbone, 32 px, global
batch 8) on a tiny generated COCO-format data set (the synthetic generator's images and
instances JSON, laid out as COCO 2014, read through the real COCO source). One module fixture
runs, in subprocesses sharing a persistent compilation cache:

  S1 (1 device):  run A: 6 steps straight (checkpoints + evaluation at 3 and 6);
                  run B: the same config, stopped by an exception right after checkpoint 3;
                  run C: a copy of A continued with optimizer.lr=inf (divergence at step 7);
  S4 (8 CPU devices, concurrently with S1): 3 steps of the same config, checkpoint at 3;
  S2 (CLI, after S1): `python -m fssjax.main` resumes run B to step 6;
  S3 (CLI): an unknown config key and an unknown config argument are errors.

and the tests compare: B resumed == A (parameters to 1e-6), 8-device losses == 1-device losses
(1e-5), the 8-device checkpoint restored on 1 device, the NaN stop, the files in the workdir.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax import checkpointing
from fssjax import configlib
from fssjax import optim
from fssjax import sharding as shd
from fssjax import train
from fssjax.methods.base import Method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------
# Unit tests (in-process, small programs).


def _opt_config(**overrides):
  c = configlib.base_config()
  c.train.num_steps = 20
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.mark.parametrize("name,schedule,wd,clip,reference", [
    ("adam", "constant", 0.0, 0.0,
     lambda s: optax.adam(s)),
    ("adam", "cosine", 0.01, 0.5,
     lambda s: optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(0.01),
                           optax.adam(s))),
    ("adamw", "linear", 0.1, 0.0,
     lambda s: optax.adamw(s, weight_decay=0.1)),
    ("sgd", "cosine", 0.0, 0.0,
     lambda s: optax.sgd(s, momentum=0.9)),
])
def test_optimizer_matches_optax_with_the_lr_inside(name, schedule, wd, clip, reference):
  """Runtime base lr x unit-peak profile == the optax optimiser built with the full schedule."""
  config = _opt_config(**{"optimizer.name": name, "optimizer.schedule": schedule,
                          "optimizer.weight_decay": wd, "optimizer.grad_clip": clip,
                          "optimizer.lr": 0.05, "optimizer.warmup_steps": 3})
  opt = optim.make_optimizer(config)
  full = optim.make_schedule(config.optimizer, 20)
  ref = reference(full)
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones((3,))}
  p_ours, s_ours = params, opt.tx.init(params)
  p_ref, s_ref = params, ref.init(params)
  for step in range(8):
    grads = jax.tree.map(lambda x: jnp.sin(x * (step + 1)) + 0.1 * step, p_ours)
    u, s_ours = opt.tx.update(grads, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, jax.tree.map(lambda x: x * opt.base_lr, u))
    u, s_ref = ref.update(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    np.testing.assert_allclose(float(opt.schedule(step)), float(full(step)), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_schedules():
  opt = ml_collections.ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=4))
  s = optim.make_schedule(opt, 14)
  np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 9, 14)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  opt.schedule = "linear"
  s = optim.make_schedule(opt, 14)
  np.testing.assert_allclose([float(s(i)) for i in (4, 9, 14)], [1.0, 0.5, 0.0], atol=1e-6)
  opt.schedule, opt.warmup_steps = "constant", 0
  assert float(optim.make_schedule(opt, 14)(13)) == 1.0
  opt.schedule = "step"
  with pytest.raises(ValueError, match="optimizer.schedule='step'"):
    optim.make_schedule(opt, 14)
  with pytest.raises(ValueError, match="optimizer.name='lamb'"):
    optim.make_optimizer(_opt_config(**{"optimizer.name": "lamb"}))


class _Linear(Method):
  """A user-defined method: per-pixel linear regression of the mask from the query image."""

  TRAINABLE = ("w", "b")

  def init(self, rng, batch):
    return {"w": jax.random.normal(rng, (3,)) * 0.1, "b": jnp.zeros(()), "scale": jnp.ones(())}

  def loss(self, params, frozen, batch, rng):
    pred = batch["query_image"] @ params["w"] * frozen["scale"] + params["b"]
    err = (pred - batch["query_mask"].astype(jnp.float32)) ** 2
    per_example = err.mean(axis=(1, 2))
    return per_example.mean(), {"mse_max": per_example.max()}

  def predict(self, params, frozen, batch):
    return batch["query_image"] @ params["w"] + params["b"]


def test_grad_accumulation_equals_full_batch():
  config = configlib.base_config()
  config.train.batch_size = 8
  config.train.num_steps = 3
  rng = np.random.default_rng(0)
  batches = [{"query_image": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
              "query_mask": rng.integers(0, 2, size=(8, 4, 4)).astype(np.uint8)}
             for _ in range(3)]
  mesh = shd.make_mesh()
  out = {}
  for accum in (1, 4):
    config.train.grad_accum = accum
    setup = train.build_setup(config, _Linear(config), mesh, batches[0])
    state, frozen = train.init_state(setup)
    step = train.make_train_step(setup, accum)
    lr = jnp.float32(setup.optimizer.base_lr)
    losses = []
    for b in batches:
      state, m = step(state, frozen, shd.global_batch(b, mesh), lr)
      losses.append(float(m["loss"]))
    out[accum] = (losses, jax.device_get(state["params"]), int(state["step"]))
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert out[4][2] == out[1][2] == 3
  assert out[1][0][2] < out[1][0][0]  # it trains


def test_step_compiled_during_init_is_the_jitted_step():
  """The trainer compiles the train step in a background thread while it initialises the
  variables (start-up time); that executable gives the jitted step's results, and a batch of
  other shapes (another K) goes through the jitted step."""
  config = configlib.base_config()
  config.train.batch_size = 8
  rng = np.random.default_rng(1)
  batch = {"query_image": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
           "query_mask": rng.integers(0, 2, size=(8, 4, 4)).astype(np.uint8)}
  mesh = shd.make_mesh()
  setup = train.build_setup(config, _Linear(config), mesh, batch)
  pre = train.PrecompiledStep(train.make_train_step(setup), setup, setup.example_batch)
  jitted = train.make_train_step(setup)
  lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
  (s1, f1), (s2, f2) = train.init_state(setup), train.init_state(setup)
  s1, m1 = pre(s1, f1, shd.global_batch(batch, mesh), lr)
  s2, m2 = jitted(s2, f2, shd.global_batch(batch, mesh), lr)
  assert pre._future is not None and pre._future.exception() is None  # it was used
  assert float(m1["loss"]) == float(m2["loss"])
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = {k: np.concatenate([v, v], axis=1) for k, v in batch.items()}  # 8 x 4 pixels
  s1, m3 = pre(s1, f1, shd.global_batch(other, mesh), lr)
  assert int(s1["step"]) == 2 and np.isfinite(float(m3["loss"]))


def test_check_config_errors():
  mesh = shd.make_mesh()
  c = configlib.base_config()
  c.train.batch_size, c.train.grad_accum = 6, 4
  with pytest.raises(ValueError, match="train.batch_size=6 must be divisible by train.grad_accum"):
    train.check_config(c, mesh)
  c.train.grad_accum, c.train.precision = 1, "float8"
  with pytest.raises(ValueError, match="train.precision='float8'"):
    train.check_config(c, mesh)
  c.train.precision, c.train.log_every = "bfloat16", 0
  with pytest.raises(ValueError, match="train.log_every=0"):
    train.check_config(c, mesh)
  c.train.log_every, c.optimizer.lr = 1, -1e-3
  with pytest.raises(ValueError, match="optimizer.lr=-0.001 must be a finite number > 0"):
    train.check_config(c, mesh)
  c.optimizer.lr, c.optimizer.warmup_steps, c.train.num_steps = 1e-3, 50, 20
  c.optimizer.schedule = "cosine"
  with pytest.raises(ValueError, match="warmup_steps=50 must be >= 0 and < train.num_steps=20"):
    train.check_config(c, mesh)


def test_flatten_config():
  from fssjax import monitoring  # pylint: disable=g-import-not-at-top
  flat = monitoring.flatten_config(_opt_config())
  assert flat["optimizer.lr"] == 1e-3 and flat["train.num_steps"] == 20
  assert flat["data.dataset"] == "synthetic"
  assert monitoring.format_eta(3725) == "1:02:05"


# ----------------------------------------------------------------------------------------
# End-to-end: tiny HSNet runs in subprocesses.

_CONFIG_FILE = '''
"""Tiny HSNet for tests: resnet_tiny (frozen, random), 32 px, global batch 8."""
from fssjax import configlib
from fssjax import optim


def get_config(arg=None):
  a = configlib.parse_arg(arg, dict(steps=6, root=""))
  c = configlib.base_config()
  c.method = "hsnet"
  c.seed = 3
  c.data.dataset = "coco20i"
  c.data.root = a["root"]
  c.data.image_size = 32
  c.data.test_episodes = 4
  c.train.batch_size = 8
  c.train.num_steps = a["steps"]
  c.train.log_every = 1
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.eval.batch_size = 4
  c.eval.num_summary_images = 2
  c.model.backbone = "resnet_tiny"
  return c
'''


def _load_config(path: str, arg: str = ""):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _flat_params(params) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(params))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


class _Stop(Exception):
  pass


def _driver_single(cfg_path: str, root: str, out: str) -> None:
  """S1: runs A, B (stopped after checkpoint 3) and C (diverges)."""
  config = _load_config(cfg_path, f"root={root}")
  record = {"A": [], "B": []}

  def callback(run):
    def fn(step, metrics, state):
      record[run].append(float(metrics["loss"]))
      if run == "A" and step in (3, 6):
        np.savez(os.path.join(out, f"A_params_{step}.npz"), **_flat_params(state["params"]))
      if run == "B" and step == 3:
        raise _Stop()
    return fn

  train.train_and_evaluate(config, os.path.join(out, "A"), step_callback=callback("A"))
  try:
    train.train_and_evaluate(config, os.path.join(out, "B"), step_callback=callback("B"))
  except _Stop:
    pass
  shutil.copytree(os.path.join(out, "A"), os.path.join(out, "C"))
  config.train.num_steps = 9
  config.train.checkpoint_every = 1
  config.train.log_every = 100
  config.optimizer.lr = float("inf")
  # The config check refuses lr=inf; bypass it to force a non-finite update at step 7.
  train.check_config = lambda *args, **kwargs: None
  try:
    train.train_and_evaluate(config, os.path.join(out, "C"))
    record["nan_error"] = None
  except train.DivergenceError as e:
    record["nan_error"] = str(e)
  with open(os.path.join(out, "single.json"), "w") as f:
    json.dump(record, f)


def _driver_eight(cfg_path: str, root: str, out: str) -> None:
  """S4: 3 steps on 8 devices, checkpoint at 3, no evaluation."""
  assert jax.device_count() == 8, jax.devices()
  config = _load_config(cfg_path, f"root={root},steps=3")
  config.train.eval_every = -1
  losses = []

  def fn(step, metrics, state):
    losses.append(float(metrics["loss"]))
    if step == 3:
      p = state["params"]
      leaf = jax.tree.leaves(p)[0]
      assert len(leaf.sharding.device_set) == 8, leaf.sharding
      np.savez(os.path.join(out, "E_params_3.npz"), **_flat_params(p))

  train.train_and_evaluate(config, os.path.join(out, "E"), step_callback=fn)
  with open(os.path.join(out, "eight.json"), "w") as f:
    json.dump({"losses": losses}, f)


def _tiny_coco(root: str) -> str:
  """A tiny COCO-2014-layout data set from the synthetic generator (real images + JSON)."""
  from fssjax.data import synthetic  # pylint: disable=g-import-not-at-top
  synth = os.path.join(root, "synth")
  synthetic.generate(synth, train=60, val=30, size=48, workers=1)
  coco = os.path.join(root, "coco")
  os.makedirs(os.path.join(coco, "annotations"))
  for sub, name in (("train", "train2014"), ("val", "val2014")):
    os.symlink(synthetic.image_dir(synth, sub), os.path.join(coco, name))
    os.symlink(synthetic.annotation_file(synth, sub),
               os.path.join(coco, "annotations", f"instances_{name}.json"))
  return coco


def _env(tmp: str, devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", FSSJAX_CACHE_DIR=os.path.join(tmp, "index_cache"),
             JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("train_e2e"))
  root = _tiny_coco(os.path.join(tmp, "data"))
  cfg_path = os.path.join(tmp, "tiny_hsnet.py")
  with open(cfg_path, "w") as f:
    f.write(_CONFIG_FILE)
  out = os.path.join(tmp, "out")
  os.makedirs(out)
  me = os.path.abspath(__file__)
  popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
  t0 = time.time()
  s1 = subprocess.Popen([sys.executable, me, "single", cfg_path, root, out],
                        env=_env(tmp), **popen)
  s4 = subprocess.Popen([sys.executable, me, "eight", cfg_path, root, out],
                        env=_env(tmp, 8), **popen)
  s3 = subprocess.run(
      [sys.executable, "-m", "fssjax.main", f"--config={cfg_path}", "--workdir",
       os.path.join(out, "X"), "--config.train.no_such_key=1"],
      env=_env(tmp), capture_output=True, text=True, cwd=REPO, timeout=300)
  s3b = subprocess.run(
      [sys.executable, "-m", "fssjax.main", f"--config={cfg_path}:stepz=3", "--workdir",
       os.path.join(out, "X")], env=_env(tmp), capture_output=True, text=True, cwd=REPO,
      timeout=300)
  s1_log = _finish(s1, "S1 (1-device runs)")
  t1 = time.time()
  s2 = subprocess.Popen(
      [sys.executable, "-m", "fssjax.main", f"--config={cfg_path}:steps=6",
       f"--config.data.root={root}", "--workdir", os.path.join(out, "B")],
      env=_env(tmp), **popen)
  s5 = subprocess.Popen(
      [sys.executable, "-m", "fssjax.main", f"--config={cfg_path}",
       f"--config.data.root={root}", "--workdir", os.path.join(out, "A"), "--mode=eval"],
      env=_env(tmp), **popen)
  cli = [sys.executable, "-m", "fssjax.main", f"--config={cfg_path}",
         f"--config.data.root={root}", "--workdir", os.path.join(out, "A")]
  s6 = subprocess.Popen(cli, env=_env(tmp), **popen)  # A is finished: nothing to do
  s7 = subprocess.Popen(cli + ["--config.data.fold=1", "--config.train.num_steps=9"],
                        env=_env(tmp), **popen)  # resume on another fold: refused
  s8 = subprocess.Popen(cli + ["--config.data.fold=1", "--mode=eval", "--allow_config_change",
                               "--outdir", os.path.join(out, "A_fold1")],
                        env=_env(tmp), **popen)  # allowed, warned, results elsewhere
  s2_log = _finish(s2, "S2 (CLI resume)")
  s5_log = _finish(s5, "S5 (CLI eval)")
  s6_log = _finish(s6, "S6 (re-run of a finished run)")
  s7_out, _ = s7.communicate(timeout=600)
  s8_log = _finish(s8, "S8 (eval on another fold)")
  s4_log = _finish(s4, "S4 (8-device run)")
  print(f"e2e fixture: S1 {t1 - t0:.0f}s, total {time.time() - t0:.0f}s")
  with open(os.path.join(out, "single.json")) as f:
    single = json.load(f)
  with open(os.path.join(out, "eight.json")) as f:
    eight = json.load(f)
  return dict(out=out, root=root, single=single, eight=eight, s1_log=s1_log, s2_log=s2_log,
              s3=s3, s3b=s3b, s4_log=s4_log, s5_log=s5_log, s6_log=s6_log,
              s7=(s7.returncode, s7_out), s8_log=s8_log)


def _npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _restored_params(workdir: str, step: int) -> dict[str, np.ndarray]:
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    assert step in c.all_steps(), c.all_steps()
    return _flat_params(c.restore_params(step))


def _assert_params_close(a: dict, b: dict, atol: float) -> None:
  assert sorted(a) == sorted(b)
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst <= atol, f"max |difference| {worst} > {atol}"


def test_resume_after_stop_matches_straight_run(runs):
  out = runs["out"]
  # B stopped right after its step-3 checkpoint; the CLI resumed it from there.
  with open(os.path.join(out, "B", "results.json")) as f:
    resumed = json.load(f)
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  assert runs["single"]["B"] == runs["single"]["A"][:3]
  straight = _npz(os.path.join(out, "A_params_6.npz"))
  _assert_params_close(_restored_params(os.path.join(out, "A"), 6), straight, 0.0)
  _assert_params_close(_restored_params(os.path.join(out, "B"), 6), straight, 1e-6)
  # The resumed run saw the same batches: its final evaluation is the straight run's.
  with open(os.path.join(out, "A", "results.json")) as f:
    a_results = json.load(f)
  for key in ("miou", "fbiou", "baseline_fbiou"):
    assert resumed["results"][key] == pytest.approx(a_results["results"][key], abs=1e-6), key
  assert resumed["results"]["per_class_iou"] == a_results["results"]["per_class_iou"]
  assert 0.0 < resumed["results"]["fbiou"] < 100.0
  assert "Final (step 6): mIoU" in runs["s2_log"]
  assert "all-foreground baseline" in runs["s2_log"]


def test_one_and_eight_devices_give_the_same_losses(runs):
  ones = runs["single"]["A"][:3]
  eights = runs["eight"]["losses"]
  assert len(eights) == 3
  np.testing.assert_allclose(eights, ones, rtol=1e-5, atol=1e-6)
  assert len(set(ones)) == 3  # three different batches / parameter states


def test_checkpoint_from_eight_devices_restores_on_one(runs):
  out = runs["out"]
  assert jax.device_count() == 1
  saved_on_8 = _npz(os.path.join(out, "E_params_3.npz"))
  restored = _restored_params(os.path.join(out, "E"), 3)
  _assert_params_close(restored, saved_on_8, 0.0)
  # ... and it is the 1-device run's state at step 3 up to reduction order. Adam's step is
  # about +-lr wherever |grad| >> eps, so a gradient entry near 0 whose sign differs between
  # the two reduction orders may move by up to 2 lr per step: bound the worst entry by that
  # and require nearly all entries to agree tightly.
  single = _npz(os.path.join(out, "A_params_3.npz"))
  diffs = np.concatenate([np.abs(restored[k] - single[k]).ravel() for k in single])
  assert diffs.max() <= 3 * 2 * 1e-3
  assert np.mean(diffs > 1e-5) < 0.01, np.mean(diffs > 1e-5)


def test_nan_stops_and_keeps_last_good_checkpoint(runs):
  out = runs["out"]
  msg = runs["single"]["nan_error"]
  assert msg is not None, "lr=inf did not stop the run"
  assert msg.startswith("Training diverged at step 7: loss=")
  assert "the last good checkpoint is step 6" in msg
  with checkpointing.Checkpointer(os.path.join(out, "C", "checkpoints"), read_only=True) as c:
    assert c.all_steps() == [3, 6]
  restored = _restored_params(os.path.join(out, "C"), 6)
  assert all(np.isfinite(v).all() for v in restored.values())
  _assert_params_close(restored, _npz(os.path.join(out, "A_params_6.npz")), 0.0)


def _event_tags(directory: str) -> set[str]:
  """Tags in TensorBoard event files (TFRecord framing, Event protos from tensorboard)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      pos += 12 + length + 4
  return tags


def test_workdir_has_events_checkpoints_and_results(runs):
  a = os.path.join(runs["out"], "A")
  assert glob.glob(os.path.join(a, "events.out.tfevents.*"))
  tags = _event_tags(a)
  for tag in ("train/loss", "train/lr", "train/grad_norm", "steps_per_sec",
              "eval/miou", "eval/fbiou", "eval/baseline_miou",
              "eval/episodes"):
    assert tag in tags, sorted(tags)
  assert any(t.startswith("eval/per_class_iou/") for t in tags)
  assert "_hparams_/session_start_info" in tags
  for step in (3, 6):
    d = os.path.join(a, "checkpoints", str(step))
    assert os.path.isdir(os.path.join(d, "state")) and os.path.isdir(os.path.join(d, "data"))
    assert os.path.exists(os.path.join(d, "_CHECKPOINT_METADATA"))
  with open(os.path.join(a, "results.json")) as f:
    results = json.load(f)["results"]
  assert results["n_episodes"] == 4 and 0.0 <= results["miou"] <= 100.0
  assert "baseline_fbiou" in results


def test_cli_config_errors_and_config_json(runs):
  s3 = runs["s3"]
  assert s3.returncode != 0
  assert "no_such_key" in s3.stderr
  s3b = runs["s3b"]
  assert s3b.returncode != 0 and "Unknown config argument 'stepz'" in s3b.stderr
  with open(os.path.join(runs["out"], "B", "config.json")) as f:
    saved = json.load(f)
  assert saved["method"] == "hsnet" and saved["data"]["root"] == runs["root"]
  assert saved["train"]["num_steps"] == 6


def test_cli_eval_mode_restores_the_best_checkpoint(runs):
  a = os.path.join(runs["out"], "A")
  with open(os.path.join(a, "eval_results.json")) as f:
    evaluated = json.load(f)
  with checkpointing.Checkpointer(os.path.join(a, "checkpoints"), read_only=True) as c:
    best = c.best_step()
    assert c.metrics(best)["miou"] == pytest.approx(evaluated["results"]["miou"], abs=1e-6)
  assert evaluated["which"] == "best" and evaluated["step"] == best
  if best == 6:
    with open(os.path.join(a, "results.json")) as f:
      final = json.load(f)["results"]
    assert evaluated["results"]["fbiou"] == pytest.approx(final["fbiou"], abs=1e-6)
  assert "Checkpoint step" in runs["s5_log"] and "FB-IoU" in runs["s5_log"]
  # The evaluated config travels in the results file (fssjax.results), not beside it.
  (record,) = [json.load(open(p)) for p in glob.glob(os.path.join(a, "results", "eval_*.json"))]
  assert record["mode"] == "eval" and record["config"]


def test_start_up_checkpoints_and_evaluation_are_quiet(runs):
  """Issue 8: no one-line hyperparameter dump, no orbax lines on every checkpoint or
  evaluation, no libtpu probing line (S2 trains, checkpoints and evaluates; S5 evaluates)."""
  for log in (runs["s2_log"], runs["s5_log"]):
    lines = log.splitlines()
    assert not [l for l in lines if "Hyperparameters" in l or "hparams" in l.lower()], log[-3000:]
    assert not [l for l in lines if "orbax" in l.lower()], log[-3000:]
    assert not [l for l in lines if "libtpu" in l.lower() or "backend 'tpu'" in l], log[-3000:]
  assert "loss" in runs["s2_log"] and "Final (step 6)" in runs["s2_log"]


def test_rerunning_a_finished_run_says_so_and_exits_zero(runs):
  log = runs["s6_log"]
  assert "is complete (6 steps); nothing to do" in log, log[-3000:]
  assert "StopIteration" not in log and "Traceback" not in log


def test_resuming_with_another_fold_is_refused_naming_the_key(runs):
  rc, log = runs["s7"]
  assert rc == 1, log[-3000:]
  assert "data.fold: 0 -> 1" in log and "--allow_config_change" in log
  assert "Traceback" not in log
  with checkpointing.Checkpointer(os.path.join(runs["out"], "A", "checkpoints"),
                                  read_only=True) as c:
    assert c.all_steps() == [3, 6]  # nothing was trained or written
  with open(os.path.join(runs["out"], "A", "config.json")) as f:
    assert json.load(f)["data"]["fold"] == 0  # the stored config was not overwritten


def test_eval_on_a_fold_the_checkpoint_trained_on_warns_and_records_it(runs):
  log = runs["s8_log"]
  assert "not few-shot results" in log, log[-3000:]
  outdir = os.path.join(runs["out"], "A_fold1")
  with open(os.path.join(outdir, "eval_results.json")) as f:
    evaluated = json.load(f)
  assert evaluated["warnings"] and "training classes include" in evaluated["warnings"][0]
  files = glob.glob(os.path.join(outdir, "results", "eval_fold1_*.json"))
  assert files, os.listdir(outdir)
  with open(files[0]) as f:
    assert any("not few-shot results" in w for w in json.load(f)["warnings"])


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.FLAGS.mark_as_parsed()
  {"single": _driver_single, "eight": _driver_eight}[sys.argv[1]](*sys.argv[2:])
