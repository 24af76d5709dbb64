"""Small shared utilities: atomic file writes (readable by others: mode 0666 & ~umask, as
`open()` would create them)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _umask() -> int:
  old = os.umask(0o022)
  os.umask(old)
  return old


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either the old file or the whole new one.

  The file gets the mode a plain `open(path, 'w')` would give (0666 & ~umask), not
  `tempfile.mkstemp`'s private 0600.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fchmod(f.fileno(), 0o666 & ~_umask())
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj: Any, **kwargs) -> None:
  atomic_write_bytes(path, json.dumps(obj, **kwargs).encode("utf-8"))
