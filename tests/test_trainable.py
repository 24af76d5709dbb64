"""Trainable parameters by pattern (`config.model.trainable`): the split, what the optimiser
sees, and the frozen leaves staying bit-identical through training steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fssjax import configlib
from fssjax import sharding as shd
from fssjax import train
from fssjax.methods import base, get_method


def _config(trainable=None):
  c = configlib.base_config()
  c.method = "hsnet"
  c.seed = 1
  c.data.image_size = 32
  c.train.batch_size = 2
  c.train.num_steps = 3
  c.optimizer.lr = 1e-2
  c.model = ml_collections.ConfigDict(dict(backbone="resnet_tiny", learner_channels=(4, 8, 8),
                                           loss_boundary="ignore"))
  c.model.trainable = trainable
  return c


def _batch(seed=0, b=2, size=32):
  r = np.random.default_rng(seed)
  qmask = np.zeros((b, size, size), np.uint8)
  qmask[:, 4:20, 6:24] = 1
  smask = np.zeros((b, 1, size, size), np.uint8)
  smask[:, :, 8:24, 4:20] = 1
  return {"query_image": r.standard_normal((b, size, size, 3)).astype(np.float32),
          "query_mask": qmask,
          "support_images": r.standard_normal((b, 1, size, size, 3)).astype(np.float32),
          "support_masks": smask, "class_id": np.zeros((b,), np.int32)}


def test_partition_merge_and_errors():
  tree = {"a": {"lora_a": jnp.ones(2), "w": jnp.ones(3)}, "b": {"lora_b": jnp.ones(1)}}
  params, frozen = base.partition(tree, [r".*/lora_(a|b)"])
  assert base.leaf_paths(params).keys() == {"a/lora_a", "b/lora_b"}
  assert base.leaf_paths(frozen).keys() == {"a/w"}
  merged = base.merge(params, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(tree)
  with pytest.raises(base.ConfigError, match=r"\['mask_decoder/\.\*'\] match no parameter"):
    base.partition(tree, [r".*/lora_a", "mask_decoder/.*"])
  with pytest.raises(base.ConfigError, match="not a regular expression"):
    base.partition(tree, ["("])


def test_published_default_and_config_patterns():
  assert get_method(_config()).trainable_patterns() == ["params/learner/.*"]
  both = ("params/learner/.*", "params/backbone/.*")
  assert get_method(_config(both)).trainable_patterns() == list(both)
  mesh = shd.make_mesh()
  with pytest.raises(base.ConfigError, match="params/lerner"):
    train.build_setup(_config(("params/lerner/.*",)), get_method(_config(("params/lerner/.*",))),
                      mesh, _batch())


def test_frozen_leaves_are_untouched_and_not_in_the_optimizer_state():
  """Three Adam steps with only the learner trainable: every frozen (backbone) leaf is
  bit-identical, the optimiser state holds exactly the trainable leaves, and the learner
  moved."""
  config = _config()
  method = get_method(config)
  mesh = shd.make_mesh()
  setup = train.build_setup(config, method, mesh, _batch())
  state, frozen = train.init_state(setup)
  before_frozen = jax.device_get(frozen)
  before_params = jax.device_get(state["params"])
  assert set(base.leaf_paths(frozen)) and all(
      p.startswith("params/backbone/") for p in base.leaf_paths(frozen))
  assert all(p.startswith("params/learner/") for p in base.leaf_paths(state["params"]))
  # The optimiser's per-parameter trees (Adam's mu and nu) have the trainable leaves only.
  param_paths = set(base.leaf_paths(state["params"]))
  adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert adam and all(set(base.leaf_paths(s.mu)) == param_paths for s in adam)
  n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert n_opt == 2 * n_params  # mu and nu (besides scalar step counts), nothing frozen
  step = train.make_train_step(setup)
  lr = jnp.float32(setup.optimizer.base_lr)
  with jax.set_mesh(mesh):
    for i in range(3):
      state, metrics = step(state, frozen, shd.global_batch(_batch(i), mesh), lr)
  assert bool(metrics["finite"])
  for (path, a), b in zip(base.leaf_paths(before_frozen).items(),
                          base.leaf_paths(jax.device_get(frozen)).values()):
    np.testing.assert_array_equal(a, b, err_msg=path)
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before_params), jax.tree.leaves(jax.device_get(state["params"])))]
  assert np.mean(moved) > 0.8, moved  # the learner trains (a few leaves may get no gradient)


def test_sizes_are_counted_per_tree():
  tree = {"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)}
  assert base.tree_size(tree) == (10, 6 * 4 + 4 * 2)
