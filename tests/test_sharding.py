"""Tests of fssjax.sharding: mesh, batch placement, FSDP rule, multi-host detection."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fssjax import sharding as shd


def test_distributed_reason_rules():
  assert shd.distributed_reason({}) is None
  assert shd.distributed_reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
  assert "Slurm" in shd.distributed_reason(slurm)
  assert shd.distributed_reason(dict(slurm, SLURM_NTASKS="1")) is None
  # sbatch without srun: no step node list, so no multi-process run.
  assert shd.distributed_reason({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None
  assert shd.distributed_reason({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"})
  assert shd.distributed_reason({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert shd.distributed_reason({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert shd.distributed_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert shd.distributed_reason({"FSSJAX_DISTRIBUTED": "1"}) == "FSSJAX_DISTRIBUTED=1"
  assert shd.distributed_reason(dict(slurm, FSSJAX_DISTRIBUTED="0")) is None
  assert shd.initialize_distributed({}) is False


def test_mesh_and_global_batch_one_device():
  mesh = shd.make_mesh()
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert shd.batch_shards(mesh) == jax.device_count()
  local = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "y": np.arange(4),
           "name": "ignored", "scalar": np.float32(1.0)}
  batch = shd.global_batch(local, mesh)
  assert sorted(batch) == ["x", "y"]
  assert batch["x"].sharding == shd.data_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide"):
    shd.make_mesh(fsdp=3, devices=1)


def test_fsdp_rule():
  assert shd.fsdp_spec((1024, 512), 1) == P()
  assert shd.fsdp_spec((8, 8), 4) == P()  # small: replicated
  assert shd.fsdp_spec((1024, 512), 4) == P("fsdp", None)
  assert shd.fsdp_spec((3, 3, 256, 512), 4, min_size=1) == P(None, None, None, "fsdp")
  assert shd.fsdp_spec((1001, 999), 4, min_size=1) == P()  # nothing divisible


_EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from fssjax import sharding as shd
    assert jax.device_count() == 8
    mesh = shd.make_mesh(fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}, mesh.shape
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    x = shd.global_batch(local, mesh)["x"]
    # every device holds 2 distinct rows of the 16 (batch split over data x fsdp)
    rows = sorted(int(s.data[0, 0]) // 3 for s in x.addressable_shards)
    assert rows == list(range(0, 16, 2)), rows
    assert all(s.data.shape == (2, 3) for s in x.addressable_shards)
    params = {"big": jax.ShapeDtypeStruct((512, 1024), jnp.float32),
              "small": jax.ShapeDtypeStruct((4,), jnp.float32)}
    sh = shd.param_shardings(params, mesh)
    w = jax.jit(lambda: jnp.ones((512, 1024)), out_shardings=sh["big"])()
    assert w.addressable_shards[0].data.shape == (512, 512), w.addressable_shards[0].data.shape
    assert sh["small"].is_fully_replicated
    try:
      shd.global_batch({"x": np.zeros((12, 3), np.float32)}, mesh)
    except ValueError as e:
      assert "does not split over this process's 8 devices" in str(e), e
    else:
      raise AssertionError("no error")
    print("OK")
""")


def test_eight_devices_batch_and_fsdp():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("OK")
