"""Random initialisation with one RNG kernel per shape, not one per parameter.

Why: a model's `init` draws every parameter with its own `jax.random` call. Inside one jitted
initialiser XLA emits, for each draw and for each `fold_in` / `split` deriving its key, a
separate threefry hash (about a hundred operations, unrolled) and the draw's transform
(uniform -> normal / truncated normal), and compiles each as its own CPU kernel: LLVM code
generation of ~500 kernels is what a cold DiffewS-demo init spends (328 leaves, 133 draws of 33
shapes, 326 fold_ins: 28 CPU seconds of compilation for a program that runs in 50 ms).

What `batch_random(fn)` does: it traces `fn` to a jaxpr (nested `jit` calls inlined, except
the jitted draw functions such as `jax.random.truncated_normal`, kept whole), drops what the
outputs do not need (the forward pass a Flax `init` runs), and evaluates it wave by wave:
every deterministic equation as soon as its inputs exist; the random ones (`random_bits`,
`random_fold_in`, `random_split`, `threefry2x32`, one-draw jitted functions) whose inputs exist
are held back and then evaluated together, one `lax.map` over the stacked keys per group of
equal function and input shapes (a loop body is one kernel; a vmapped draw would be fused
back into every per-leaf slice). Threefry is a counter-based hash, so the draws are the same
bits: under `jax.jit` the result equals `fn`'s bit for bit (tests/test_batched_rng.py; the
DiffewS demo's 328 leaves too). Run eagerly, a draw's scaling is no longer fused with it and
may differ from jitted `fn` by one float32 ulp, as eager `fn` itself does.

Measured (DiffewS demo, shared 2-core CPU): init compilation 28 -> 21 CPU seconds; what is
left are per-leaf kernels (slices, scales, zeros), cheap one by one, but ~450 of them, whose
LLVM code generation the trainer halves by compiling the init at -O1 on CPU
(`init_compiler_options`: 21.6 -> 11.5 CPU s, the same values bit for bit).

Groups are cut at `max_group_bytes` of output so that a stacked draw never needs much more
memory than the largest leaf; a jaxpr with side effects is evaluated as is (no reordering),
and a primitive the evaluator cannot handle falls back to the plain evaluation (a warning).
Use it inside `jax.jit` (the trainer's shard-first init: `fssjax.train.init_state`) or
eagerly; `fn` must be traceable (a pure `Method.init`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives as prims
import numpy as np

# Primitives whose calls are batched (all compute a threefry hash on CPU/GPU/TPU).
RANDOM_PRIMITIVES = frozenset(p for p in (prims.random_bits_p, prims.random_fold_in_p,
                                          prims.random_split_p, prims.threefry2x32_p))
MAX_GROUP_BYTES = 1 << 28  # 256 MiB of stacked output per batched call

# XLA compile options for a jitted init on CPU: LLVM at -O1 instead of the default -O2. An init
# runs once and takes milliseconds, but its few hundred small kernels (threefry loops, per-leaf
# slices and scales) cost tens of CPU seconds of LLVM code generation. Measured on the DiffewS
# demo's init (shared 2-core CPU, load ~11): 21.6 -> 11.5 CPU s of compilation, run time 0.14 ->
# 0.16 s, all 989 leaves of the state bit for bit the same (-O0 would save more but changes
# values: not used). tests/test_batched_rng.py checks the equality on a small model.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class _Node:
  __slots__ = ("prim", "params", "ctx", "ins", "n_out", "outs")

  def __init__(self, prim, params, ctx, ins, n_out):
    self.prim, self.params, self.ctx, self.ins, self.n_out = prim, params, ctx, ins, n_out
    self.outs = None


class _Const:
  __slots__ = ("val",)

  def __init__(self, val):
    self.val = val


def _flatten(jaxpr, consts, in_refs, nodes: list) -> list:
  """Appends the equations of `jaxpr` (nested jit calls inlined) to `nodes`; returns the refs
  of its outputs. A ref is a _Const, an input index (int) or a (node, output index) pair."""
  env: dict = {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = _Const(c)
  for v, r in zip(jaxpr.invars, in_refs):
    env[v] = r

  def read(v):
    return _Const(v.val) if isinstance(v, jcore.Literal) else env[v]

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive is prims.jit_p and not _is_draw(eqn.params["jaxpr"].jaxpr):
      closed = eqn.params["jaxpr"]
      outs = _flatten(closed.jaxpr, closed.consts, ins, nodes)
    else:
      node = _Node(eqn.primitive, eqn.params, eqn.ctx, ins, len(eqn.outvars))
      nodes.append(node)
      outs = [(node, i) for i in range(len(eqn.outvars))]
    for v, r in zip(eqn.outvars, outs):
      env[v] = r
  return [read(v) for v in jaxpr.outvars]


def _random_counts(jaxpr, counts=None) -> dict:
  counts = {} if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive in RANDOM_PRIMITIVES:
      counts[eqn.primitive] = counts.get(eqn.primitive, 0) + 1
    if eqn.primitive is prims.jit_p:
      _random_counts(eqn.params["jaxpr"].jaxpr, counts)
  return counts


def _is_draw(jaxpr) -> bool:
  """A jitted function making one draw from one key and transforming it (jax.random.normal,
  uniform, truncated_normal, ...): kept whole, so that its transform is batched too."""
  counts = _random_counts(jaxpr)
  return counts.get(prims.random_bits_p, 0) == 1 and len(counts) == 1


def _is_random(node) -> bool:
  return node.prim in RANDOM_PRIMITIVES or node.prim is prims.jit_p


def _has_effects(jaxpr) -> bool:
  return bool(jaxpr.effects)


def _live(nodes: list, out_refs: list) -> list:
  """The nodes the outputs depend on, in order (a model's forward pass in `init` is dropped)."""
  live = {id(r[0]) for r in out_refs if isinstance(r, tuple)}
  for node in reversed(nodes):
    if id(node) in live:
      live.update(id(r[0]) for r in node.ins if isinstance(r, tuple))
  return [n for n in nodes if id(n) in live]


def _value(ref, args):
  if isinstance(ref, _Const):
    return ref.val
  if isinstance(ref, int):
    return args[ref]
  node, i = ref
  return node.outs[i]


def _ready(ref) -> bool:
  return not isinstance(ref, tuple) or ref[0].outs is not None


def _bind(node: _Node, invals):
  params = node.prim.get_bind_params(node.params)  # as jax.core.eval_jaxpr binds
  with node.ctx.manager:
    out = node.prim.bind(*invals, **params)
  return list(out) if node.prim.multiple_results else [out]


def _aval_key(x) -> tuple:
  t = jax.typeof(x)
  return (tuple(t.shape), str(t.dtype))


def _out_bytes(node: _Node, invals) -> int:
  shapes = jax.eval_shape(lambda *xs: _bind(node, xs), *invals)
  return sum(int(np.prod(s.shape)) * _itemsize(s.dtype) for s in shapes)


def _itemsize(dtype) -> int:
  try:
    return np.dtype(dtype).itemsize
  except TypeError:  # a key dtype (two uint32 words for threefry)
    return 8


def _run_group(group: list, args, max_bytes: int) -> None:
  """Evaluates random nodes of one signature, stacked in chunks of at most `max_bytes`."""
  first = group[0]
  per = max(1, _out_bytes(first, [_value(r, args) for r in first.ins]))
  chunk = max(1, max_bytes // per)
  for s in range(0, len(group), chunk):
    part = group[s:s + chunk]
    if len(part) == 1:
      part[0].outs = _bind(part[0], [_value(r, args) for r in part[0].ins])
      continue
    stacked = [jnp.stack([_value(n.ins[i], args) for n in part]) for i in range(len(first.ins))]
    # A loop, not vmap: XLA would fuse a vmapped (elementwise) draw into each per-leaf slice
    # of its result and compile one kernel per leaf again; a loop body is compiled once.
    outs = jax.lax.map(lambda xs: tuple(_bind(first, xs)), tuple(stacked))
    for j, n in enumerate(part):
      n.outs = [o[j] for o in outs]


def eval_batched(closed_jaxpr, args, max_group_bytes: int = MAX_GROUP_BYTES) -> list:
  """The outputs of `closed_jaxpr` on `args`, random equations batched (module docstring)."""
  if _has_effects(closed_jaxpr.jaxpr):
    return jcore.jaxpr_as_fun(closed_jaxpr)(*args)
  nodes: list[_Node] = []
  out_refs = _flatten(closed_jaxpr.jaxpr, closed_jaxpr.consts, list(range(len(args))), nodes)
  pending = _live(nodes, out_refs)
  while pending:
    waiting, randoms = [], []
    for node in pending:
      if not all(_ready(r) for r in node.ins):
        waiting.append(node)
      elif _is_random(node):
        randoms.append(node)
        waiting.append(node)
      else:
        node.outs = _bind(node, [_value(r, args) for r in node.ins])
    groups: dict = {}
    for node in randoms:
      params = (id(node.params["jaxpr"]) if node.prim is prims.jit_p
                else repr(sorted(node.params.items())))
      sig = (node.prim, params,
             tuple(_aval_key(_value(r, args)) for r in node.ins))
      groups.setdefault(sig, []).append(node)
    for group in groups.values():
      _run_group(group, args, max_group_bytes)
    if not randoms and len(waiting) == len(pending):
      raise RuntimeError("batch_random: no equation can be evaluated (a cycle in the jaxpr?)")
    pending = [n for n in waiting if n.outs is None]
  return [_value(r, args) for r in out_refs]


def init_compiler_options(mesh: jax.sharding.Mesh | None = None) -> dict | None:
  """`INIT_COMPILER_OPTIONS` when `mesh` (default: the default backend) is on CPU, else None
  (the option only shortens CPU code generation; other backends compile as they do)."""
  platform = (mesh.devices.flat[0].platform if mesh is not None
              else jax.default_backend())
  return dict(INIT_COMPILER_OPTIONS) if platform == "cpu" else None


def batch_random(fn: Callable[..., Any], max_group_bytes: int = MAX_GROUP_BYTES
                 ) -> Callable[..., Any]:
  """`fn` with its random draws batched by shape: same outputs bit for bit, far fewer XLA
  kernels to compile (module docstring). `fn`'s arguments and outputs are pytrees of arrays."""

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    try:
      flat = eval_batched(closed, jax.tree.leaves(args), max_group_bytes)
    except Exception as e:  # pylint: disable=broad-except
      # A primitive this evaluator does not handle: the plain evaluation (same values, the
      # per-draw compile cost) rather than a failed run.
      logging.warning("batch_random(%s): batching failed (%s: %s); evaluating unbatched",
                      getattr(fn, "__qualname__", fn), type(e).__name__, e)
      flat = jcore.jaxpr_as_fun(closed)(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

  return wrapped
