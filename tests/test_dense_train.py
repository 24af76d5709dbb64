"""Dense training through the generic trainer (`fssjax.train` with a method whose
`train_data = 'dense'`): the grain stream of whole images with the method's per-image and
shared arrays, its determinism, and exact resume after a kill.

`ToyDense` is a per-pixel linear classifier of (colour, the image's per-image 'prior_hint',
the shared 'bias') trained with cross-entropy plus a noise term drawn from the step key, so
a resumed run only matches when params, optimiser state, key and batches all continue
exactly.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import json
import stat

from fssjax import checkpointing
from fssjax import checks
from fssjax import configlib
from fssjax import evaluators
from fssjax import methods
from fssjax import train
from fssjax.checks import ConfigMismatchError
from fssjax.data import pipeline
from fssjax.methods.base import DenseInputs, Method

C = 3
N_IMAGES = 7


def _toy_source():
  rng = np.random.default_rng(0)
  images, labels = [], []
  for i in range(N_IMAGES):
    h, w = 10 + 2 * (i % 3), 14 - (i % 4)
    label = rng.integers(0, C, (h, w)).astype(np.int32)
    label[0, 0] = 255
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 60 * label + 20
    image[..., 1] = i * 30
    images.append(image)
    labels.append(label)
  return evaluators.InMemoryDenseSource(images, labels, ["a", "b", "c"], name="toy_dense")


evaluators.register_dense_source("toy_dense", lambda data: _toy_source())


def _hint(n):
  return (np.arange(n)[:, None] % C == np.arange(C)[None]).astype(np.float32)


class ToyDense(Method):
  MODEL_DEFAULTS = dict(candidates="dataset", scale=1)
  evaluation_keys = ("candidates",)  # only affects evaluation (as LLMFormer's)
  evaluators = ("dense",)
  train_data = "dense"
  normalization = "minus_one_one"
  calls: list = []

  def init(self, rng, batch):
    return {"params": {"w": 0.1 * jax.random.normal(rng, (3 + C, C)),
                       "b": jnp.zeros((C,))}}

  def dense_inputs(self, source, split):
    ToyDense.calls.append((getattr(source, "name", ""), split))
    shared = {"bias": np.full((C,), 0.5, np.float32)} if split == "train" else {}
    return DenseInputs(per_image={"prior_hint": _hint(len(source))}, shared=shared)

  def _logits(self, params, batch):
    x = batch["image"]
    hint = jnp.broadcast_to(batch["prior_hint"][:, None, None, :], x.shape[:3] + (C,))
    feats = jnp.concatenate([x, hint], -1)
    return feats @ params["params"]["w"] + params["params"]["b"]

  def loss(self, params, frozen, batch, rng):
    logits = self._logits(params, batch) + batch["bias"][:, None, None, :]
    label = batch["label"]
    valid = label != 255
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, label, 0))
    noise = 1e-3 * jnp.sum(jax.random.normal(rng, (C,)) * params["params"]["b"])
    loss = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1) + noise
    return loss, {"n_valid": valid.sum().astype(jnp.float32)}

  def predict(self, params, frozen, batch):
    raise TypeError("dense only")

  def predict_dense(self, params, frozen, batch, class_names):
    return self._logits(params, batch)


METHOD = ToyDense


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
  monkeypatch.setitem(methods.REGISTRY, "toy_dense", __name__)


def _config(steps=6):
  c = configlib.base_config()
  c.method = "toy_dense"
  c.seed = 3
  c.data.image_size = 8
  c.data.augment = True
  c.data.train = ml_collections.ConfigDict(dict(dataset="toy_dense"))
  c.train.batch_size = 2
  c.train.num_steps = steps
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.eval_every = 0
  c.optimizer.lr = 0.05
  c.eval.batch_size = 3
  c.evals = ml_collections.ConfigDict(dict(
      toy=dict(type="dense", every=0, data=dict(dataset="toy_dense", image_size=8))))
  return c


def test_dense_stream_is_deterministic_and_covers_each_pass():
  config = _config(steps=20)
  src = _toy_source()
  inputs = ToyDense(config).dense_inputs(src, "train")
  kw = dict(normalization="minus_one_one", seed=3, global_batch_size=2)
  loader = pipeline.dense_train_loader(config, src, inputs, process_index=0, process_count=1,
                                       **kw)
  first = loader.batch_at(0)
  assert first["image"].shape == (2, 8, 8, 3) and first["label"].shape == (2, 8, 8)
  assert first["label"].dtype == np.int32 and first["bias"].shape == (2, C)
  np.testing.assert_array_equal(first["prior_hint"], _hint(N_IMAGES)[first["image_index"]])
  # Every pass over the data shows each image once (detectron2's TrainingSampler).
  seen = np.concatenate([loader.batch_at(s)["image_index"] for s in range(7)])
  assert sorted(seen[:N_IMAGES].tolist()) == list(range(N_IMAGES))
  assert sorted(seen[N_IMAGES:2 * N_IMAGES].tolist()) == list(range(N_IMAGES))
  # The grain iterator gives the same batches; its state restores the next one exactly;
  # two processes together give the global batch.
  it = iter(loader)
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  nxt = next(it)
  it.close()
  it2 = iter(pipeline.dense_train_loader(config, src, inputs, process_index=0,
                                         process_count=1, **kw))
  it2.set_state(state)
  again = next(it2)
  it2.close()
  for a, b in zip(batches, [loader.batch_at(s) for s in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for k in nxt:
    np.testing.assert_array_equal(nxt[k], again[k])
  halves = [pipeline.dense_train_loader(config, src, inputs, process_index=p, process_count=2,
                                        **kw).batch_at(5) for p in range(2)]
  whole = loader.batch_at(5)
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
  with pytest.raises(ValueError, match="per-image 'prior_hint' has 3 rows"):
    pipeline.dense_train_loader(config, src, DenseInputs(per_image={"prior_hint": _hint(3)}),
                                process_index=0, process_count=1, **kw)


class _Kill(Exception):
  pass


def _flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}


def test_dense_training_resumes_exactly(tmp_path):
  config = _config()
  record = {"A": {}, "B": {}}
  finals = {}

  def callback(run, kill_at=None):
    def fn(step, metrics, state):
      record[run][step] = float(metrics["loss"])
      finals[run] = _flat(state["params"])
      if step == kill_at:
        raise _Kill()
    return fn

  ToyDense.calls.clear()
  out_a = train.train_and_evaluate(config, str(tmp_path / "A"), step_callback=callback("A"))
  assert ("toy_dense", "train") in ToyDense.calls and ("toy_dense", "eval") in ToyDense.calls
  with pytest.raises(_Kill):  # killed after step 4 (the checkpoint of step 3 is on disk)
    train.train_and_evaluate(config, str(tmp_path / "B"), step_callback=callback("B", 4))
  assert sorted(os.listdir(tmp_path / "B" / "checkpoints"))[0].startswith("3")
  other = _config()
  other.data.train.dataset = "toy_dense_other"  # another training set: refused by name
  with pytest.raises(ConfigMismatchError, match=r"data\.train\.dataset: 'toy_dense' -> "
                     r"'toy_dense_other'"):
    train.train_and_evaluate(other, str(tmp_path / "B"))
  out_b = train.train_and_evaluate(config, str(tmp_path / "B"), step_callback=callback("B"))
  assert out_b["start_step"] == 3 and out_b["step"] == 6
  for step in range(1, 7):
    assert record["B"][step] == record["A"][step], (step, record)
  assert record["A"][6] < record["A"][1]
  for k, v in finals["A"].items():
    np.testing.assert_array_equal(finals["B"][k], v)
  assert out_a["evals"]["toy"]["miou"] == out_b["evals"]["toy"]["miou"]
  assert out_a["evals"]["toy"]["n_images"] == N_IMAGES


def test_dense_method_without_a_training_block_is_refused(tmp_path):
  config = _config()
  del config.data["train"]
  with pytest.raises(train.ConfigError, match="config.data.train"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_variants_are_separate_runs_with_model_overrides():
  from fssjax import main as main_lib
  config = _config()
  config.model.flag = 1
  config.variants = ml_collections.ConfigDict(dict(on=dict(flag=2), off={}))
  cfgs = main_lib.variant_configs(config)
  assert sorted(cfgs) == ["off", "on"]  # (a ConfigDict lists its keys sorted)
  assert cfgs["on"].model.flag == 2 and cfgs["off"].model.flag == 1
  assert "variants" not in cfgs["on"] and config.model.flag == 1
  del config["variants"]
  assert main_lib.variant_configs(config) == {}
  table = main_lib.variants_table({
      "on": {"evals": {"unseen": {"miou": 21.654}, "seen": {"miou": 3.0}}},
      "off": {"evals": {"unseen": {"miou": 1.0}}}})
  assert table.splitlines() == ["| variant | unseen mIoU | seen mIoU |", "|---|---|---|",
                                "| on | 21.65 | 3.00 |", "| off | 1.00 | - |"]
  table = main_lib.variants_table({  # the primary evaluator's column comes first
      "on": {"primary": "unseen", "evals": {"seen": {"miou": 3.0}, "unseen": {"miou": 2.0}}}})
  assert table.splitlines()[0] == "| variant | unseen mIoU | seen mIoU |"


def _steps(workdir):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    return c.all_steps(), c.best_step(), {s: c.metrics(s) for s in c.all_steps()}


def test_last_step_is_saved_before_its_evaluation_and_a_rerun_evaluates_it(
    tmp_path, monkeypatch, capsys):
  config = _config(steps=4)
  config.train.checkpoint_every = 100  # > num_steps: the last step is the only checkpoint
  wd = str(tmp_path / "run")
  flushes = []
  real_writer = train.monitoring.create_writer

  def writer(*args, **kwargs):
    w = real_writer(*args, **kwargs)
    flush = w.flush
    w.flush = lambda: (flushes.append(1), flush())[1]
    return w

  monkeypatch.setattr(train.monitoring, "create_writer", writer)
  real_run = evaluators.DenseEvaluator.run

  def killed(self, *args, **kwargs):
    raise _Kill()

  monkeypatch.setattr(evaluators.DenseEvaluator, "run", killed)
  with pytest.raises(_Kill):  # killed during the final evaluation
    train.train_and_evaluate(config, wd)
  assert flushes  # TensorBoard flushed at the checkpoint, not only at the end
  assert _steps(wd) == ([4], None, {4: None})  # the step is on disk, not yet ranked
  monkeypatch.setattr(evaluators.DenseEvaluator, "run", real_run)
  capsys.readouterr()
  out = train.train_and_evaluate(config, wd)
  text = capsys.readouterr().out
  assert "complete (4 steps); evaluating its last checkpoint" in text
  assert "(candidates: dataset)" in text  # the summary line says the candidate mode
  assert out["start_step"] == 4 and out["evals"]["toy"]["n_images"] == N_IMAGES
  assert _steps(wd) == ([4], 4, {4: {"miou": out["results"]["miou"]}})

  # 2: the same config again: nothing to do, the stored results.
  capsys.readouterr()
  again = train.train_and_evaluate(config, wd)
  assert "nothing to do" in capsys.readouterr().out and again == json.loads(
      open(os.path.join(wd, "results.json")).read())
  # ... another evaluation (a second evaluator, an evaluation-only model key): named and
  # evaluated, never the old numbers reprinted.
  other = _config(steps=4)
  other.train.checkpoint_every = 100
  other.evals.toy2 = ml_collections.ConfigDict(dict(
      type="dense", every=0, data=dict(dataset="toy_dense", image_size=6)))
  other.model.candidates = "description"
  new = train.train_and_evaluate(other, wd)
  text = capsys.readouterr().out
  assert "from another evaluation config" in text and "evals.toy2.type: None -> 'dense'" in text
  assert "model.candidates: 'dataset' -> 'description'" in text
  assert sorted(new["evals"]) == ["toy", "toy2"]
  assert _steps(wd)[2] == {4: {"miou": out["results"]["miou"]}}  # ranking left as trained

  # 3: --mode=eval with an evaluation-only model key is no model change; a real one is.
  res = train.evaluate_checkpoint(other, wd, outdir=str(tmp_path / "ev"))
  assert res["step"] == 4
  changed = _config(steps=4)
  changed.model.scale = 2
  with pytest.raises(ConfigMismatchError, match=r"model\.scale: None -> 2"):
    train.evaluate_checkpoint(changed, wd, outdir=str(tmp_path / "ev2"))
  assert checks.config_differences(json.loads(checks.config_json(config)), other,
                                   ("model.",), checks.method_evaluation_keys(other)) == []


def test_primary_evaluator_drives_results_and_best_checkpoint(tmp_path):
  config = _config(steps=4)
  config.train.checkpoint_every = 2
  config.evals = ml_collections.ConfigDict(dict(
      a_seen=dict(type="dense", every=2, data=dict(dataset="toy_dense", image_size=8)),
      z_unseen=dict(type="dense", every=2, data=dict(dataset="toy_dense", image_size=5))))
  config.eval.primary = "z_unseen"
  wd = str(tmp_path / "run")
  out = train.train_and_evaluate(config, wd)
  assert out["primary"] == "z_unseen" and out["results"]["name"] == "z_unseen"
  assert out["results"]["miou"] == out["evals"]["z_unseen"]["miou"]
  steps, _, metrics = _steps(wd)
  assert metrics[4] == {"miou": out["evals"]["z_unseen"]["miou"]}
  bad = _config(steps=4)
  bad.evals = config.evals
  bad.eval.primary = "unseen"
  with pytest.raises(train.ConfigError, match=r"eval\.primary='unseen' names no evaluator.*"
                     r"\['a_seen', 'z_unseen'\]"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "config.json")


def test_evaluating_a_deleted_step_lists_the_available_ones(tmp_path):
  config = _config(steps=6)
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 1
  wd = str(tmp_path / "run")
  train.train_and_evaluate(config, wd)
  assert _steps(wd)[0] == [6]
  with pytest.raises(train.MissingInputsError,
                     match=r"--step=2: no checkpoint of step 2 .* Available steps: \[6\]"):
    train.evaluate_checkpoint(config, wd, step=2, outdir=str(tmp_path / "ev"))
  assert not os.path.exists(tmp_path / "ev")


def test_missing_dense_roots_print_the_layout_once(tmp_path):
  config = _config()
  for name in ("one", "two"):
    config.evals[name] = ml_collections.ConfigDict(dict(
        type="dense", data=dict(dataset="coco_stuff_171", root=str(tmp_path / "nowhere"))))
  with pytest.raises(train.MissingInputsError) as e:
    checks.preflight(config, train=False)
  text = str(e.value)
  assert text.count("Expected coco_stuff_171 layout") == 1, text
  assert "evals.one.data: coco_stuff_171: data not found under root" in text
  assert "evals.two.data: coco_stuff_171: data not found" in text
  assert "stuffthingmaps" in text or "/<stem>" in text
  assert "data not found (coco_stuff_171" not in text


def test_variants_table_is_written_to_variants_json(tmp_path, monkeypatch):
  from fssjax import main as main_lib
  config = _config()
  config.model.scale = 1
  config.variants = ml_collections.ConfigDict(dict(big=dict(scale=2), small={}))

  def fake(cfg, wd, **kwargs):
    m = float(cfg.model.scale)
    return dict(step=6, primary="toy", results={"miou": m},
                evals={"toy": {"miou": m}, "other": {"miou": 2 * m}})

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  old = os.umask(0o022)
  try:
    main_lib.run_config(config, str(tmp_path))
  finally:
    os.umask(old)
  path = tmp_path / "variants.json"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  record = json.loads(path.read_text())
  assert record["variants"]["big"] == dict(
      miou=2.0, primary="toy", step=6, evals={"toy": {"miou": 2.0}, "other": {"miou": 4.0}},
      results_path=str(tmp_path / "big" / "results.json"))
  assert record["variants"]["small"]["miou"] == 1.0 and "| big | 2.00 | 4.00 |" in record["table"]
