"""Parity of fssjax.nn.vae.AutoencoderKL with diffusers (stored fixtures, float32).

Tolerance: max |ours - reference| <= 1e-4 * max(1, max |reference|) (observed ~4e-6).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn.vae import VAEConfig
from fssjax.weights.diffusers import load_vae
from parity import FIXTURES, assert_close  # tests/parity.py


def test_vae_matches_diffusers():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    ref = {k[len("sd15_tiny/"):]: f[k] for k in f.files if k.startswith("sd15_tiny/vae_")}
  vae, params = load_vae(os.path.join(FIXTURES, "sd15_tiny"))
  sf = vae.config.scaling_factor
  assert sf == pytest.approx(0.18215)
  rng = jax.random.key(3)

  def body(m, x, z, rng):
    mean, logvar = m.encode(x)
    # decode_latents(z * scaling_factor) == decode(z): checks both against diffusers' decode.
    return dict(mean=mean, logvar=logvar, decoded=m.decode_latents(z * sf),
                reconstruction=m(x), sampled=m.encode_latents(x, rng))

  run = jax.jit(lambda p, x, z, r: vae.apply({"params": p}, x, z, r, method=body))
  out = run(params, ref["vae_x"], ref["vae_z"], rng)
  assert_close(out["mean"], ref["vae_mean"], what="mean")
  assert_close(out["logvar"], ref["vae_logvar"], what="logvar")
  assert_close(out["decoded"], ref["vae_decoded"], what="decode_latents / decode")
  assert_close(out["reconstruction"], ref["vae_reconstruction"], what="reconstruction")
  # Scaled latents (what the UNet sees: posterior sample x scaling_factor) and their inverse.
  eps = jax.random.normal(rng, out["mean"].shape)
  expect = (np.asarray(out["mean"]) + np.exp(0.5 * np.asarray(out["logvar"])) * eps) * sf
  np.testing.assert_allclose(out["sampled"], expect, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(out["sampled"]) - np.asarray(out["mean"]) * sf).max() > 1e-3


def test_vae_rejects_bad_inputs_and_configs():
  vae, params = load_vae(os.path.join(FIXTURES, "sd15_tiny"))
  with pytest.raises(ValueError, match="VAE input"):
    jax.eval_shape(lambda p: vae.apply({"params": p}, jnp.zeros((1, 8, 8, 4)),
                                       method=vae.encode), params)
  with pytest.raises(ValueError, match="VAE latent"):
    jax.eval_shape(lambda p: vae.apply({"params": p}, jnp.zeros((1, 4, 4, 3)),
                                       method=vae.decode), params)
  base = dict(block_out_channels=[16, 32], norm_num_groups=8)
  with pytest.raises(ValueError, match="up_block_types"):
    VAEConfig.from_diffusers(dict(base, up_block_types=["AttnUpDecoderBlock2D"] * 2))
  with pytest.raises(ValueError, match="made_up"):
    VAEConfig.from_diffusers(dict(base, made_up=1))
  with pytest.raises(ValueError, match="norm_num_groups"):
    VAEConfig.from_diffusers(dict(base, norm_num_groups=5))
  cfg = VAEConfig.from_diffusers(dict(base, scaling_factor=0.13025, shift_factor=0.1,
                                      _class_name="AutoencoderKL"))
  assert (cfg.scaling_factor, cfg.shift_factor) == (0.13025, 0.1)
