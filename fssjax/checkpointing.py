"""Checkpoints of a training run: one orbax CheckpointManager, one step directory per save.

A checkpoint step holds, written together (`ocp.args.Composite`):
  * `state`: the train state pytree (params, opt_state, step, rng) as orbax arrays;
  * `data`: the grain iterator state, one JSON file per process
    (`grain.checkpoint.CheckpointSave`), so a resumed run sees exactly the batches it would
    have seen;
  * `meta`: a small JSON dict (config fingerprint, frozen-weights fingerprint, ...).

Retention: the newest `keep` steps plus the single best step by a validation metric
(`best_metric`, higher is better; steps saved without metrics never count as best). A step's
metrics are given to `save`, or recorded after it by `record_metrics` (the training loop
saves a step before evaluating it, so that a kill during the evaluation keeps the step; the
metrics then go to `<directory>/eval_metrics.json`, which ranking and retention read too). Saves are
atomic by orbax's design: a step is written to `<step>.orbax-checkpoint-tmp-*` and renamed
when complete, so a half-written checkpoint is never listed or restored.

Restores take an abstract target tree whose leaves carry the shardings of the *current* mesh,
so a checkpoint written on N devices restores onto M devices. A saved array whose shape does
not match the model raises a ValueError that names the parameter path and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any

STATE, DATA, META = "state", "data", "meta"
METRICS_FILE = "eval_metrics.json"


@dataclasses.dataclass
class _KeepBest:
  """Orbax preservation policy: keeps the step with the highest metric, read from the
  checkpoint's own metrics or else from the recorded ones (`Checkpointer.record_metrics`)."""

  metric_of: Any  # (step, orbax metrics or None) -> float | None

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None
                      ) -> Sequence[bool]:
    del context
    scored = [(v, c.step) for c in checkpoints
              if (v := self.metric_of(c.step, c.metrics)) is not None]
    best = max(scored)[1] if scored else None
    return [c.step == best for c in checkpoints]


def _grain_handler():
  import grain.checkpoint as grain_ckpt  # registers CheckpointSave / CheckpointRestore
  return grain_ckpt.CheckpointHandler()


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """'params/conv/kernel' -> shape for every array leaf (dict keys, attributes, indices)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def check_compatible(saved: PyTree, target: PyTree, *, where: str = "") -> None:
  """Raises ValueError unless `saved` and `target` have the same array paths and shapes.

  The message names every mismatching path with the checkpoint's and the model's shape.
  """
  s, t = flat_shapes(saved), flat_shapes(target)
  problems = []
  for path in sorted(set(s) | set(t)):
    if path not in t:
      problems.append(f"{path}: in the checkpoint {s[path]} but not in the model")
    elif path not in s:
      problems.append(f"{path}: in the model {t[path]} but not in the checkpoint")
    elif s[path] != t[path]:
      problems.append(f"{path}: checkpoint shape {s[path]} != model shape {t[path]}")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"Checkpoint {where} does not fit the model:\n  {shown}{more}")


class Checkpointer:
  """Saves and restores train state + data iterator + metadata under `directory`.

  Args:
    directory: the checkpoint root (step directories are created below it).
    keep: how many of the newest steps to keep (besides the best).
    best_metric: metrics key used to rank steps (higher is better).
    async_save: write arrays in a background thread; the caller may donate or overwrite the
      saved arrays as soon as `save` returns (orbax holds its own copy or reference).
    read_only: never write or delete (evaluation of another run's checkpoints).
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "miou",
               async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    # After `restore` with a data iterator: whether its state was restored (None: not asked).
    self.last_restore_data_state: bool | None = None
    self.read_only = read_only
    metric = lambda m: float(m[best_metric])  # noqa: E731
    policy = ocp_managers.AnyPreservationPolicy([
        ocp_managers.LatestN(n=keep), _KeepBest(self._metric_value)])
    options = ocp.CheckpointManagerOptions(
        best_fn=metric, best_mode="max", preservation_policy=policy,
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: _grain_handler(),
                       META: ocp.JsonCheckpointHandler()})

  # --- queries ----------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest `best_metric` (ties: the later step), or None when no kept
    step has metrics."""
    scored = [(v, s) for s in self.all_steps()
              if (v := self._metric_value(s, self._manager.metrics(s))) is not None]
    return max(scored)[1] if scored else None

  def metrics(self, step: int) -> dict | None:
    """The step's metrics: given to `save`, else recorded by `record_metrics`, else None."""
    return self._manager.metrics(step) or self._recorded().get(str(int(step)))

  def _recorded(self) -> dict:
    path = os.path.join(self.directory, METRICS_FILE)
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def _metric_value(self, step: int, saved: dict | None) -> float | None:
    m = saved or self._recorded().get(str(int(step)))
    if not m or m.get(self.best_metric) is None:
      return None
    return float(m[self.best_metric])

  def record_metrics(self, step: int, metrics: dict[str, float]) -> None:
    """Records validation metrics of an already saved step (ranks it for `best_step` and
    retention). Written atomically by the lead process to `<directory>/eval_metrics.json`."""
    if jax.process_index() != 0:
      return
    from fssjax import utils  # pylint: disable=g-import-not-at-top
    recorded = self._recorded()
    recorded[str(int(step))] = {k: float(v) for k, v in metrics.items()}
    utils.atomic_write_json(os.path.join(self.directory, METRICS_FILE), recorded, indent=1)

  def meta(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return dict(restored[META])

  def saved_state_metadata(self, step: int) -> PyTree:
    """The saved state tree with `ArrayMetadata` leaves (shape, dtype) without reading arrays."""
    return self._manager.item_metadata(step)[STATE].tree

  # --- save / restore ---------------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, data_iterator: Any = None,
           metrics: dict[str, float] | None = None, meta: dict | None = None) -> bool:
    """Writes one checkpoint step (all processes call this).

    Args:
      step: the number of completed training steps.
      state: pytree of jax.Arrays (params, opt_state, step, rng).
      data_iterator: a grain iterator (`get_state`/`set_state`) or None.
      metrics: validation metrics of this step (ranks steps for `best_step`).
      meta: JSON-serialisable metadata.
    """
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta or {}))}
    if data_iterator is not None:
      import grain.checkpoint as grain_ckpt
      items[DATA] = grain_ckpt.CheckpointSave(data_iterator)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                               force=True)
    if saved:
      logging.info("Saving checkpoint step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: PyTree, *,
              data_iterator: Any = None) -> tuple[PyTree, dict]:
    """Restores step `step` onto the shardings carried by `abstract_state`.

    Args:
      step: a step listed by `all_steps()`.
      abstract_state: `jax.ShapeDtypeStruct` tree (with `sharding`) of the expected state.
      data_iterator: when given and the checkpoint has a data item, its state is restored
        in place (it must be the same pipeline as the one saved).

    Returns:
      (state, meta).

    Raises:
      ValueError: when the step is missing or the saved shapes do not fit the target.
    """
    if step not in self.all_steps():
      raise ValueError(f"No checkpoint step {step} in {self.directory}; "
                       f"available: {self.all_steps()}")
    check_compatible(self.saved_state_metadata(step), abstract_state,
                     where=f"{self.directory}/{step}")
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    self.last_restore_data_state = None
    if data_iterator is not None:
      self.last_restore_data_state = False
      state_file = os.path.join(
          self.directory, str(step), DATA,
          f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(state_file):
        import grain.checkpoint as grain_ckpt
        items[DATA] = grain_ckpt.CheckpointRestore(data_iterator)
        self.last_restore_data_state = True
      else:
        logging.warning("Checkpoint step %d has no data iterator state for process %d of %d "
                        "(%s); the caller must position the iterator itself", step,
                        jax.process_index(), jax.process_count(), state_file)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return restored[STATE], dict(restored[META] or {})

  def restore_params(self, step: int, abstract_params: PyTree | None = None) -> PyTree:
    """Restores only `state['params']` of step `step` (evaluation: no optimiser state read).

    Args:
      step: a saved step.
      abstract_params: target `jax.ShapeDtypeStruct`s with shardings, as in `restore`; None
        restores the saved shapes and dtypes onto the first local device (notebooks).
    """
    if step not in self.all_steps():
      raise ValueError(f"No checkpoint step {step} in {self.directory}; "
                       f"available: {self.all_steps()}")
    saved = self.saved_state_metadata(step)
    if "params" not in saved:
      raise ValueError(f"Checkpoint {self.directory}/{step} has no 'params' in its state")
    if abstract_params is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
          saved["params"])
    check_compatible({"params": saved["params"]}, {"params": abstract_params},
                     where=f"{self.directory}/{step}")
    target = {"params": abstract_params}
    path = os.path.join(self.directory, str(step), STATE)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    return restored["params"]

  def wait(self) -> None:
    """Blocks until background saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
