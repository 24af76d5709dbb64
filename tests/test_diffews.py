"""DiffewS method: support-conv init, sign conventions, threshold rule, training signal."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax import configlib
from fssjax.methods import diffews
from fssjax.methods.base import partition

TINY_UNET = dict(
    block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=16, norm_num_groups=8, in_channels=12, out_channels=12,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])


def make_config(**model):
  c = configlib.base_config()
  c.method = "diffews"
  c.model = ml_collections.ConfigDict(dict(
      sd_path="", autoencoder="space_to_depth", space_to_depth_factor=2, unet=TINY_UNET,
      vae={}, timestep=1, mask_threshold_kind="relative", mask_threshold=0.25, remat=False,
      allow_pickle_weights=False))
  c.model.update(model)
  return c


def make_batch(b=2, k=2, hw=16, seed=0):
  rng = np.random.default_rng(seed)
  masks = np.zeros((b, hw, hw), np.uint8)
  for i in range(b):
    masks[i, 2 + i:10 + i, 3:12] = 1
  s_masks = np.zeros((b, k, hw, hw), np.uint8)
  s_masks[:, :, 4:12, 4:12] = 1
  return dict(
      query_image=rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32),
      query_mask=masks,
      support_images=rng.uniform(-1, 1, (b, k, hw, hw, 3)).astype(np.float32),
      support_masks=s_masks,
      class_id=np.zeros((b,), np.int32))


def _init(method, batch):
  """(params, frozen): method.init under jit (as the trainer runs it), split by the method's
  trainable patterns."""
  return partition(jax.jit(method.init)(jax.random.key(0), batch), method.trainable_patterns())


@functools.cache
def _default():
  """(method, params, frozen) of the default tiny config, built once for this module."""
  method = diffews.DiffewS(make_config())
  return (method,) + tuple(_init(method, make_batch()))


def test_support_conv_is_repeated_and_halved():
  method, params, frozen = _default()
  # space_to_depth has no VAE parameters: frozen holds only the prompt embedding.
  assert set(params) == {"unet", "conv_in_support"} and set(frozen) == {"context"}
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 12))
  # With identical image and mask latents, the support conv equals the UNet's own conv_in.
  support = method._support_features(params, jnp.concatenate([x, x], axis=-1))
  own = jax.lax.conv_general_dilated(x, params["unet"]["conv_in"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(support, own + params["unet"]["conv_in"]["bias"], atol=1e-5)
  assert params["conv_in_support"]["kernel"].shape[2] == 24


def test_target_sign_and_threshold_rule():
  """decode(-v) of v = -(mask latent) gives back the mask; the published rule recovers it."""
  method, _, frozen = _default()
  mask = make_batch()["query_mask"]
  v = -method._encode(frozen, diffews.mask_to_rgb(jnp.asarray(mask)))
  rgb = method.decode_mask(frozen, v)
  np.testing.assert_allclose(rgb, np.repeat(mask[..., None], 3, -1).astype(np.float32),
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(method.scores_from_rgb(rgb) > 0), mask == 1)


def test_published_threshold_uses_the_largest_single_rgb_value():
  """aim-uofa/DiffewS evaluation: mean over RGB > 0.25 x the image's largest RGB value.
  Pixels (1, 0, 0), (.3, .3, .3), (.2, .2, .2): cut 0.25, the first two are foreground (the
  largest channel mean, 1/3, would give a cut of 0.083 and mark all three)."""
  method, _, _ = _default()
  rgb = jnp.asarray([[[[1.0, 0.0, 0.0], [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]]]])
  np.testing.assert_array_equal(np.asarray(method.scores_from_rgb(rgb) > 0),
                                [[[True, True, False]]])
  absolute = diffews.DiffewS(make_config(mask_threshold_kind="absolute", mask_threshold=0.3))
  np.testing.assert_array_equal(np.asarray(absolute.scores_from_rgb(rgb) > 0),
                                [[[True, False, False]]])
  # Decoded values reach the rule as the published 8-bit image: 0.3 -> floor(0.65 * 255) / 255.
  assert method.interpolation == "nearest"


def test_unknown_model_key_is_rejected():
  with pytest.raises(ValueError, match=r"config.model.mask_treshold.*did you mean "
                     r"model.mask_threshold"):
    diffews.DiffewS(make_config(mask_treshold=0.3))


def test_support_bank_changes_prediction_and_loss_learns():
  method, params, frozen = _default()
  batch = make_batch()
  other = dict(batch, support_masks=1 - batch["support_masks"])
  predict = jax.jit(method.predict)
  p1 = predict(params, frozen, batch)
  p2 = predict(params, frozen, other)
  assert p1.shape == (2, 16, 16)
  assert not np.allclose(p1, p2), "the support mask must reach the query pass through the bank"

  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    (loss, _), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, frozen, batch, jax.random.key(0))
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(30):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_kl_autoencoder_path_shapes():
  vae = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
             norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2)
  unet = dict(TINY_UNET, in_channels=4, out_channels=4)
  method = diffews.DiffewS(make_config(autoencoder="kl", vae=vae, unet=unet))
  batch = make_batch(b=1, k=3)
  params, frozen = _init(method, batch)
  assert frozen["vae"], "the VAE lives in the frozen collection"
  loss, _ = jax.jit(method.loss)(params, frozen, batch, jax.random.key(0))
  assert np.isfinite(float(loss))
  assert jax.jit(method.predict)(params, frozen, batch).shape == (1, 16, 16)


def test_missing_weights_error_names_path_and_demo(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*diffews_coco.py:demo"):
    diffews.DiffewS(make_config(sd_path=str(tmp_path / "nowhere")))


def test_latent_channel_mismatch_is_an_error():
  with pytest.raises(ValueError, match="latent channels"):
    diffews.DiffewS(make_config(space_to_depth_factor=4))
