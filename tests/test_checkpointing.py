"""Tests of fssjax.checkpointing on plain pytrees (orbax + grain for real, one device)."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fssjax import checkpointing
from fssjax import sharding as shd


def _state(seed: int = 0, step: int = 0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
            "head": {"bias": jax.random.normal(k2, (4,))}}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
  return dict(params=params, opt_state=opt_state, step=jnp.int32(step),
              rng=jax.random.PRNGKey(seed + 100))


def _abstract(state):
  mesh = shd.make_mesh()
  shardings = jax.tree.map(lambda _: shd.replicated(mesh), state)
  return shd.with_shardings(jax.eval_shape(lambda: state), shardings)


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_with_meta_and_data_iterator(tmp_path):
  state = _state(1, step=7)
  ds = grain.MapDataset.range(20).shuffle(seed=3).to_iter_dataset()
  it = iter(ds)
  seen = [next(it) for _ in range(5)]
  with checkpointing.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.save(7, state, data_iterator=it, meta={"note": "x", "n": 3})
    expected_rest = [next(it) for _ in range(5)]  # the iterator moves on after the save
  with checkpointing.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() == 7
    fresh = iter(ds)
    assert next(fresh) == seen[0]
    restored, meta = ckpt.restore(7, _abstract(state), data_iterator=fresh)
    assert ckpt.last_restore_data_state is True
    assert [next(fresh) for _ in range(5)] == expected_rest
  assert meta == {"note": "x", "n": 3}
  _assert_tree_equal(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert restored["params"]["conv"]["kernel"].sharding.is_fully_replicated


def test_keeps_latest_n_plus_best(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(str(tmp_path / "c"), keep=2) as ckpt:
    assert ckpt.best_step() is None
    for step in range(1, 7):
      metrics = {2: {"miou": 50.0}, 4: {"miou": 30.0}, 5: {"miou": 40.0}}.get(step)
      ckpt.save(step, state, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  # A new manager (a restarted run) sees the same.
  with checkpointing.Checkpointer(str(tmp_path / "c"), keep=2, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert ckpt.metrics(5) == {"miou": 40.0}
    assert ckpt.metrics(6) is None
  assert sorted(os.listdir(tmp_path / "c")) == ["2", "5", "6"]


def test_metrics_recorded_after_the_save_rank_and_keep_the_step(tmp_path):
  # The training loop saves a step before evaluating it, then records its mIoU.
  state = _state()
  with checkpointing.Checkpointer(str(tmp_path / "c"), keep=1) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, state)
      ckpt.wait()
      ckpt.record_metrics(step, {"miou": {2: 50.0, 3: 20.0}.get(step, 10.0)})
    ckpt.save(5, state)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5]
    assert ckpt.best_step() == 2 and ckpt.metrics(2) == {"miou": 50.0}
  with checkpointing.Checkpointer(str(tmp_path / "c"), keep=1, read_only=True) as ckpt:
    assert ckpt.best_step() == 2 and ckpt.metrics(5) is None


def test_half_written_checkpoint_is_never_restored(tmp_path):
  """A save killed mid-way leaves orbax's temporary directory, never a step directory."""
  root = tmp_path / "c"
  good = _state(0, step=3)
  with checkpointing.Checkpointer(str(root)) as ckpt:
    ckpt.save(3, good)
  # What a process killed while writing step 6 leaves behind: the step's files under the
  # temporary name (no rename to "6" happened), here with a truncated array file.
  partial = root / "6.orbax-checkpoint-tmp-1712345678901234"
  shutil.copytree(root / "3", partial)
  if (partial / "commit_success.txt").exists():
    os.remove(partial / "commit_success.txt")
  for dirpath, _, files in os.walk(partial / "state"):
    for f in files:
      if f.endswith(".zarray") or f.isdigit() or "ocdbt" in dirpath:
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.truncate(1)
  with checkpointing.Checkpointer(str(root), read_only=True) as ckpt:
    assert ckpt.all_steps() == [3]
    assert ckpt.latest_step() == 3
    restored, _ = ckpt.restore(3, _abstract(good))
  _assert_tree_equal(restored, good)
  assert partial.exists()  # read-only: left alone
  # A resumed run starts from step 3, redoes step 6 and replaces the debris.
  redone = _state(5, step=6)
  with checkpointing.Checkpointer(str(root)) as ckpt:
    assert ckpt.latest_step() == 3
    ckpt.save(6, redone)
  assert not partial.exists()
  with checkpointing.Checkpointer(str(root), read_only=True) as ckpt:
    assert ckpt.all_steps() == [3, 6]
    restored, _ = ckpt.restore(6, _abstract(redone))
  _assert_tree_equal(restored, redone)


def test_shape_mismatch_names_path_and_shapes(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(str(tmp_path / "c")) as ckpt:
    ckpt.save(1, state)
  other = jax.tree.map(lambda x: x, state)
  other["params"] = {"conv": {"kernel": jnp.zeros((3, 3, 2, 8))},
                     "head": {"bias": jnp.zeros((4,))}}
  other["opt_state"] = optax.adam(1e-3).init(other["params"])
  with checkpointing.Checkpointer(str(tmp_path / "c"), read_only=True) as ckpt:
    with pytest.raises(ValueError) as err:
      ckpt.restore(1, _abstract(other))
    with pytest.raises(ValueError, match="No checkpoint step 2"):
      ckpt.restore(2, _abstract(state))
  msg = str(err.value)
  assert "params/conv/kernel: checkpoint shape (3, 3, 2, 4) != model shape (3, 3, 2, 8)" in msg
  assert "opt_state/0/mu/conv/kernel" in msg


def test_missing_and_extra_parameters_are_named(tmp_path):
  saved = {"a": jnp.zeros((2,)), "b": jnp.zeros((3,))}
  target = {"a": jax.ShapeDtypeStruct((2,), jnp.float32),
            "c": jax.ShapeDtypeStruct((1,), jnp.float32)}
  with pytest.raises(ValueError) as err:
    checkpointing.check_compatible(saved, target, where="x")
  assert "b: in the checkpoint (3,) but not in the model" in str(err.value)
  assert "c: in the model (1,) but not in the checkpoint" in str(err.value)
  checkpointing.check_compatible(saved, {"a": saved["a"], "b": saved["b"]})


def test_restore_params_only(tmp_path):
  state = _state(2, step=4)
  with checkpointing.Checkpointer(str(tmp_path / "c")) as ckpt:
    ckpt.save(4, state)
  with checkpointing.Checkpointer(str(tmp_path / "c"), read_only=True) as ckpt:
    params = ckpt.restore_params(4, _abstract(state)["params"])
    bad = _abstract(state)["params"]
    bad["head"]["bias"] = jax.ShapeDtypeStruct((5,), jnp.float32)
    with pytest.raises(ValueError, match=r"params/head/bias: checkpoint shape \(4,\)"):
      ckpt.restore_params(4, bad)
  _assert_tree_equal(params, state["params"])


def test_async_save_survives_donation_of_the_saved_arrays(tmp_path):
  """The train loop donates the state right after `save` returns: the save must hold a copy."""
  state = _state(4, step=2)
  expected = jax.device_get(state)
  donate = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7 if x.dtype != jnp.uint32 else x, s),
                   donate_argnums=0)
  with checkpointing.Checkpointer(str(tmp_path / "c"), async_save=True) as ckpt:
    ckpt.save(2, state)
    # Donating overwrites or frees the saved buffers while the write may still run (jax
    # copies instead when a transfer still holds a buffer: either way the save must hold).
    state = donate(state)
    jax.block_until_ready(state)
  with checkpointing.Checkpointer(str(tmp_path / "c"), read_only=True) as ckpt:
    restored, _ = ckpt.restore(2, _abstract(expected))
  _assert_tree_equal(restored, expected)
