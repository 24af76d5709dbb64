"""Helpers shared by the benchmark scripts (no flags here: each script defines its own)."""

from __future__ import annotations

import resource
import statistics

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
# Dense float32 peak FLOP/s (GPUs: the CUDA-core FP32 rate, not TF32 tensor cores). TPUs have no
# float32 matrix unit (XLA runs float32 products as several bf16 passes): no entry.
PEAK_FLOPS_FP32 = {
    "NVIDIA H100 80GB HBM3": 67e12,
    "NVIDIA H100": 67e12,
    "NVIDIA H200": 67e12,
    "NVIDIA A100-SXM4-80GB": 19.5e12,
    "NVIDIA A100-SXM4-40GB": 19.5e12,
    "NVIDIA A100 80GB PCIe": 19.5e12,
}


def peak_flops(kind: str, table: dict[str, float] | None = None) -> float | None:
  """The device kind's peak from `table` (default: bf16 `PEAK_FLOPS`); None if unknown."""
  table = PEAK_FLOPS if table is None else table
  if kind in table:
    return table[kind]
  for name, value in table.items():
    if kind.startswith(name):
      return value
  return None


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_memory(devices) -> tuple[int | None, str]:
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


def build_train_step(config):
  """(mesh, state, frozen, step fn, lr, global batch) for the config, built as fssjax.train
  builds them, with a random batch of the config's shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fssjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax.methods import get_method  # pylint: disable=g-import-not-at-top

  mesh = shd.mesh_from_config(config)
  train.check_config(config, mesh)
  method = get_method(config)
  batch_np = random_batch(config)
  setup = train.build_setup(config, method, mesh, batch_np)
  state, frozen = train.init_state(setup)
  step = train.make_train_step(setup, int(config.train.grad_accum))
  lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
  return mesh, state, frozen, step, lr, shd.global_batch(batch_np, mesh)


def timing_record(benchmark: str, config, config_name: str, mesh, batch_size: int,
                  times: list[float], compile_s: float, flops: float | None) -> dict:
  """The JSON fields every timing benchmark prints (see benchmarks/train_step.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  median = statistics.median(times)
  peak_bytes, peak_what = peak_memory(mesh.devices.flat)
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)
  peak32 = peak_flops(kind, PEAK_FLOPS_FP32)
  achieved = flops / median if flops else None
  return dict(
      benchmark=benchmark,
      method=config.method,
      config=config_name,
      backend=jax.default_backend(),
      device_kind=kind,
      devices=int(mesh.size),
      global_batch=int(batch_size),
      image_size=int(config.data.image_size),
      shot=int(config.data.shot),
      precision=str(config.train.precision),
      model={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
             for k, v in config.model.items()},
      compile_s=round(compile_s, 3),
      steps=len(times),
      step_s_median=median,
      step_s_min=min(times),
      step_s_max=max(times),
      episodes_per_s=int(batch_size) / median,
      peak_memory_bytes=peak_bytes,
      peak_memory_source=peak_what,
      flops_per_step=flops,
      achieved_flops_per_s=achieved,
      device_peak_flops=peak * mesh.size if peak else None,
      fraction_of_peak=(achieved / (peak * mesh.size)) if (achieved and peak) else None,
      device_peak_flops_fp32=peak32 * mesh.size if peak32 else None,
      fraction_of_peak_fp32=(achieved / (peak32 * mesh.size)) if (achieved and peak32) else None,
  )
