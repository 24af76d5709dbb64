"""Shared pytest setup."""

import os

# Keep tests on the CPU and quiet; multi-device tests start their own subprocess with
# XLA_FLAGS=--xla_force_host_platform_device_count=8.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain worker processes and absl-based code read absl flags; mark them parsed under pytest.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
