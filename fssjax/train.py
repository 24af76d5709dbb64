"""The generic training loop: `train_and_evaluate(config, workdir)` for every method.

Flow: checks (`fssjax.checks`: config values, inputs, the stored run's config) -> method ->
grain training stream (few-shot episodes; for a method with `train_data = 'dense'` whole
images of the dense data block `config.data.train`, `dense_train_loader`) -> variables built
shard-first (`jax.eval_shape` of `method.init`, then
`jax.jit` with `out_shardings`: replicated, or FSDP with `train.fsdp > 1`), split by
`config.model.trainable` into `params` and `frozen` -> `method.load_pretrained` places the
published weights tensor by tensor -> jitted, sharded train step (state donated, key
`fold_in(rng, step)`) -> TensorBoard / console (progress, rate and ETA by clu's
`ReportProgress`, traces by `Profile`) -> the evaluators of `config.evals` -> orbax
checkpoints and results files. Nothing is written to the workdir before the checks pass.

Start-up: the first batch is built in-process for its shapes (`TrainLoader.batch_at`); the
grain workers start, the train step compiles in a background thread (`PrecompiledStep`) and
the variables are initialised (`fssjax.batched_rng`: draws batched by shape), all at once.

`frozen` is never differentiated, never in the optimiser state and never checkpointed: it is
rebuilt from the config and weight files, and a fingerprint in the checkpoint metadata catches
a mismatch on resume. A checkpoint holds params, optimiser state, step, rng, the grain
iterator state and the config: a resumed run continues with the very batches and keys of the
uninterrupted one (onto any mesh). A step is checkpointed before it is evaluated (at every
evaluation step, and always at the last step), so a kill during an evaluation keeps it; its
mIoU is recorded afterwards (`Checkpointer.record_metrics`, ranks the best step). Re-running a
finished run evaluates its last checkpoint if that was not done, or was done with another
evaluation config (evals.*, eval.*, the method's `evaluation_keys`; named), and returns.
TensorBoard events are flushed at each checkpoint and after each evaluation.

Gradient accumulation (`train.grad_accum = A`): the global batch is split inside the step
into A interleaved micro-batches (i, i + A, ...; each device keeps its rows) whose gradients
a `lax.scan` sums; for a mean of per-example means this is the full-batch gradient (a loss
normalised by a count pooled over the batch, as HSNet's, weights examples slightly
differently; micro-batch j gets the key `fold_in(step_key, j)`).

Divergence: each step reports whether loss, gradient norm and new parameters are finite; the
host checks at every log, evaluation and checkpoint step, before saving, and raises
`DivergenceError` naming the first bad step. The base learning rate is a runtime scalar
(`fssjax.optim.Optimizer`): runs differing only in `optimizer.lr` share one program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fssjax import batched_rng
from fssjax import checkpointing
from fssjax import checks
from fssjax import monitoring
from fssjax import sharding as shd
from fssjax import utils
from fssjax.checks import (  # noqa: F401 (re-exported)
    ConfigMismatchError, DivergenceError, MissingInputsError, check_config,
    check_stored_config, config_json, fingerprint, preflight, trained_on_test_classes,
    user_errors, _check_frozen, _RESUME_KEYS, _RUN_KEYS)
from fssjax.methods import base, get_method
from fssjax.methods.base import ConfigError, Method
from fssjax.optim import Optimizer, make_optimizer, make_schedule  # noqa: F401 (re-exported)

PyTree = Any
StepCallback = Callable[[int, Mapping[str, jax.Array], PyTree], None]


class MissingCheckpointError(MissingInputsError):
  """The checkpoint (directory or step) to evaluate is not there (the message lists what is)."""


# ----------------------------------------------------------------------------------------
# State and step.


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate_checkpoint` share."""

  method: Method
  mesh: jax.sharding.Mesh
  optimizer: Optimizer
  patterns: list[str]
  abstract_state: PyTree  # ShapeDtypeStructs carrying shardings
  abstract_frozen: PyTree
  state_shardings: PyTree
  frozen_shardings: PyTree
  init_batch: dict[str, np.ndarray]
  example_batch: dict[str, Any]  # the batch `build_setup` was given (its shapes: the step's)
  init_key: jax.Array
  train_key: jax.Array


def _init_batch(local_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A one-example, all-zero batch with the dtypes of `local_batch` (only shapes matter)."""
  return {k: np.zeros((1,) + np.shape(v)[1:], np.asarray(v).dtype)
          for k, v in local_batch.items()
          if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) > 0}


def build_setup(config: ml_collections.ConfigDict, method: Method, mesh: jax.sharding.Mesh,
                example_batch: Mapping[str, Any]) -> Setup:
  """Abstract state, shardings and optimiser for `method` (no device memory is used).

  Raises:
    ConfigError: a `model.trainable` pattern that matches nothing (named).
  """
  optimizer = make_optimizer(config)
  init_batch = _init_batch(example_batch)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  patterns = method.trainable_patterns()
  abstract_params, abstract_frozen = base.partition(
      jax.eval_shape(method.init, init_key, init_batch), patterns)
  param_sh = shd.param_shardings(abstract_params, mesh)
  frozen_sh = shd.param_shardings(abstract_frozen, mesh)
  abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
  rep = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(
      optimizer.tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep)
  abstract = dict(params=abstract_params, opt_state=abstract_opt,
                  step=jax.ShapeDtypeStruct((), jnp.int32),
                  rng=jax.eval_shape(lambda: train_key))
  return Setup(method=method, mesh=mesh, optimizer=optimizer, patterns=patterns,
               abstract_state=shd.with_shardings(abstract, state_sh),
               abstract_frozen=shd.with_shardings(abstract_frozen, frozen_sh),
               state_shardings=state_sh, frozen_shardings=frozen_sh, init_batch=init_batch,
               example_batch=dict(example_batch), init_key=init_key, train_key=train_key)


def init_state(setup: Setup) -> tuple[PyTree, PyTree]:
  """(state, frozen) created shard-first, then the method's published weights loaded.

  `method.init` runs through `fssjax.batched_rng.batch_random`: the same values bit for bit,
  with the random draws of equal shape batched so that XLA compiles one kernel per shape
  rather than one per parameter (start-up time).
  """
  method, tx, patterns = setup.method, setup.optimizer.tx, setup.patterns

  init = batched_rng.batch_random(method.init)

  def create(init_key, train_key, batch):
    params, frozen = base.partition(init(init_key, batch), patterns)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                 rng=train_key)
    return state, frozen

  with jax.set_mesh(setup.mesh):
    state, frozen = jax.jit(
        create, out_shardings=(setup.state_shardings, setup.frozen_shardings),
        compiler_options=batched_rng.init_compiler_options(setup.mesh))(
            setup.init_key, setup.train_key, setup.init_batch)
  state["params"], frozen = method.load_pretrained(state["params"], frozen)
  return state, frozen


def init_frozen(setup: Setup) -> PyTree:
  """Only the frozen tree (resume and evaluation, where params come from a checkpoint)."""
  method, patterns = setup.method, setup.patterns
  init = batched_rng.batch_random(method.init)
  with jax.set_mesh(setup.mesh):
    frozen = jax.jit(lambda k, b: base.partition(init(k, b), patterns)[1],
                     out_shardings=setup.frozen_shardings,
                     compiler_options=batched_rng.init_compiler_options(setup.mesh))(
                         setup.init_key, setup.init_batch)
  return method.load_pretrained(None, frozen)[1]


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(setup: Setup, grad_accum: int = 1):
  """The jitted `(state, frozen, batch, base_lr) -> (state, metrics)`; `state` is donated.

  `metrics` (replicated scalars): loss, grad_norm, lr, finite (bool), params_finite and the
  method's own metrics (averaged over micro-batches).
  """
  method, mesh = setup.method, setup.mesh
  tx, profile = setup.optimizer.tx, setup.optimizer.profile
  batch_spec = shd.data_sharding(mesh).spec
  if grad_accum < 1:
    raise ConfigError(f"train.grad_accum={grad_accum} must be >= 1")

  def grads_of(params, frozen, batch, key):
    (loss, aux), grads = jax.value_and_grad(
        lambda p: method.loss(p, frozen, batch, key), has_aux=True)(params)
    return loss, aux, grads

  def step(state, frozen, batch, base_lr):
    params = state["params"]
    key = jax.random.fold_in(state["rng"], state["step"])
    if grad_accum == 1:
      loss, aux, grads = grads_of(params, frozen, batch, key)
    else:
      def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]; micro-batch i = rows i, i+A, ...
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *batch_spec)))

      micro = jax.tree.map(split, batch)
      first_aux = jax.eval_shape(lambda b: grads_of(params, frozen, b, key)[1],
                                 jax.tree.map(lambda x: x[0], micro))
      aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), first_aux)

      def body(carry, xs):
        index, mb = xs
        loss_sum, aux_sum, grad_sum = carry
        loss, aux, grads = grads_of(params, frozen, mb, jax.random.fold_in(key, index))
        return (loss_sum + loss, jax.tree.map(lambda a, b: a + b, aux_sum, aux),
                jax.tree.map(jnp.add, grad_sum, grads)), None

      (loss, aux, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), aux0, jax.tree.map(jnp.zeros_like, params)),
          (jnp.arange(grad_accum), micro))
      loss = loss / grad_accum
      aux = jax.tree.map(lambda a: a / grad_accum, aux)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    updates = jax.tree.map(lambda u: u * base_lr.astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    params_finite = _all_finite(new_params)
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=base_lr * profile(state["step"]),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite,
                   params_finite=params_finite)
    return dict(params=new_params, opt_state=opt_state, step=state["step"] + 1,
                rng=state["rng"]), metrics

  rep = shd.replicated(mesh)
  return jax.jit(
      step, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                          shd.data_sharding(mesh), rep),
      out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------
# Data.


def dense_train_data(config) -> ml_collections.ConfigDict:
  """The dense data block a dense method trains on: `config.data.train` (keys as a dense
  evaluator's `data`: dataset, root, classes, ...; `split` defaults to 'train').

  Raises:
    ConfigError: no `data.train` block.
  """
  block = config.data.get("train", None)
  if not block or not block.get("dataset", ""):
    raise ConfigError(f"method {config.method!r} trains on whole images with label maps: set "
                      "config.data.train to a dense data block, e.g. data.train = "
                      "dict(dataset='coco_stuff_171', root=..., split='train') (a source "
                      "registered in fssjax.evaluators, such as synthetic_dense)")
  block = ml_collections.ConfigDict(block.to_dict())
  if "split" not in block:
    block.split = "train"
  return block


def dense_train_loader(config, method: Method, start_step: int):
  """The process's dense `fssjax.data.pipeline.TrainLoader` (`method.train_data == 'dense'`):
  whole images of `config.data.train` with what `method.dense_inputs(source, 'train')`
  declares."""
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top
  from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = evaluators.dense_source(dense_train_data(config))
  return pipeline.dense_train_loader(
      config, source, method.dense_inputs(source, "train"),
      normalization=method.normalization, seed=int(config.seed),
      global_batch_size=int(config.train.batch_size), process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=int(config.data.workers),
      start_step=int(start_step))


def train_loader(config, method: Method, start_step: int):
  """The process's `fssjax.data.pipeline.TrainLoader` for `method`, from `start_step`:
  few-shot episodes, or whole dense images when `method.train_data == 'dense'`."""
  if getattr(method, "train_data", "episodes") == "dense":
    return dense_train_loader(config, method, start_step)
  from fssjax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  source = sources.build_source(config.data, "train")
  classes = sources.fold_classes_for(config.data, "train", source)
  extra = {k: v for k, v in (("views", method.views()), ("texts", method.texts())) if v}
  return pipeline.train_loader(
      config, source, classes, normalization=method.normalization, seed=int(config.seed),
      global_batch_size=int(config.train.batch_size), process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=int(config.data.workers),
      start_step=int(start_step), **extra)


def train_iterator(config, method: Method, start_step: int):
  return iter(train_loader(config, method, start_step))


class PrecompiledStep:
  """The train step, compiled ahead of time for the first batch's shapes while the variables
  are initialised (start-up: init and step compilation overlap). The step is traced and
  lowered in the calling thread, then compiled by XLA in a background thread.

  Calls with that batch signature use the precompiled executable; any other signature (a
  different K with `data.train_shot_max`) goes through the jitted step as usual. A failed
  background compilation falls back to the jitted step, which then raises the error itself.
  """

  def __init__(self, train_step, setup: Setup, local_batch: Mapping[str, Any]):
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    self._step = train_step
    mesh = setup.mesh
    data_sh = shd.data_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + tuple(v.shape[1:]),
                                     v.dtype, sharding=data_sh)
             for k, v in local_batch.items()
             if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) > 0}
    self._signature = self._sig(batch)
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh))

    # Traced and lowered here, before the init is traced: both are Python work under the GIL,
    # and the step's XLA compilation (the longest part of a cold start, which releases the
    # GIL) then starts seconds earlier than if both traces shared the interpreter.
    self._future = None
    try:
      with jax.set_mesh(mesh):
        lowered = train_step.lower(setup.abstract_state, setup.abstract_frozen, batch, lr)
    except Exception:  # pylint: disable=broad-except
      return  # the jitted step raises the error itself at the first call
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_step")
    self._future = self._pool.submit(lowered.compile)
    self._pool.shutdown(wait=False)

  @staticmethod
  def _sig(batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

  def __call__(self, state, frozen, batch, base_lr):
    if self._future is not None and self._sig(batch) == self._signature:
      try:
        compiled = self._future.result()
      except Exception:  # pylint: disable=broad-except
        self._future = None
      else:
        return compiled(state, frozen, batch, base_lr)
    return self._step(state, frozen, batch, base_lr)


def _final(out: dict, workdir: str, name: str, summary: str, lead: bool) -> dict:
  if lead:
    utils.atomic_write_json(os.path.join(workdir, name), out, indent=2)
  print(summary, flush=True)
  return out


# ----------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: StepCallback | None = None,
                       allow_config_change: bool = False) -> dict:
  """Trains `config.method` per `config`, evaluating and checkpointing into `workdir`.

  Resumes from the latest checkpoint in `workdir/checkpoints` when there is one (a finished
  run is evaluated if its last evaluation is missing, and returned).

  Args:
    config: the full config (`fssjax.configlib.base_config` schema).
    workdir: run directory (config.json, TensorBoard events, checkpoints, results).
    step_callback: optional `fn(step, metrics, state)` after every step (after any checkpoint
      of that step); `metrics` are device scalars. For hooks and tests.
    allow_config_change: resume although data set, fold, model or batch differ from the
      checkpoint's config.

  Returns:
    dict with start_step, final step, the primary evaluator's results ('results', without
    images; `eval.primary`, default the first of `config.evals`), its name ('primary'),
    every evaluator's results ('evals'), the evaluation config ('eval_config') and the
    checkpoint directory (also written to results.json).

  Raises:
    ConfigError, MissingInputsError, DataError: bad config / missing inputs / bad data.
    DivergenceError: on a non-finite loss / gradient / parameter.
  """
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top
  t = config.train
  workdir = os.path.abspath(workdir)
  mesh = shd.mesh_from_config(config)
  check_config(config, mesh)
  preflight(config, train=True)
  method = get_method(config)
  lead = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest, meta = None, {}
  if os.path.isdir(ckpt_dir):
    with checkpointing.Checkpointer(ckpt_dir, read_only=True) as probe:
      latest = probe.latest_step()
      meta = probe.meta(latest) if latest is not None else {}
  check_stored_config(meta, config, keys=_RESUME_KEYS, allow=allow_config_change,
                      what="resuming it", ignore=checks.method_evaluation_keys(config))
  num_steps = int(t.num_steps)
  start_step = int(latest or 0)
  if start_step > num_steps:
    raise ConfigError(f"train.num_steps={num_steps} but {ckpt_dir} already holds step "
                      f"{start_step}; raise train.num_steps or use another --workdir")
  if start_step == num_steps:
    return _finished_run(config, method, mesh, workdir, ckpt_dir, meta)
  suite = evaluators.from_config(config, method, mesh)  # indexes the test data
  loader = train_loader(config, method, start_step)
  # The first batch, built here only for its shapes: the grain workers start (seconds of
  # imports) while the variables are initialised and the train step compiles.
  setup = build_setup(config, method, mesh, loader.batch_at(start_step))
  it = iter(loader)
  if latest is None:
    it.start_prefetch()  # a restore sets the iterator's state (and restarts it) below
  # Everything checked: from here on the run writes.
  if lead:
    utils.atomic_write_bytes(os.path.join(workdir, "config.json"), config_json(config).encode())
  writer = monitoring.create_writer(workdir, lead=lead)
  ckpt = checkpointing.Checkpointer(ckpt_dir, keep=int(t.keep_checkpoints))
  try:
    train_step = PrecompiledStep(make_train_step(setup, int(t.grad_accum)), setup,
                                 setup.example_batch)
    if latest is None:
      state, frozen = init_state(setup)
    else:
      state, _ = ckpt.restore(latest, setup.abstract_state, data_iterator=it)
      frozen = init_frozen(setup)
      _check_frozen(meta, frozen)
      it.start_prefetch()
      logging.info("Resumed from checkpoint step %d", start_step)
    n_params = checks.log_sizes(config, setup)
    if start_step == 0 and lead:
      writer.write_hparams(monitoring.flatten_config(config))
    run_meta = dict(method=config.method, config=json.loads(config_json(config)),
                    config_sha256=hashlib.sha256(config_json(config).encode()).hexdigest(),
                    frozen_fingerprint=fingerprint(frozen), num_params=n_params,
                    process_count=jax.process_count(), devices=mesh.size)
    results = _loop(config, setup, train_step, state, frozen, it, ckpt, writer, suite,
                    run_meta, workdir, start_step, step_callback)
    ckpt.wait()
    return _report(config, suite, results, workdir, start_step, num_steps, ckpt.directory,
                   lead)
  finally:
    it.close()
    ckpt.close()
    writer.close()


def _report(config, suite, results, workdir, start_step, step, ckpt_dir, lead) -> dict:
  """Results files, results.json and the final line of a run."""
  out = dict(start_step=start_step, step=step, checkpoint_dir=ckpt_dir, results=None)
  if results is None:
    return _final(out, workdir, "results.json",
                  f"Final (step {step}): no evaluation (train.eval_every < 0)", lead)
  if lead:
    suite.write_results(workdir, "train", step, results, config)
  out.update(results=monitoring.results_for_json(suite.primary_results(results)),
             primary=suite.primary,
             evals={k: monitoring.results_for_json(v) for k, v in results.items()},
             eval_config=checks.evaluation_config(config))
  return _final(out, workdir, "results.json",
                f"Final (step {step}): {suite.summary_line(results)}", lead)


def _evaluation_changes(stored: Mapping[str, Any], meta: Mapping[str, Any],
                        config) -> list[str]:
  """'key: stored -> current' for the evaluation keys (`checks.evaluation_config`) in which
  `config` differs from the evaluation that wrote results.json (`stored`; for a results.json
  without that record, the checkpoint's config)."""
  before = stored.get("eval_config")
  if before is None:
    old = meta.get("config")
    if not old:
      return []
    before = checks.evaluation_config(ml_collections.ConfigDict(old))
  now = checks.evaluation_config(config)
  return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
          if before.get(k) != now.get(k)]


def _finished_run(config, method, mesh, workdir, ckpt_dir, meta) -> dict:
  """A re-run of a finished run: says so, and evaluates the last checkpoint when its
  evaluation is missing (results.json absent, evaluators enabled) or was made with another
  evaluation config (`checks.evaluation_config`: evals.*, eval.*, the method's
  `evaluation_keys`), which it names; never reprints old numbers as if new."""
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top
  lead = jax.process_index() == 0
  num_steps = int(config.train.num_steps)
  suite = evaluators.from_config(config, method, mesh)
  path = os.path.join(workdir, "results.json")
  stored = None
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  changes = _evaluation_changes(stored, meta, config) if stored is not None else []
  if not suite.enabled or (stored is not None and not changes):
    print(f"The run in {workdir} is complete ({num_steps} steps); nothing to do. Its results: "
          f"{path if stored is not None else 'none (evaluation disabled)'}.", flush=True)
    return stored if stored is not None else dict(step=num_steps, results=None)
  if changes:
    print(f"The run in {workdir} is complete ({num_steps} steps), but its results.json comes "
          f"from another evaluation config ({'; '.join(changes)}): evaluating its last "
          "checkpoint with the current one.", flush=True)
  else:
    print(f"The run in {workdir} is complete ({num_steps} steps); evaluating its last "
          "checkpoint.", flush=True)
  setup = build_setup(config, method, mesh, suite.evaluators[0].example_batch(method))
  with checkpointing.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    params = ckpt.restore_params(num_steps, setup.abstract_state["params"])
  frozen = init_frozen(setup)
  _check_frozen(meta, frozen)
  writer = monitoring.create_writer(workdir, lead=lead)
  try:
    results = suite.run(params, frozen, num_steps, writer if lead else None,
                        names=[e.name for e in suite.evaluators if e.enabled])
  finally:
    writer.close()
  if not changes:  # the run's own evaluation, missing after a kill: ranks the step
    with checkpointing.Checkpointer(ckpt_dir, read_only=True) as ckpt:
      ckpt.record_metrics(num_steps, {"miou": suite.headline(results)})
  return _report(config, suite, results, workdir, num_steps, num_steps, ckpt_dir, lead)


def _loop(config, setup: Setup, train_step, state, frozen, it, ckpt, writer, suite,
          run_meta: dict, workdir: str, start_step: int, step_callback) -> dict | None:
  """Steps start_step + 1 .. num_steps; returns the last evaluation's results (or None)."""
  t, mesh = config.train, setup.mesh
  lead = jax.process_index() == 0
  num_steps = int(t.num_steps)
  base_lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=int(t.log_every), every_secs=None)]
  if int(t.profile_steps) > 0 and lead:
    hooks.append(periodic_actions.Profile(
        logdir=os.path.join(workdir, "profile"), num_profile_steps=int(t.profile_steps),
        first_profile=start_step + 2, every_steps=None, every_secs=None))
  pending, window, results = [], [], None
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, num_steps + 1):
      local = next(it)
      state, metrics = train_step(state, frozen, shd.global_batch(local, mesh), base_lr)
      pending.append((step, metrics))
      for hook in hooks:
        hook(step)
      is_last = step == num_steps
      do_eval = suite.due(step, is_last)
      do_ckpt = do_eval or step % int(t.checkpoint_every) == 0 or is_last
      do_log = is_last or step % int(t.log_every) == 0
      if do_log or do_ckpt:
        window.extend(m for _, m in checks.check_finite(pending, ckpt))
        pending = []
      if do_log and window:
        scalars = {f"train/{k}": float(np.mean([w[k] for w in window]))
                   for k in window[0] if k not in ("finite", "params_finite", "lr")}
        scalars["train/lr"] = float(window[-1]["lr"])
        writer.write_scalars(step, scalars)
        logging.info("[%d/%d] loss %.4f  lr %.3g  grad_norm %.3g", step, num_steps,
                     scalars["train/loss"], scalars["train/lr"], scalars["train/grad_norm"])
        window = []
      if do_ckpt:  # before the evaluation: a kill during it keeps the step
        ckpt.save(step, state, data_iterator=it, meta=run_meta)
        writer.flush()
      if do_eval:
        with hooks[0].timed("eval", wait_jax_async_dispatch=False):
          results = suite.run(state["params"], frozen, step, writer if lead else None)
        ckpt.record_metrics(step, {"miou": suite.headline(results)})  # ranks the step
        writer.flush()
      if step_callback is not None:
        step_callback(step, metrics, state)
    writer.flush()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None, outdir: str | None = None,
                        allow_config_change: bool = False) -> dict:
  """Restores the best (else latest, or `step`) checkpoint of `workdir` and evaluates it.

  `workdir` is only read (it may be read-only); `outdir` (default `workdir`) receives
  eval_results.json, the results files and TensorBoard scalars under `outdir/eval`. The config
  must match the checkpoint's in method, data set, fold, image size and model (else
  ConfigMismatchError unless `allow_config_change`); a fold whose test classes the checkpoint
  trained on is evaluated with a loud warning that the results file records.
  """
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  outdir = os.path.abspath(outdir or workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise MissingCheckpointError(f"No checkpoints in {ckpt_dir} to evaluate: --workdir must name "
                             "the directory of a training run (train first with the same "
                             "--workdir and --mode=train).")
  check_config(config)
  preflight(config, train=False)
  ckpt = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  try:
    which = "requested"
    if step is None:
      step, which = ckpt.best_step(), "best"
      if step is None:
        step, which = ckpt.latest_step(), "latest"
    if step is None:
      raise MissingCheckpointError(f"No checkpoint in {ckpt.directory} to evaluate")
    if step not in ckpt.all_steps():
      kept = ckpt.all_steps()
      best = ckpt.best_step()
      raise MissingCheckpointError(
          f"--step={step}: no checkpoint of step {step} in {ckpt.directory} (a run keeps "
          f"only its newest train.keep_checkpoints steps and its best one). Available steps: "
          f"{kept}" + (f" (best: {best})" if best is not None else "") + "; pass one of them "
          "as --step, or leave --step out to evaluate the best (else the latest).")
    meta = ckpt.meta(step)
    check_stored_config(meta, config, keys=_RUN_KEYS, allow=allow_config_change,
                        what="evaluating it", ignore=checks.method_evaluation_keys(config))
    warnings = []
    seen = trained_on_test_classes(meta, config)
    if seen:
      warnings.append(
          f"The checkpoint was trained on fold {meta['config']['data']['fold']}, whose "
          f"training classes include {len(seen)} of this fold's test classes ({seen}): "
          "these scores are not few-shot results.")
      logging.warning("!" * 60 + "\n%s\n" + "!" * 60, warnings[-1])
    mesh = shd.mesh_from_config(config)
    method = get_method(config)
    suite = evaluators.from_config(config, method, mesh)
    setup = build_setup(config, method, mesh, suite.evaluators[0].example_batch(method))
    params = ckpt.restore_params(step, setup.abstract_state["params"])
    frozen = init_frozen(setup)
    _check_frozen(meta, frozen, strict=False)
    logging.info("Evaluating the %s checkpoint, step %d", which, step)
    results = suite.run(params, frozen, step, names=[e.name for e in suite.evaluators])
    first = suite.primary_results(results)
    out = dict(step=step, which=which, results=monitoring.results_for_json(first),
               primary=suite.primary,
               evals={k: monitoring.results_for_json(v) for k, v in results.items()},
               warnings=warnings)
    if jax.process_index() == 0:
      writer = monitoring.create_writer(os.path.join(outdir, "eval"))
      for e in suite.evaluators:
        if e.name in results:
          monitoring.write_eval(writer, step, results[e.name], prefix=e.prefix)
      writer.close()
      suite.write_results(outdir, "eval", step, results, config, warnings=warnings)
    from fssjax import evaluate  # pylint: disable=g-import-not-at-top
    print(evaluate.format_results(first), flush=True)
    return _final(out, outdir, "eval_results.json",
                  f"Checkpoint step {step} ({which}): {suite.summary_line(results)}"
                  + "".join(f"\nWARNING: {w}" for w in warnings), jax.process_index() == 0)
  finally:
    ckpt.close()
