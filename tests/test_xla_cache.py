"""fssjax.xla_cache: where the persistent compilation cache goes, and that a second process
reuses it (no timing: it checks that entries are written and read back)."""

import os
import subprocess
import sys

import jax
import pytest

from fssjax import xla_cache


@pytest.fixture
def restore_config():
  saved = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def test_resolve_order(monkeypatch, tmp_path, restore_config):
  monkeypatch.delenv(xla_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  jax.config.update("jax_compilation_cache_dir", None)
  assert xla_cache.resolve() == str(tmp_path / "xdg" / "fssjax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert xla_cache.resolve() == os.path.join(os.path.expanduser("~"), ".cache", "fssjax", "xla")
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user_set"))
  assert xla_cache.resolve() == str(tmp_path / "user_set")  # an explicit JAX setting wins
  monkeypatch.setenv(xla_cache.ENV, str(tmp_path / "env"))
  assert xla_cache.resolve() == str(tmp_path / "env")
  assert xla_cache.resolve(str(tmp_path / "arg")) == str(tmp_path / "arg")
  for off in ("off", "OFF", "0", "false", "none", ""):
    monkeypatch.setenv(xla_cache.ENV, off)
    assert xla_cache.resolve() is None
    assert xla_cache.enable() is None


def test_enable_sets_jax_config(monkeypatch, tmp_path, restore_config):
  monkeypatch.delenv(xla_cache.ENV, raising=False)
  path = xla_cache.enable(str(tmp_path / "c"))
  assert path == str(tmp_path / "c") and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0


def test_unwritable_directory_is_a_warning(monkeypatch, tmp_path, restore_config):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  before = jax.config.jax_compilation_cache_dir
  assert xla_cache.enable(str(blocker / "sub")) is None
  assert jax.config.jax_compilation_cache_dir == before


_CHILD = """
import sys, jax, jax.numpy as jnp
from fssjax import xla_cache
xla_cache.enable(sys.argv[1])
print(float(jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.float32(0.5))))
"""


def test_second_process_reads_the_cache(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(xla_cache.ENV, None)
  run = lambda: subprocess.run([sys.executable, "-c", _CHILD, str(cache)], env=env,  # noqa: E731
                               check=True, capture_output=True, text=True).stdout
  first = run()
  entries = sorted(p.name for p in cache.iterdir())
  assert entries, "the first run wrote no cache entry"
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  second = run()
  assert first == second
  assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new compiled
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
