"""fssjax.batched_rng: a model's init with its random draws batched by shape gives the same
values bit for bit, with one draw per shape instead of one per parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fssjax import batched_rng


class _Tiny(nn.Module):
  """Convs and dense layers of repeated shapes (as in a UNet), a derived leaf, LayerNorm."""

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.Conv(8, (3, 3), name=f"conv{i}")(x)
      x = nn.LayerNorm(name=f"norm{i}")(x)
    y = nn.Dense(8, name="dense_a")(x) + nn.Dense(8, name="dense_b")(x)
    return nn.Dense(4, kernel_init=nn.initializers.normal(0.02), name="head")(y)


def _init(key, x):
  variables = _Tiny().init(key, x)
  # A leaf computed from another one (as DiffewS's support conv from conv_in).
  variables["params"]["derived"] = variables["params"]["conv0"]["kernel"] * 0.5
  return variables


def _random_bits_calls(closed) -> int:
  """random_bits equations at any depth of nested jit calls (each one a kernel in XLA)."""
  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "random_bits":
        n += 1
      if "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "jaxpr"):
        n += walk(eqn.params["jaxpr"].jaxpr)
      elif "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "eqns"):
        n += walk(eqn.params["jaxpr"])
    return n
  return walk(closed.jaxpr)


def test_same_values_bit_for_bit_under_jit():
  key, x = jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 4))
  want = jax.jit(_init)(key, x)
  got = jax.jit(batched_rng.batch_random(_init))(key, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_draw_per_shape_instead_of_one_per_parameter():
  key, x = jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4))
  before = _random_bits_calls(jax.make_jaxpr(_init)(key, x))
  after = _random_bits_calls(jax.make_jaxpr(batched_rng.batch_random(_init))(key, x))
  # 3 convs (3x3x4x8, then 2 x 3x3x8x8) + 2 dense 8x8 + head 8x4 = 6 draws of 4 shapes.
  assert before == 6
  assert after == 4


def test_groups_are_cut_at_max_group_bytes():
  key, x = jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 4))
  small = batched_rng.batch_random(_init, max_group_bytes=1)  # every draw alone
  for a, b in zip(jax.tree.leaves(jax.jit(small)(key, x)),
                  jax.tree.leaves(jax.jit(_init)(key, x))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _random_bits_calls(jax.make_jaxpr(small)(key, x)) == 6


class _Initialisers(nn.Module):
  """Every initialiser family the methods draw from (lecun / he / xavier, truncated, uniform,
  plain normal) on shapes that repeat, as in a UNet."""

  @nn.compact
  def __call__(self, x):
    inits = [nn.initializers.lecun_normal(), nn.initializers.he_normal(),
             nn.initializers.xavier_uniform(), nn.initializers.truncated_normal(0.02),
             nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
             nn.initializers.normal(0.02)]
    for i, init in enumerate(inits):
      x = nn.Conv(8, (3, 3), kernel_init=init, name=f"conv{i}")(x)
      x = nn.Dense(8, kernel_init=init, bias_init=nn.initializers.normal(0.1),
                   name=f"dense{i}")(x)
    return x


def test_init_compiler_options_keep_the_values():
  # The trainer compiles its init with INIT_COMPILER_OPTIONS on CPU (LLVM -O1, for start-up
  # time): the parameters must be those of the default compilation, bit for bit.
  options = batched_rng.init_compiler_options()
  assert options == (batched_rng.INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu"
                     else None)
  key, x = jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 4))
  fn = batched_rng.batch_random(_Initialisers().init)
  want = jax.jit(fn)(key, x)
  got = jax.jit(fn, compiler_options=options)(key, x)
  leaves = jax.tree.leaves(want)
  assert len(leaves) == 24
  for a, b in zip(jax.tree.leaves(got), leaves):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
