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


_SHARD_FIRST = textwrap.dedent("""
    import json, os, shutil, sys
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fssjax import configlib, sharding as shd
    from fssjax.methods import base, get_method
    assert jax.device_count() == 8
    mesh = shd.make_mesh(fsdp=8)

    def every_leaf(shape, size):  # shard every leaf with a dimension divisible by 8
      return shd.fsdp_spec(shape, size, min_size=0)

    def shard_first(method, batch):
      # Shapes, then one jit with out_shardings: no leaf is ever built whole on the host.
      key = jax.random.PRNGKey(0)
      abstract = jax.eval_shape(method.init, key, batch)
      shardings = shd.param_shardings(abstract, mesh, every_leaf)
      with jax.set_mesh(mesh):
        tree = jax.jit(method.init, out_shardings=shardings)(key, batch)
      return tree, shardings

    def sharded_leaves(tree):
      return [p for p, x in base.leaf_paths(tree).items()
              if not x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8]

    def batch_of(size):
      return {"query_image": np.zeros((1, size, size, 3), np.float32),
              "support_images": np.zeros((1, 1, size, size, 3), np.float32),
              "support_masks": np.zeros((1, 1, size, size), np.uint8)}

    # HSNet (resnet_tiny): init traced shard-first.
    c = configlib.base_config(); c.method = "hsnet"; c.data.image_size = 32
    c.model.backbone = "resnet_tiny"
    hs = get_method(c)
    tree, _ = shard_first(hs, batch_of(32))
    assert sharded_leaves(tree), "no HSNet leaf was sharded"
    host = base.initialize(hs, jax.random.PRNGKey(0), batch_of(32))
    for a, b in zip(jax.tree.leaves(base.merge(*host)), jax.tree.leaves(tree)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # DiffewS on the tiny SD 1.5 fixture: init shard-first, then the published weights loaded
    # tensor by tensor into the sharded trees.
    sd = sys.argv[1]
    c = configlib.base_config(); c.method = "diffews"; c.model.sd_path = sd
    dm = get_method(c)
    tree, shardings = shard_first(dm, batch_of(16))
    params, frozen = base.partition(tree, dm.trainable_patterns())
    params, frozen = dm.load_pretrained(params, frozen)
    loaded = base.merge(params, frozen)
    for path, x in base.leaf_paths(loaded).items():
      want = base.leaf_paths(shardings)[path]
      assert x.sharding == want, (path, x.sharding, want)
    assert len(sharded_leaves(loaded)) > 10, sharded_leaves(loaded)
    from fssjax.weights import diffusers as W
    vae = W.read_state_dict(os.path.join(sd, "vae"), "diffusion_pytorch_model")
    np.testing.assert_array_equal(np.asarray(loaded["vae"]["encoder"]["conv_in"]["kernel"]),
                                  vae["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
    raw = W.read_state_dict(os.path.join(sd, "unet"), "diffusion_pytorch_model")
    np.testing.assert_array_equal(np.asarray(loaded["unet"]["conv_in"]["kernel"]),
                                  raw["conv_in.weight"].transpose(2, 3, 1, 0))
    print("OK")
""")


def test_init_shard_first_and_weights_into_a_sharded_tree_on_eight_devices():
  """Both methods' init traced with out_shardings over 8 devices (leaves sharded, values equal
  to the single-device init); Stable Diffusion weights placed into the sharded tree."""
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers",
                         "sd15_tiny")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARD_FIRST, fixture], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("OK")
