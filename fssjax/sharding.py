"""Device mesh, shardings and multi-host set-up.

One mesh for every method, with a `data` axis (batch parallelism) and an optional `fsdp` axis
(parameters sharded along their largest divisible dimension, for models that do not fit
replicated). The batch is split over both axes (`P(('data', 'fsdp'))`), so every device
sees a different slice of the global batch; with `fsdp = 1` (the default) parameters are
replicated and the program is plain data parallelism.

Multi-host rule (`initialize_distributed`): `jax.distributed.initialize()` is called when the
environment describes a run with more than one process:

  * `FSSJAX_DISTRIBUTED=1` forces it, `FSSJAX_DISTRIBUTED=0` forbids it (overrides the rest);
  * `JAX_COORDINATOR_ADDRESS` is set (then `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` give the
    process count and index, unless a cluster below provides them);
  * Slurm (`srun`): `SLURM_JOB_ID`, `SLURM_STEP_NODELIST` present and `SLURM_NTASKS` > 1;
  * Open MPI (`mpirun`): `OMPI_MCA_orte_hnp_uri` present and `OMPI_COMM_WORLD_SIZE` > 1;
  * Cloud TPU / GKE multi-host: `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` lists more
    than one host, or `MEGASCALE_COORDINATOR_ADDRESS` is set (multi-slice).

Everything else (one process, any number of local devices) runs without it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The batch dimension is split over every mesh axis.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def distributed_reason(environ: Mapping[str, str] | None = None) -> str | None:
  """Why this process should join a multi-process run, or None (see the module docstring)."""
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1

  forced = env.get("FSSJAX_DISTRIBUTED", "").strip().lower()
  if forced in ("0", "false", "no"):
    return None
  if forced in ("1", "true", "yes"):
    return "FSSJAX_DISTRIBUTED=1"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST")) and count("SLURM_NTASKS") > 1:
    return f"Slurm job with SLURM_NTASKS={env['SLURM_NTASKS']}"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "multi-host TPU (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES)"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
  return None


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when the environment asks for it.

  Must run before anything touches a jax device. Returns whether it initialised.
  """
  env = os.environ if environ is None else environ
  reason = distributed_reason(env)
  if reason is None:
    return False
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  logging.info("Initialising jax.distributed (%s) with %s", reason, kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def make_mesh(fsdp: int = 1, devices: int | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp') mesh over all (or the first `devices`) devices.

  Args:
    fsdp: size of the parameter-sharding axis; must divide the device count.
    devices: number of devices to use (default: all).
  """
  n = jax.device_count() if devices is None else devices
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"Mesh: fsdp={fsdp} must be >= 1 and divide the device count {n}")
  kwargs = {}
  if devices is not None:
    kwargs["devices"] = jax.devices()[:devices]
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, **kwargs)


def mesh_from_config(config) -> jax.sharding.Mesh:
  """The mesh for a run: `config.train.fsdp` (default 1) sets the fsdp axis size."""
  return make_mesh(fsdp=int(config.train.get("fsdp", 1)))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading (batch) dimension split over the whole mesh."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**18) -> P:
  """Partition spec of one parameter under the FSDP rule.

  Arrays with at least `min_size` elements are split over the `fsdp` axis along their largest
  dimension divisible by `fsdp_size` (ties: the last such dimension); everything else is
  replicated. With `fsdp_size == 1` everything is replicated.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def param_shardings(tree: PyTree, mesh: jax.sharding.Mesh,
                    rule: Callable[[tuple[int, ...], int], P] | None = None) -> PyTree:
  """NamedShardings for a (possibly abstract) parameter tree.

  Args:
    tree: arrays or `jax.ShapeDtypeStruct`s.
    mesh: the run's mesh.
    rule: `(shape, fsdp_size) -> PartitionSpec`; default `fsdp_spec` (replicated when the
      mesh has no fsdp axis or it has size 1).
  """
  rule = rule or fsdp_spec
  size = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, rule(tuple(x.shape), size)), tree)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct`s of `abstract` carrying `shardings` (restore targets)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def global_batch(local: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Turns this process's numpy batch into global jax.Arrays sharded over the batch axis.

  Every process passes its own slice (`local[k].shape[0]` = global batch / process count);
  the result has the global batch size. Non-array entries are dropped.

  Raises:
    ValueError: if the local batch does not split evenly over this process's devices.
  """
  sharding = data_sharding(mesh)
  local_devices = len(sharding.addressable_devices)
  out = {}
  for key, value in local.items():
    if not isinstance(value, (np.ndarray, jax.Array)) or np.ndim(value) == 0:
      continue
    if value.shape[0] % local_devices:
      raise ValueError(
          f"Batch entry {key!r} has local batch size {value.shape[0]}, which does not split "
          f"over this process's {local_devices} devices; choose a batch size divisible by "
          f"{local_devices * jax.process_count()}")
    global_shape = (value.shape[0] * jax.process_count(),) + tuple(value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), global_shape)
  return out
