"""XLA compile options against start-up: compile time of a demo's train step and init, and
the steady-state step time, for several `compiler_options` sets (persistent cache off).

  python benchmarks/startup_compile.py --config=configs/hsnet_coco.py:demo \\
      --options='default;xla_backend_optimization_level=1' --steps=20

For each option set (`;`-separated; each `key=value,key=value`; `default` = none): the train
step of `fssjax.train.make_train_step` is lowered once and compiled with those options (wall
and process CPU seconds), then run `--steps` times after 2 warm-up steps on the demo's own
batches (median seconds per step). With `--init` the shard-first init of
`fssjax.train.init_state` is compiled with each option set too, and its outputs are compared
bit for bit with the default-options init (the parameters a run starts from must not change).
One JSON line per option set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _parse_options(text: str) -> list[tuple[str, dict]]:
  out = []
  for part in text.split(";"):
    part = part.strip()
    if not part or part == "default":
      out.append(("default", {}))
      continue
    opts = {}
    for kv in part.split(","):
      k, v = kv.split("=", 1)
      v = v.strip()
      opts[k.strip()] = (True if v.lower() == "true" else False if v.lower() == "false"
                         else int(v) if v.lstrip("-").isdigit() else v)
    out.append((part, opts))
  return out


def _timed(fn):
  w, c = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--options", default="default")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--init", action="store_true")
  parser.add_argument("--no_step", action="store_true")
  args = parser.parse_args()

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  from fssjax import batched_rng  # pylint: disable=g-import-not-at-top
  from fssjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax.main import _load_config_module  # pylint: disable=g-import-not-at-top
  from fssjax.methods import base, get_method  # pylint: disable=g-import-not-at-top

  spec = args.config
  config = _load_config_module(spec).get_config(spec.split(":", 1)[1] if ":" in spec else None)
  mesh = shd.mesh_from_config(config)
  method = get_method(config)
  loader = train.train_loader(config, method, 0)
  setup = train.build_setup(config, method, mesh, loader.batch_at(0))
  options = _parse_options(args.options)

  # Init: the jitted create of init_state, per option set; values compared bit for bit.
  method_init = batched_rng.batch_random(method.init)
  tx, patterns = setup.optimizer.tx, setup.patterns

  def create(init_key, train_key, batch):
    params, frozen = base.partition(method_init(init_key, batch), patterns)
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                 rng=train_key)
    return state, frozen

  init_args = (setup.init_key, setup.train_key, setup.init_batch)
  state = frozen = None
  reference = None
  with jax.set_mesh(mesh):
    jitted = jax.jit(create, out_shardings=(setup.state_shardings, setup.frozen_shardings))
    if args.init:
      lowered, lw, lc = _timed(lambda: jitted.lower(*init_args))
      print(json.dumps(dict(what="init lower", wall=round(lw, 2), cpu=round(lc, 2))), flush=True)
      for name, opts in options:
        compiled, w, c = _timed(lambda: lowered.compile(compiler_options=opts or None))
        out, rw, _ = _timed(lambda: jax.block_until_ready(compiled(*init_args)))
        leaves = [np.asarray(x) for x in jax.tree.leaves(out)
                  if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
        if reference is None:
          reference = leaves
        same = all(a.dtype == b.dtype and a.shape == b.shape and
                   np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
                   for a, b in zip(leaves, reference))
        print(json.dumps(dict(what="init", options=name, compile_wall=round(w, 2),
                              compile_cpu=round(c, 2), run_wall=round(rw, 3),
                              bit_identical_to_first=same, leaves=len(leaves),
                              load=list(os.getloadavg()))), flush=True)
        state, frozen = out
    if args.no_step:
      return
    if state is None:
      state, frozen = jax.block_until_ready(jitted(*init_args))
    step = train.make_train_step(setup, int(config.train.grad_accum))
    batch0 = shd.global_batch(loader.batch_at(1), mesh)
    lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
    lowered, lw, lc = _timed(lambda: step.lower(setup.abstract_state, setup.abstract_frozen,
                                                batch0, lr))
    print(json.dumps(dict(what="step lower", wall=round(lw, 2), cpu=round(lc, 2))), flush=True)
    batches = [shd.global_batch(loader.batch_at(i), mesh) for i in range(1, 5)]
    first_losses = None
    for name, opts in options:
      compiled, w, c = _timed(lambda: lowered.compile(compiler_options=opts or None))
      state, frozen = jitted(*init_args)  # every option set starts from the same state
      times, losses = [], []
      for i in range(args.steps + 2):
        t = time.perf_counter()
        state, metrics = compiled(state, frozen, batches[i % len(batches)], lr)
        losses.append(float(jax.block_until_ready(metrics["loss"])))
        times.append(time.perf_counter() - t)
      first_losses = losses if first_losses is None else first_losses
      print(json.dumps(dict(what="step", options=name, compile_wall=round(w, 2),
                            compile_cpu=round(c, 2),
                            step_median=round(statistics.median(times[2:]), 4),
                            step_min=round(min(times[2:]), 4),
                            losses_identical_to_first=losses == first_losses,
                            max_loss_diff=max(abs(a - b) for a, b in zip(losses, first_losses)),
                            load=list(os.getloadavg()))), flush=True)


if __name__ == "__main__":
  main()
