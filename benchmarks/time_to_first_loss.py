"""Time from process start to the first logged training loss, cold and warm compilation cache.

  python benchmarks/time_to_first_loss.py --config=configs/hsnet_coco.py:demo
  python benchmarks/time_to_first_loss.py --config=configs/diffews_coco.py:demo --runs=2

Runs `python -m fssjax.main --config=... --workdir=<fresh temporary dir>` `--runs` times with
one fresh persistent XLA compilation cache directory (fssjax.xla_cache): the first run starts
cold (empty cache), the next ones warm. Each run is stopped as soon as the trainer logs its first
loss line (`[1/N] loss ...`, with `--config.train.log_every=1`), so no evaluation runs. The data
set must exist already (the demo generates its synthetic benchmark on first use: run the demo
once before timing). One JSON line per run: config, run index, cache state, seconds to the
first loss, the cache's size after the run.

Where a cold start goes (DiffewS demo, measured in-process on the shared 2-core machine, CPU
seconds): XLA compilation of the train step 44 s, of the shard-first init 28 s (about 500 CPU
kernels, one per random draw and its transform: LLVM code generation, not HLO passes, is the
cost), grain worker start-up ~25 s wall. Since 2026-11-30 the trainer (fssjax.train) batches
the init's random draws by shape (fssjax.batched_rng: same values bit for bit; 28 -> 21 CPU s),
compiles the train step in a background thread while the variables are initialised, and starts
the grain workers before both (the first batch's shapes come from `TrainLoader.batch_at`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string("config", None, "Config file[:arg] for fssjax.main.")
_RUNS = flags.DEFINE_integer("runs", 2, "Runs sharing one cache (the first is cold).")
_CACHE = flags.DEFINE_string("cache_dir", "", "Cache directory (default: a fresh temporary one; "
                             "it must be empty for the first run to be cold).")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds before a run is abandoned.")
_EXTRA = flags.DEFINE_list("override", [], "Extra --config.* overrides, e.g. "
                           "config.data.workers=0.")
flags.mark_flag_as_required("config")

_LOSS = re.compile(r"\[1/\d+\] loss ")


def _dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def first_loss_seconds(config: str, cache: str, timeout: int, overrides: Sequence[str]) -> float:
  """Seconds from starting `python -m fssjax.main` to its first loss line (process killed then)."""
  env = dict(os.environ)
  env.update({
      "FSSJAX_COMPILATION_CACHE": cache,
      # The same settings through JAX's own variables (for an entry point that does not call
      # fssjax.xla_cache.enable).
      "JAX_COMPILATION_CACHE_DIR": cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  with tempfile.TemporaryDirectory(prefix="fssjax_ttfl_") as workdir:
    cmd = [sys.executable, "-m", "fssjax.main", f"--config={config}", f"--workdir={workdir}",
           "--config.train.log_every=1"] + [f"--{o}" for o in overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    tail = []
    try:
      for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if _LOSS.search(line):
          return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
          break
    finally:
      proc.kill()
      proc.wait()
    raise RuntimeError(f"no loss line from {' '.join(cmd)}; last output:\n{''.join(tail)}")


def main(argv: Sequence[str]) -> None:
  del argv
  cache = _CACHE.value or tempfile.mkdtemp(prefix="fssjax_xla_cache_")
  for i in range(_RUNS.value):
    state = "cold" if i == 0 and not os.listdir(cache) else "warm"
    seconds = first_loss_seconds(_CONFIG.value, cache, _TIMEOUT.value, _EXTRA.value)
    print(json.dumps(dict(benchmark="time_to_first_loss", config=_CONFIG.value, run=i,
                          cache=state, seconds=round(seconds, 2), cache_dir=cache,
                          cache_bytes=_dir_size(cache), load_avg=list(os.getloadavg()))),
          flush=True)


if __name__ == "__main__":
  app.run(main)
