"""A persistent XLA compilation cache, on by default, so that a second run compiles nothing.

JAX can keep every compiled executable on disk, keyed by the computation, the compile options,
the backend and the jax / jaxlib versions, and reuse it in later processes
(https://docs.jax.dev/en/latest/persistent_compilation_cache.html). `enable()` turns it on:

  from fssjax import xla_cache
  xla_cache.enable()          # in fssjax.main, before anything is compiled

Where the cache lives (first match):
  1. `enable(path)` with a path;
  2. the environment variable FSSJAX_COMPILATION_CACHE: a directory, or 'off' (also '0',
     'false', 'none', '') to leave the cache off;
  3. an explicit `jax_compilation_cache_dir` already set by the user (JAX_COMPILATION_CACHE_DIR
     or jax.config.update): left as it is;
  4. $XDG_CACHE_HOME/fssjax/xla, else ~/.cache/fssjax/xla.

Settings: every compilation is cached whatever it took (`jax_persistent_cache_min_compile_time_secs
= 0`; the default of 1 s would skip the many small programs a run compiles at start-up, which
together take seconds on a CPU) and whatever its size (`jax_persistent_cache_min_entry_size_bytes
= 0`). The directory is not size-limited (`jax_compilation_cache_max_size` stays -1): remove it to
reclaim space. A directory that cannot be created is a warning, not an error: the run then
compiles as without a cache.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import logging
import jax

ENV = "FSSJAX_COMPILATION_CACHE"
_OFF = ("off", "0", "false", "no", "none", "")


def default_dir() -> str:
  """$XDG_CACHE_HOME/fssjax/xla, or ~/.cache/fssjax/xla."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fssjax", "xla")


def resolve(path: Optional[str] = None) -> Optional[str]:
  """The cache directory `enable(path)` would use, or None for off (see the module docstring)."""
  if path:
    return os.path.abspath(os.path.expanduser(path))
  env = os.environ.get(ENV)
  if env is not None:
    if env.strip().lower() in _OFF:
      return None
    return os.path.abspath(os.path.expanduser(env.strip()))
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  return default_dir()


def enable(path: Optional[str] = None) -> Optional[str]:
  """Turns the persistent compilation cache on; returns its directory (None: left off).

  Args:
    path: cache directory; None: FSSJAX_COMPILATION_CACHE, an already configured
      `jax_compilation_cache_dir`, or the user cache directory (module docstring).

  Call it before the first compilation of the process: JAX reads the settings when it first
  uses the cache.
  """
  directory = resolve(path)
  if directory is None:
    logging.info("XLA compilation cache: off (%s)", ENV)
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    logging.warning("XLA compilation cache: cannot create %s (%s); compiling without a cache. "
                    "Set %s to a writable directory or to 'off'.", directory, e, ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.debug("XLA compilation cache: %s", directory)
  return directory
