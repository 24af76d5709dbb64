"""The refinement network and its BCE + Dice loss (fssjax.nn.refine).

Toy task: 32 x 32 pseudo-samples (fssjax.data.pseudo_samples, difficulty 0.3); the coarse mask
is the truth dilated by 2 px (two 3 x 3 dilations) and shifted by up to 1 px. 100 Adam steps
on 16 images; held-out IoU of the coarse mask ~0.50, of the refined one ~0.75 (measured): the
test asks for +0.12.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fssjax.data.pseudo_samples import PseudoSampleSpec, make_pseudo_sample
from fssjax.nn.refine import RefineNet, init_params, refine_loss
from fssjax.priors.polygons import mask_iou

SPEC = PseudoSampleSpec(size=32, fg_radius=(0.22, 0.34))


def _coarse(mask, seed):
  m = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=2)
  dy, dx = np.random.default_rng(seed).integers(-1, 2, 2)
  return np.roll(m, (dy, dx), (0, 1))


def _batch(seeds):
  images, masks, coarse = [], [], []
  for s in seeds:
    p = make_pseudo_sample(s, 0.3, SPEC)
    for img, m in ((p.support_image, p.support_mask), (p.query_image, p.query_mask)):
      images.append(img.astype(np.float32) / 127.5 - 1.0)
      masks.append(m)
      coarse.append(_coarse(m, s))
  return np.stack(images), np.stack(masks), np.stack(coarse).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
  net = RefineNet(width=8)
  x, y, c = _batch(range(8))
  params = init_params(net, 0, x.shape)
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, x, y, c):
    loss, g = jax.value_and_grad(lambda p: refine_loss(net.apply({"params": p}, x, c), y)[0])(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(100):
    params, state, loss = step(params, state, x, y, c)
    losses.append(float(loss))
  return net, params, losses


def test_untrained_network_returns_the_coarse_mask():
  net = RefineNet(width=4)
  x, y, c = _batch([3])
  params = init_params(net, 1, x.shape)
  assert float(params["prior_scale"]) == 3.0 and not params["head"]["kernel"].any()
  logits = jax.jit(net.apply)({"params": params}, x, c)
  assert logits.shape == (2, 32, 32) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits) > 0, c > 0.5)
  np.testing.assert_allclose(np.abs(np.asarray(logits)), 3.0, rtol=1e-6)
  # Same tree as Flax's own init.
  shapes = jax.eval_shape(net.init, jax.random.key(0), x, c)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="coarse mask"):
    net.apply({"params": params}, x, c[:, :16])
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    net.apply({"params": params}, x[0], c)


def test_loss_values():
  t = np.array([[[1, 0], [1, 255]]])
  good = np.array([[[20.0, -20.0], [20.0, 0.0]]])
  loss, parts = refine_loss(good, t)
  assert float(parts["bce"]) < 1e-6 and float(parts["dice"]) < 1e-6
  # The ignored pixel's logit does not matter.
  loss2, _ = refine_loss(good.copy() * np.array([1, 1, 1, 0]).reshape(1, 2, 2) + np.array(
      [0, 0, 0, 50.0]).reshape(1, 2, 2), t)
  assert float(loss2) == pytest.approx(float(loss), abs=1e-6)
  bad, parts = refine_loss(-good, t)
  assert float(parts["bce"]) == pytest.approx(20.0, abs=1e-3)
  # Dice with eps 1: 1 - (2*0 + 1) / (1 + 2 + 1) with p = (0, 1, 0) over valid pixels.
  assert float(parts["dice"]) == pytest.approx(0.75, abs=1e-6)
  assert float(bad) == pytest.approx(20.75, abs=1e-3)
  # Zero logits: bce = log 2, dice = 1 - (2 * 1 + 1) / (1.5 + 2 + 1).
  _, parts = refine_loss(np.zeros((1, 2, 2)), t)
  assert float(parts["bce"]) == pytest.approx(np.log(2.0), abs=1e-6)
  assert float(parts["dice"]) == pytest.approx(1 - 3 / 4.5, abs=1e-6)


def test_training_lowers_the_loss(trained):
  _, _, losses = trained
  assert losses[10] < losses[0] - 0.05
  assert losses[-1] < 0.5 * losses[0]
  assert np.all(np.isfinite(losses))


def test_refinement_improves_a_coarse_mask(trained):
  net, params, _ = trained
  x, y, c = _batch(range(100, 106))  # held out
  refined = np.asarray(jax.jit(net.apply)({"params": params}, x, c)) > 0
  coarse_iou = np.mean([mask_iou(a, b) for a, b in zip(c, y)])
  refined_iou = np.mean([mask_iou(a, b) for a, b in zip(refined, y)])
  assert coarse_iou < 0.6
  assert refined_iou > coarse_iou + 0.12, (coarse_iou, refined_iou)
