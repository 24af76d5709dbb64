"""fssjax.optim: Adam's moment decays come from the config (LISA / DSV-LFS use b2 = 0.95)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax import optim
from fssjax.methods.base import ConfigError


def _config(**opt):
  base = dict(name="adamw", lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.0,
              grad_clip=0.0)
  base.update(opt)
  return ml_collections.ConfigDict(dict(optimizer=base, train=dict(num_steps=10)))


def _two_steps(config, grads):
  o = optim.make_optimizer(config)
  params = {"w": jnp.zeros(2)}
  state = o.tx.init(params)
  for g in grads:
    updates, state = o.tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"]) * o.base_lr


def _reference_adam(grads, lr, b1, b2, eps):
  """PyTorch's Adam update written out (bias-corrected moments)."""
  m = v = 0.0
  w = np.zeros(2)
  for t, g in enumerate(grads, 1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return w


def test_betas_reach_the_update():
  grads = [[1.0, -2.0], [3.0, 0.5]]
  for b2 in (0.999, 0.95):
    got = _two_steps(_config(b2=b2), grads)
    np.testing.assert_allclose(got, _reference_adam(grads, 0.1, 0.9, b2, 1e-8), rtol=1e-5)
  # Absent keys are PyTorch's defaults, and b2 changes the second step.
  np.testing.assert_allclose(_two_steps(_config(), grads),
                             _reference_adam(grads, 0.1, 0.9, 0.999, 1e-8), rtol=1e-5)
  assert not np.allclose(_two_steps(_config(b2=0.95), grads), _two_steps(_config(), grads))


def test_bad_beta_is_a_config_error():
  with pytest.raises(ConfigError, match=r"optimizer.b2=1.5"):
    optim.make_optimizer(_config(b2=1.5))
