"""The generic training loop: `train_and_evaluate(config, workdir)` for every method.

Flow:
  config -> method (`fssjax.methods.get_method`) -> grain training stream
  (`fssjax.data.pipeline.train_loader`) -> state built shard-first -> jitted, sharded train
  step -> metrics to TensorBoard / console -> periodic episodic evaluation
  (`fssjax.evaluate.evaluate`) -> orbax checkpoints (`fssjax.checkpointing`).

State. `{'params', 'opt_state', 'step', 'rng'}` (plain dict pytree); `frozen` (backbones, BN
statistics, ...) lives beside it, is never differentiated, never in the optimiser and never
checkpointed: `method.init` rebuilds it deterministically from the config (seed, weight
files), and a fingerprint in the checkpoint metadata catches a mismatch on resume. Both are
built shard-first: `jax.eval_shape(method.init)` gives shapes, `fssjax.sharding` gives a
sharding per leaf (replicated by default, FSDP with `config.train.fsdp > 1`), and
`jax.jit(init, out_shardings=...)` materialises them directly where they belong. A method
whose `init` cannot be traced (it reads weight files, converts to numpy: HSNet) is
initialised once on the host and `device_put` onto the same shardings.

Step. `jax.jit` with explicit in/out shardings on the mesh, the state donated, the per-step
key `fold_in(state.rng, state.step)`. Gradient accumulation (`config.train.grad_accum = A`):
the global batch is split, inside the step, into A interleaved micro-batches (micro-batch i
holds examples i, i + A, i + 2A, ..., so each device keeps its own rows and no data moves);
a `lax.scan` sums their gradients and losses, and the mean is applied once. For a loss that
is a mean of per-example means this equals the full-batch loss and gradient. Exceptions: a
loss normalised by a count pooled over the batch (HSNet's cross-entropy averages over the
valid pixels of the whole batch) weights examples slightly differently when micro-batches
hold different numbers of ignored (255) pixels; and micro-batch j gets the key
`fold_in(step_key, j)`, so stochastic losses see other randomness than with A = 1.
Activation memory is that of one micro-batch.

Divergence. Every step also returns whether its loss, gradient norm and updated parameters
are finite. The host checks these flags at every log, evaluation and checkpoint step (and at
the end) -- before anything is saved -- and stops with `DivergenceError` (a
`FloatingPointError`) naming the first bad step and its loss. No checkpoint is ever written after a non-finite step; the last good
one stays the latest.

Exact resume. A checkpoint holds params, optimiser state, step, rng and the grain iterator
state; a resumed run restores all of them (onto the current mesh, whatever its size) and
continues with the very batches and keys the uninterrupted run would have used.

Evaluation runs every `config.train.eval_every` steps and at the end (`eval_every = 0`: only
at the end; `< 0`: never, for throughput runs); every evaluation step is also checkpointed,
with its mIoU as the checkpoint's metric (the best one is kept besides the newest
`train.keep_checkpoints`).

Learning rate: the compiled step takes the base learning rate as a runtime scalar (see
`Optimizer`), so runs that differ only in `optimizer.lr` share one compiled program.

Compilation: set `JAX_COMPILATION_CACHE_DIR` (and, for small programs,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`) to reuse compiled steps across runs and
restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fssjax import checkpointing
from fssjax import monitoring
from fssjax import sharding as shd
from fssjax import utils
from fssjax.methods import get_method, get_method_class
from fssjax.methods.base import Method

PyTree = Any
StepCallback = Callable[[int, Mapping[str, jax.Array], PyTree], None]

PRECISIONS = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------
# Optimiser.


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int,
                  peak: float | None = None) -> optax.Schedule:
  """Learning-rate schedule: linear warm-up from 0 over `opt.warmup_steps` to `peak`
  (default `opt.lr`), then 'constant', 'linear' (-> 0 at `num_steps`) or 'cosine' (-> 0 at
  `num_steps`)."""
  lr = float(opt.lr if peak is None else peak)
  warmup = int(opt.warmup_steps)
  if warmup < 0 or (warmup and warmup >= num_steps and opt.schedule != "constant"):
    raise ValueError(f"optimizer.warmup_steps={warmup} must be >= 0 and < train.num_steps="
                     f"{num_steps}")
  decay_steps = max(num_steps - warmup, 1)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif opt.schedule == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected constant, linear or "
                     "cosine")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optimiser of a run, with the base learning rate kept out of the compiled program.

  `tx` runs the configured optimiser with the learning-rate *profile* (warm-up and decay,
  peak 1); the train step multiplies its updates by `base_lr`, a runtime argument. Every
  optimiser here (Adam with L2, AdamW with decoupled decay, SGD with momentum) is linear in
  the learning rate, so this equals the optimiser built with `schedule` (up to float rounding),
  and runs that differ only in `optimizer.lr` share one compiled step (sweeps; the persistent
  compilation cache).
  """

  tx: optax.GradientTransformation
  profile: optax.Schedule
  base_lr: float

  def schedule(self, step):
    """The learning rate of step `step` (= base_lr * profile(step))."""
    return self.base_lr * self.profile(step)


def make_optimizer(config: ml_collections.ConfigDict) -> Optimizer:
  """The optimiser of `config.optimizer` (applied to `params` only).

  adam: Adam, `weight_decay` as an L2 term added to the gradient (PyTorch `Adam`);
  adamw: decoupled weight decay scaled by the learning rate (PyTorch `AdamW`);
  sgd: SGD with `optimizer.momentum` (default 0.9 when the key is absent; 0 = plain SGD) and
  L2 weight decay. `grad_clip > 0` clips by global norm first.
  """
  opt = config.optimizer
  profile = make_schedule(opt, int(config.train.num_steps), peak=1.0)
  wd = float(opt.weight_decay)
  parts = []
  if float(opt.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
  if opt.name == "adam":
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.adam(profile))
  elif opt.name == "adamw":
    parts.append(optax.adamw(profile, weight_decay=wd))
  elif opt.name == "sgd":
    momentum = float(opt.get("momentum", 0.9))
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.sgd(profile, momentum=momentum or None))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; expected adam, adamw or sgd")
  return Optimizer(tx=optax.chain(*parts), profile=profile, base_lr=float(opt.lr))


# ----------------------------------------------------------------------------------------
# State and step.


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate_checkpoint` share."""

  method: Method
  mesh: jax.sharding.Mesh
  optimizer: Optimizer
  abstract_state: PyTree  # ShapeDtypeStructs carrying shardings
  abstract_frozen: PyTree
  state_shardings: PyTree
  frozen_shardings: PyTree
  init_batch: dict[str, np.ndarray]
  init_key: jax.Array
  train_key: jax.Array
  # (params, frozen) computed on the host when `method.init` cannot be traced (it reads
  # weight files or converts to numpy); None when init runs shard-first under jit.
  host_init: tuple[PyTree, PyTree] | None = None


_UNTRACEABLE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _init_batch(local_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A one-example, all-zero batch with the dtypes of `local_batch` (only shapes matter, and
  zeros are the same on every process)."""
  return {k: np.zeros((1,) + np.shape(v)[1:], np.asarray(v).dtype)
          for k, v in local_batch.items()
          if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) > 0}


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  init_key, train_key = jax.random.split(jax.random.PRNGKey(int(seed)))
  return init_key, train_key


def build_setup(config: ml_collections.ConfigDict, method: Method, mesh: jax.sharding.Mesh,
                example_batch: Mapping[str, Any]) -> Setup:
  """Abstract state, shardings and optimiser for `method`.

  Shapes come from `jax.eval_shape(method.init)` (no device memory). A method whose `init`
  is not traceable (it loads weight files / converts to numpy) is initialised once on the host
  here instead; `init_state` then places the result onto the shardings.
  """
  optimizer = make_optimizer(config)
  tx = optimizer.tx
  init_batch = _init_batch(example_batch)
  init_key, train_key = _keys(config.seed)
  host_init = None
  try:
    abstract_params, abstract_frozen = jax.eval_shape(method.init, init_key, init_batch)
  except _UNTRACEABLE as e:
    logging.info("%s.init is not traceable (%s); initialising on the host",
                 type(method).__name__, type(e).__name__)
    host_init = method.init(init_key, init_batch)
    abstract_params, abstract_frozen = jax.eval_shape(lambda: host_init)
  param_sh = shd.param_shardings(abstract_params, mesh)
  frozen_sh = shd.param_shardings(abstract_frozen, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rep = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep)
  abstract = dict(params=abstract_params, opt_state=abstract_opt,
                  step=jax.ShapeDtypeStruct((), jnp.int32),
                  rng=jax.eval_shape(lambda: train_key))
  return Setup(method=method, mesh=mesh, optimizer=optimizer,
               abstract_state=shd.with_shardings(abstract, state_sh),
               abstract_frozen=shd.with_shardings(abstract_frozen, frozen_sh),
               state_shardings=state_sh, frozen_shardings=frozen_sh, init_batch=init_batch,
               init_key=init_key, train_key=train_key, host_init=host_init)


def init_state(setup: Setup) -> tuple[PyTree, PyTree]:
  """(state, frozen) created directly with their shardings."""
  method, tx = setup.method, setup.optimizer.tx
  sh = setup.state_shardings
  with jax.set_mesh(setup.mesh):
    if setup.host_init is None:
      def create(init_key, train_key, batch):
        params, frozen = method.init(init_key, batch)
        state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                     rng=train_key)
        return state, frozen

      return jax.jit(create, out_shardings=(sh, setup.frozen_shardings))(
          setup.init_key, setup.train_key, setup.init_batch)
    params, frozen = setup.host_init
    setup.host_init = None  # the host copies are not needed any more
    params = jax.device_put(params, sh["params"])
    frozen = jax.device_put(frozen, setup.frozen_shardings)
    opt_state = jax.jit(tx.init, out_shardings=sh["opt_state"])(params)
    state = dict(params=params, opt_state=opt_state,
                 step=jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
                 rng=jax.device_put(setup.train_key, sh["rng"]))
    return state, frozen


def init_frozen(setup: Setup) -> PyTree:
  """Only the frozen tree (for resume and evaluation, where params are restored)."""
  method = setup.method
  with jax.set_mesh(setup.mesh):
    if setup.host_init is None:
      return jax.jit(lambda k, b: method.init(k, b)[1], out_shardings=setup.frozen_shardings)(
          setup.init_key, setup.init_batch)
    frozen = jax.device_put(setup.host_init[1], setup.frozen_shardings)
    setup.host_init = None
    return frozen


def fingerprint(tree: PyTree) -> list[float]:
  """[number of leaves, sum |x|, sum x^2] in float64 on the host: a cheap identity check."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return [0.0, 0.0, 0.0]
  sums = jax.jit(lambda ls: [(jnp.sum(jnp.abs(x.astype(jnp.float32))),
                              jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in ls])(leaves)
  a = sum(float(s[0]) for s in sums)
  b = sum(float(s[1]) for s in sums)
  return [float(len(leaves)), a, b]


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(setup: Setup, grad_accum: int = 1):
  """The jitted `(state, frozen, batch, base_lr) -> (state, metrics)`; `state` is donated.

  `base_lr` is a float32 scalar (normally `setup.optimizer.base_lr`), multiplied into the
  optimiser's updates (see `Optimizer`).

  `metrics` (replicated scalars): loss, grad_norm, lr, finite (bool), params_finite and the
  method's own metrics (averaged over micro-batches).
  """
  method, mesh = setup.method, setup.mesh
  tx, profile = setup.optimizer.tx, setup.optimizer.profile
  batch_spec = shd.data_sharding(mesh).spec
  if grad_accum < 1:
    raise ValueError(f"train.grad_accum={grad_accum} must be >= 1")

  def grads_of(params, frozen, batch, key):
    def loss_fn(p):
      loss, aux = method.loss(p, frozen, batch, key)
      return loss, aux
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
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
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, *batch_spec)))

      micro = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, params)
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
          body, (jnp.zeros((), jnp.float32), aux0, zeros),
          (jnp.arange(grad_accum), micro))
      loss = loss / grad_accum
      aux = jax.tree.map(lambda a: a / grad_accum, aux)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    updates = jax.tree.map(lambda u: u * base_lr.astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    params_finite = _all_finite(new_params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=base_lr * profile(state["step"]),
                   finite=finite, params_finite=params_finite)
    new_state = dict(params=new_params, opt_state=opt_state, step=state["step"] + 1,
                     rng=state["rng"])
    return new_state, metrics

  rep = shd.replicated(mesh)
  return jax.jit(
      step,
      in_shardings=(setup.state_shardings, setup.frozen_shardings, shd.data_sharding(mesh),
                    rep),
      out_shardings=(setup.state_shardings, rep),
      donate_argnums=(0,))


# ----------------------------------------------------------------------------------------
# Helpers: config, data, evaluation, logging.


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Fails early, naming the key, on settings the loop cannot honour."""
  t = config.train
  if t.precision not in PRECISIONS:
    raise ValueError(f"train.precision={t.precision!r}; expected one of {PRECISIONS}")
  shards = shd.batch_shards(mesh)
  if t.batch_size % (t.grad_accum * shards):
    raise ValueError(
        f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
        f"{t.grad_accum} x {shards} batch shards (devices) = {t.grad_accum * shards}")
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the process "
                     f"count {jax.process_count()}")
  for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if int(t[key]) < 1:
      raise ValueError(f"train.{key}={t[key]} must be >= 1")


def config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


class MissingInputsError(FileNotFoundError):
  """A job's data or weights are not where its config says (the message lists each)."""


def preflight(config: ml_collections.ConfigDict, *, train: bool = True) -> None:
  """Checks, before anything heavy runs, that the config's data and weight files exist.

  Raises:
    MissingInputsError: one message naming every missing input (config key, value, and the
      absolute path that was looked at).
  """
  from fssjax.data import sources  # pylint: disable=g-import-not-at-top
  splits = ("train", "test") if train else ("test",)
  problems = sources.missing_inputs(config.data, splits)
  problems += get_method_class(config).missing_inputs(config)
  if problems:
    raise MissingInputsError(
        f"{len(problems)} input(s) of this config are missing (working directory "
        f"{os.getcwd()}):\n" + "\n".join(f"  - {p}" for p in problems))


class _Data:
  """Sources, class lists and episodes of a config (built once per run)."""

  def __init__(self, config: ml_collections.ConfigDict, *, train: bool, test: bool):
    from fssjax.data import episodes, sources  # pylint: disable=g-import-not-at-top
    data = config.data
    self.benchmark = sources.benchmark_of(data)
    if train:
      self.train_source = sources.build_source(data, "train")
      self.train_classes = sources.fold_classes_for(data, "train", self.train_source)
    if test:
      self.test_source = sources.build_source(data, "test")
      self.test_classes = sources.fold_classes_for(data, "test", self.test_source)
      self.test_episodes = episodes.test_episodes(
          self.benchmark, self.test_source, self.test_classes, data.test_episodes or None,
          int(data.shot), int(data.test_seed))


def train_iterator(config, data: _Data, method: Method, start_step: int):
  from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
  loader = pipeline.train_loader(
      config, data.train_source, data.train_classes, normalization=method.normalization,
      seed=int(config.seed), global_batch_size=int(config.train.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=int(config.data.workers), start_step=int(start_step))
  return iter(loader)


def run_evaluation(config, data: _Data, method: Method, params, frozen, mesh,
                   num_summary: int | None = None) -> dict:
  """Episodic evaluation on the config's fixed test episodes."""
  from fssjax import evaluate  # pylint: disable=g-import-not-at-top
  from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.eval_loader(
      config, data.test_source, data.test_episodes, normalization=method.normalization,
      global_batch_size=int(config.eval.batch_size), shot=int(config.data.shot),
      process_index=jax.process_index(), process_count=jax.process_count())
  if num_summary is None:
    num_summary = int(config.eval.num_summary_images)
  return evaluate.evaluate(
      method, params, frozen, batches, data.test_classes, mesh=mesh,
      class_names=list(data.test_source.class_names), num_summary=num_summary,
      total_episodes=len(data.test_episodes))


class DivergenceError(FloatingPointError):
  """Training produced a non-finite loss, gradient or parameter."""


def _check_finite(pending: list[tuple[int, dict]], ckpt: checkpointing.Checkpointer) -> list:
  """Fetches the pending per-step metrics; raises DivergenceError at the first bad step."""
  fetched = jax.device_get(pending)
  for step, m in fetched:
    if not bool(m["finite"]):
      what = []
      if not np.isfinite(m["loss"]):
        what.append("the loss")
      if not np.isfinite(m["grad_norm"]):
        what.append("the gradient")
      if not bool(m["params_finite"]):
        what.append("the updated parameters")
      ckpt.wait()
      last = ckpt.latest_step()
      where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
               else "no checkpoint was written")
      raise DivergenceError(
          f"Training diverged at step {step}: loss={float(m['loss'])!r}, grad_norm="
          f"{float(m['grad_norm'])!r}; {' and '.join(what)} not finite. Nothing was saved "
          f"from this step on; {where}. Lower optimizer.lr, set optimizer.grad_clip or "
          f"check the data.")
  return fetched


# ----------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: StepCallback | None = None) -> dict:
  """Trains `config.method` per `config`, evaluating and checkpointing into `workdir`.

  Resumes from the latest checkpoint in `workdir/checkpoints` when there is one.

  Args:
    config: the full config (`fssjax.configlib.base_config` schema).
    workdir: run directory (TensorBoard events, checkpoints, results.json, profile/).
    step_callback: optional `fn(step, metrics, state)` called after every step (after any
      checkpoint of that step); `metrics` are device scalars. For hooks and tests.

  Returns:
    dict with start_step, final step, final evaluation results (without images) and the
    checkpoint directory.

  Raises:
    DivergenceError: on a non-finite loss / gradient / parameter (see the module docstring).
  """
  t = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  preflight(config, train=True)
  mesh = shd.mesh_from_config(config)
  check_config(config, mesh)
  method = get_method(config)
  lead = jax.process_index() == 0
  writer = monitoring.create_writer(workdir, lead=lead)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=int(t.keep_checkpoints))
  logging.info("Mesh %s over %d devices (%d processes); method %s", dict(mesh.shape),
               mesh.size, jax.process_count(), config.method)
  it = None
  try:
    data = _Data(config, train=True, test=int(t.eval_every) >= 0)
    latest = ckpt.latest_step()
    meta = ckpt.meta(latest) if latest is not None else {}
    start_step = int(latest or 0)
    # The stream starts at `start_step`; a restored iterator state (the next global step, plus
    # a fingerprint of seed / batch size / shots that must match) confirms the position.
    it = train_iterator(config, data, method, start_step)
    first_batch = next(it)  # shapes for init; also the first training batch
    setup = build_setup(config, method, mesh, first_batch)
    if latest is None:
      state, frozen = init_state(setup)
      pending_first = first_batch
    else:
      state, _ = ckpt.restore(latest, setup.abstract_state, data_iterator=it)
      # set_state rewinds the iterator; without a saved state it stays one batch ahead.
      pending_first = None if ckpt.last_restore_data_state else first_batch
      frozen = init_frozen(setup)
      _check_frozen(meta, frozen)
      if int(state["step"]) != start_step:
        raise ValueError(f"Checkpoint {latest} holds step {int(state['step'])}")
      logging.info("Resumed from checkpoint step %d", start_step)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state["params"]))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_frozen))
    logging.info("%s: %d trainable, %d frozen parameters", config.method, n_params, n_frozen)
    if start_step == 0 and lead:
      writer.write_hparams(monitoring.flatten_config(config))
    frozen_fp = fingerprint(frozen)
    run_meta = dict(method=config.method, config_sha256=hashlib.sha256(
        config_json(config).encode()).hexdigest(), frozen_fingerprint=frozen_fp,
        num_params=n_params, process_count=jax.process_count(),
        devices=mesh.size)

    train_step = make_train_step(setup, int(t.grad_accum))
    base_lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
    num_steps = int(t.num_steps)
    global_batch = int(t.batch_size)
    pending: list[tuple[int, dict]] = []
    window: list[dict] = []
    results = None
    last_log_time, last_log_step = None, start_step
    excluded = 0.0  # seconds spent in evaluation / checkpointing since the last log
    profiling, profile_start = False, start_step + 2
    step = start_step

    with jax.set_mesh(mesh):
      for step in range(start_step + 1, num_steps + 1):
        if t.profile_steps > 0 and lead and step == profile_start:
          jax.block_until_ready(state)
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
          profiling = True
        local = pending_first if pending_first is not None else next(it)
        pending_first = None
        batch = shd.global_batch(local, mesh)
        state, metrics = train_step(state, frozen, batch, base_lr)
        pending.append((step, metrics))
        if profiling and step == profile_start + t.profile_steps - 1:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
          logging.info("Wrote a profile of %d steps to %s/profile", t.profile_steps, workdir)
        if last_log_time is None:
          # The first step includes compilation; the rate is measured from its end.
          jax.block_until_ready(metrics["loss"])
          last_log_time, last_log_step = time.perf_counter(), step

        is_last = step == num_steps
        do_eval = t.eval_every >= 0 and (is_last or (t.eval_every > 0 and
                                                      step % t.eval_every == 0))
        do_ckpt = do_eval or step % t.checkpoint_every == 0
        do_log = is_last or step % t.log_every == 0
        if do_log or do_ckpt:
          window.extend(m for _, m in _check_finite(pending, ckpt))
          pending = []
        if do_log and window:
          now = time.perf_counter()
          rate = (step - last_log_step) / max(now - last_log_time - excluded, 1e-9)
          scalars = {f"train/{k}": float(np.mean([w[k] for w in window]))
                     for k in window[0] if k not in ("finite", "params_finite", "lr")}
          scalars["train/lr"] = float(window[-1]["lr"])
          if step > last_log_step:
            scalars["train/steps_per_sec"] = rate
            scalars["train/episodes_per_sec"] = rate * global_batch
          writer.write_scalars(step, scalars)
          if step > last_log_step:
            speed = (f"{rate:.2f} steps/s, {rate * global_batch:.1f} episodes/s, ETA "
                     f"{monitoring.format_eta((num_steps - step) / rate)}")
          else:
            speed = "first step (includes compilation)"
          logging.info("[%d/%d] loss %.4f  lr %.3g  grad_norm %.3g  %s", step, num_steps,
                       scalars["train/loss"], scalars["train/lr"], scalars["train/grad_norm"],
                       speed)
          window, last_log_time, last_log_step, excluded = [], now, step, 0.0
        paused = time.perf_counter()
        if do_eval:
          results = run_evaluation(config, data, method, state["params"], frozen, mesh)
          if lead:
            monitoring.write_eval(writer, step, results)
          logging.info("step %d: %s", step, monitoring.summary_line(results))
        if do_ckpt:
          ckpt.save(step, state, data_iterator=it,
                    metrics={"miou": results["miou"]} if do_eval else None, meta=run_meta)
        excluded += time.perf_counter() - paused
        if step_callback is not None:
          step_callback(step, metrics, state)
      if profiling:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      writer.flush()

    if results is None and t.eval_every >= 0:
      # Resumed at the end (nothing left to train): evaluate the restored state.
      results = run_evaluation(config, data, method, state["params"], frozen, mesh)
    ckpt.wait()
    out = dict(start_step=start_step, step=step, checkpoint_dir=ckpt.directory,
               results=monitoring.results_for_json(results) if results is not None else None)
    if lead:
      utils.atomic_write_json(os.path.join(workdir, "results.json"), out, indent=2)
    if results is not None:
      print(f"Final (step {step}): {monitoring.summary_line(results)}", flush=True)
    else:
      print(f"Final (step {step}): no evaluation (train.eval_every < 0)", flush=True)
    return out
  finally:
    if it is not None:
      it.close()
    ckpt.close()
    writer.close()


def _check_frozen(meta: Mapping[str, Any], frozen: PyTree, *, strict: bool = True) -> None:
  """Compares the rebuilt frozen tree with the fingerprint stored at save time."""
  saved = meta.get("frozen_fingerprint")
  if not saved:
    return
  now = fingerprint(frozen)
  ok = saved[0] == now[0] and all(
      math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(saved[1:], now[1:]))
  if not ok:
    msg = (f"The frozen weights rebuilt from the config (fingerprint {now}) differ from those "
           f"the checkpoint was trained with ({saved}): check the weight files / seed.")
    if strict:
      raise ValueError(msg)
    logging.warning(msg)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None) -> dict:
  """Restores the best (else latest, or `step`) checkpoint of `workdir` and evaluates it.

  Writes `workdir/eval_results.json` and eval scalars at the checkpoint's step.
  """
  workdir = os.path.abspath(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    if step is None:
      step = ckpt.best_step()
      which = "best"
      if step is None:
        step, which = ckpt.latest_step(), "latest"
    else:
      which = "requested"
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {ckpt.directory} to evaluate")
    preflight(config, train=False)
    mesh = shd.mesh_from_config(config)
    method = get_method(config)
    data = _Data(config, train=False, test=True)
    from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
    example = next(iter(pipeline.eval_loader(
        config, data.test_source, data.test_episodes[:1], normalization=method.normalization,
        global_batch_size=1, shot=int(config.data.shot), process_index=0, process_count=1)))
    example = {k: v for k, v in example.items()
               if k not in ("valid", "episode_index", "query_mask_orig", "query_size")}
    setup = build_setup(config, method, mesh, example)
    params = ckpt.restore_params(step, setup.abstract_state["params"])
    frozen = init_frozen(setup)
    _check_frozen(ckpt.meta(step), frozen, strict=False)
    logging.info("Evaluating the %s checkpoint, step %d", which, step)
    results = run_evaluation(config, data, method, params, frozen, mesh)
    out = dict(step=step, which=which, results=monitoring.results_for_json(results))
    if jax.process_index() == 0:
      utils.atomic_write_json(os.path.join(workdir, "eval_results.json"), out, indent=2)
      writer = monitoring.create_writer(os.path.join(workdir, "eval"))
      monitoring.write_eval(writer, step, results)
      writer.close()
    from fssjax import evaluate  # pylint: disable=g-import-not-at-top
    print(evaluate.format_results(results), flush=True)
    print(f"Checkpoint step {step} ({which}): {monitoring.summary_line(results)}", flush=True)
    return out
  finally:
    ckpt.close()
