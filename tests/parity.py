"""Shared by the diffusers / transformers parity tests (test_unet, test_vae, test_clip_text)."""

import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")


def assert_close(actual, expected, tol=1e-4, what=""):
  """max |actual - expected| <= tol * max(1, max |expected|), shapes equal."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = np.abs(actual - expected).max()
  bound = tol * max(1.0, float(np.abs(expected).max()))
  assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
