"""Speed and memory of one method's jitted train step, printed as JSON lines.

  python benchmarks/train_step.py --config=configs/hsnet_coco.py[:arg] \
      [--config.train.batch_size=2 --config.data.image_size=400] [--steps=10 --warmup=3]

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
import resource
import statistics
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Independent timing runs (one JSON line each).")
flags.mark_flag_as_required("config")

# Dense bf16 peak FLOP/s per device (vendor data sheets; GPUs: SXM parts, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def _peak_flops(kind: str) -> float | None:
  if kind in PEAK_FLOPS:
    return PEAK_FLOPS[kind]
  for name, value in PEAK_FLOPS.items():
    if kind.startswith(name):
      return value
  return None


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _peak_memory(devices) -> tuple[int | None, str]:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device peak_bytes_in_use (max over devices)"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return int(rss) * 1024, "host peak RSS (no device memory stats)"


def random_batch(config, seed: int = 0):
  """A global batch of the config's shapes: images N(0,1), binary masks, class ids."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b, s, k = int(config.train.batch_size), int(config.data.image_size), int(config.data.shot)
  return dict(
      query_image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
      query_mask=rng.integers(0, 2, size=(b, s, s)).astype(np.uint8),
      support_images=rng.normal(size=(b, k, s, s, 3)).astype(np.float32),
      support_masks=rng.integers(0, 2, size=(b, k, s, s)).astype(np.uint8),
      class_id=rng.integers(0, 20, size=(b,)).astype(np.int32),
  )


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fssjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax.methods import get_method  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  mesh = shd.mesh_from_config(config)
  train.check_config(config, mesh)
  method = get_method(config)
  batch_np = random_batch(config)
  setup = train.build_setup(config, method, mesh, batch_np)
  state, frozen = train.init_state(setup)
  step = train.make_train_step(setup, int(config.train.grad_accum))
  lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
  batch = shd.global_batch(batch_np, mesh)

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)
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
      median = statistics.median(times)
      peak_bytes, peak_what = _peak_memory(mesh.devices.flat)
      kind = jax.devices()[0].device_kind
      peak = _peak_flops(kind)
      achieved = flops / median if flops else None
      record = dict(
          benchmark="train_step",
          method=config.method,
          config=flags.FLAGS["config"].config_filename,
          backend=jax.default_backend(),
          device_kind=kind,
          devices=int(mesh.size),
          global_batch=int(config.train.batch_size),
          image_size=int(config.data.image_size),
          shot=int(config.data.shot),
          precision=str(config.train.precision),
          model={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in config.model.items()},
          repeat=repeat,
          compile_s=round(compile_s, 3),
          steps=len(times),
          step_s_median=median,
          step_s_min=min(times),
          step_s_max=max(times),
          episodes_per_s=int(config.train.batch_size) / median,
          peak_memory_bytes=peak_bytes,
          peak_memory_source=peak_what,
          flops_per_step=flops,
          achieved_flops_per_s=achieved,
          device_peak_flops=peak * mesh.size if peak else None,
          fraction_of_peak=(achieved / (peak * mesh.size)) if (achieved and peak) else None,
          loss=float(metrics["loss"]),
      )
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
