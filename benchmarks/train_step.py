"""Speed and memory of one method's jitted train step, printed as JSON lines.

  python benchmarks/train_step.py --config=configs/hsnet_coco.py[:arg] \
      [--config.train.batch_size=2 --config.data.image_size=400] [--steps=10 --warmup=3]
  python benchmarks/train_step.py --config=configs/diffews_coco.py:batch=1,grad_accum=1 \
      --max_batch_search=256      # largest global batch that fits (add remat=True to compare)

The step is exactly the one `fssjax.train` runs (same sharding, donation, optimiser), fed a
fixed random batch of the config's shapes (no data loading: this measures the model and the
optimiser). Parameters are the method's fresh init (random weights unless the config names
weight files).

Output, one JSON line per run: method, config, backend, device kind and count, global batch,
image size, shots, precision, compile seconds, median / min / max step seconds over `--steps`
timed steps after `--warmup` steps, episodes/s, peak memory (device `memory_stats()`
peak_bytes_in_use where available, else the host's peak RSS), FLOPs per step from XLA's cost
analysis of the compiled step, achieved FLOP/s, and the fraction of the device's peak where
the device kind is in `PEAK_FLOPS` (dense bf16 tensor-core / MXU peak, per chip: a float32
step on a GPU is compared with the same number, so read it as an upper bound of utilisation).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Independent timing runs (one JSON line each).")
_MAX_BATCH = flags.DEFINE_integer(
    "max_batch_search", 0, "If > 0: instead of timing, find the largest global batch (up to "
    "this value) whose train step compiles and runs without running out of device memory "
    "(doubling from config.train.batch_size, then bisection); prints one JSON line.")
flags.mark_flag_as_required("config")


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "Resource exhausted"))


def batch_fits(config, batch_size: int) -> bool:
  """Whether one train step at `batch_size` compiles and runs (False on out-of-memory)."""
  import jax  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = int(batch_size)
  state = frozen = None
  try:
    mesh, state, frozen, step, lr, batch = common.build_train_step(config)
    with jax.set_mesh(mesh):
      state, metrics = step(state, frozen, batch, lr)
      jax.block_until_ready(metrics["loss"])
    return True
  except Exception as e:  # pylint: disable=broad-except
    if _is_oom(e):
      return False
    raise
  finally:
    state = frozen = None
    jax.clear_caches()


def largest_batch(config, limit: int) -> tuple[int, list[tuple[int, bool]]]:
  """(largest fitting global batch <= limit, [(batch, fits) tried]); 0 if none fits.

  Batches stay multiples of config.train.batch_size (the mesh / accumulation divisor).
  """
  unit = int(config.train.batch_size)
  tried = []

  def fits(n):
    ok = batch_fits(config, n * unit)
    tried.append((n * unit, ok))
    return ok

  if not fits(1):
    return 0, tried
  lo, hi = 1, None
  while hi is None and lo * 2 * unit <= limit:
    if fits(lo * 2):
      lo *= 2
    else:
      hi = lo * 2
  if hi is None:
    hi = min(lo * 2, limit // unit + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo * unit, tried


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  config_name = flags.FLAGS["config"].config_filename
  if _MAX_BATCH.value > 0:
    best, tried = largest_batch(config, _MAX_BATCH.value)
    print(json.dumps(dict(
        benchmark="max_batch", method=config.method, config=config_name,
        backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
        devices=jax.device_count(), image_size=int(config.data.image_size),
        shot=int(config.data.shot), precision=str(config.train.precision),
        grad_accum=int(config.train.grad_accum),
        remat=bool(config.model.get("remat", False)), limit=_MAX_BATCH.value,
        largest_batch=best, tried=tried)), flush=True)
    return
  mesh, state, frozen, step, lr, batch = common.build_train_step(config)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    flops = common.flops_of(compiled)
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, frozen, batch, lr)
    jax.block_until_ready(state)
    for repeat in range(_REPEATS.value):
      times = []
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, lr)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
      record = common.timing_record("train_step", config, config_name, mesh,
                                    int(config.train.batch_size), times, compile_s, flops)
      record.update(repeat=repeat, loss=float(metrics["loss"]))
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
