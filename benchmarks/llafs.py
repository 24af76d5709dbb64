"""Training and generation speed of LLaFS (`fssjax.methods.llafs`), as JSON lines.

  python benchmarks/llafs.py [--config=configs/llafs_coco.py:demo] [--batch=4]
      [--eval_batch=50] [--repeats=3]

Default: the offline demo's model (SmolLM2-135M-Instruct under LoRA, the small ResNet, the
demo's Q-Former, 128 x 128, 8-point polygons on a 10 x 10 grid) on pseudo-samples
(`fssjax.data.pseudo_samples`, the shapes of a training batch). Two phases, each after one
untimed compile call:
  train:    one jitted Adam step of `method.loss` (teacher-forced answer + refinement loss;
            the host callbacks that build the token layout and rasterise the teacher-forced
            answer included) on `batch` episodes: episodes / s and trained sequence tokens / s;
  generate: `method.predict` on `eval_batch` episodes (prompt, prefill with the visual tokens
            spliced, greedy KV-cache decoding of at most `max_new_tokens`, parse, rasterise,
            refine; the coarse-mask memo cleared before each call): generated tokens / s.
One JSON line per phase: benchmark, phase, config, backend, device_kind, batch,
seconds_median/min/max over `repeats`, per-second rates, compile_s, peak_memory_bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = flags.DEFINE_string("config", "configs/llafs_coco.py:demo", "config file:argument")
_BATCH = flags.DEFINE_integer("batch", 4, "training episodes per step")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 50, "episodes per generation call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per phase")


def _load_config(spec: str):
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  if arg == "demo":
    arg = "demo=True"
  return mod.get_config(arg or None)


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from fssjax.methods import base, get_method, llafs  # pylint: disable=import-outside-toplevel

  config = _load_config(_CONFIG.value)
  with config.model.ignore_type():
    config.model.stages = {}  # the stages train; this script only times
  method = get_method(config)

  def batch_of(n, seed):
    b = llafs.pseudo_batch(method, 5, 10, n, seed)
    return {k: jnp.asarray(v) for k, v in b.items()
            if not k.startswith("llafs/") and k != "difficulty"}

  train_batch = batch_of(_BATCH.value, 0)
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), train_batch)
  opt = optax.adam(1e-4)
  state = opt.init(params)

  @jax.jit
  def step(p, s, frozen, batch, rng):
    (_, aux), g = jax.value_and_grad(method.loss, has_aux=True)(p, frozen, batch, rng)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, aux

  predict = jax.jit(method.predict)
  eval_batch = batch_of(_EVAL_BATCH.value, 1)
  seq_tokens = int(method.opts["max_prompt_tokens"]) + int(method.opts["max_answer_tokens"])
  device = jax.devices()[0]
  records = []

  def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t, out

  compile_s, (params, state, _) = timed(lambda: step(params, state, frozen, train_batch,
                                                     jax.random.PRNGKey(0)))
  times = []
  for i in range(_REPEATS.value):
    dt, (params, state, _) = timed(lambda i=i: step(params, state, frozen, train_batch,
                                                    jax.random.PRNGKey(i + 1)))
    times.append(dt)
  med = statistics.median(times)
  records.append(dict(phase="train", batch=_BATCH.value, compile_s=compile_s,
                      seconds_median=med, seconds_min=min(times), seconds_max=max(times),
                      episodes_per_s=_BATCH.value / med,
                      sequence_tokens_per_s=_BATCH.value * seq_tokens / med))

  llafs._MEMO.clear()  # pylint: disable=protected-access
  compile_s, _ = timed(lambda: predict(params, frozen, eval_batch))
  times, tokens = [], []
  for _ in range(_REPEATS.value):
    llafs._MEMO.clear()  # pylint: disable=protected-access
    method.reset_generation_stats()
    dt, _ = timed(lambda: predict(params, frozen, eval_batch))
    times.append(dt)
    tokens.append(method.generation_stats()["new_tokens"])
  med = statistics.median(times)
  records.append(dict(phase="generate", batch=_EVAL_BATCH.value, compile_s=compile_s,
                      seconds_median=med, seconds_min=min(times), seconds_max=max(times),
                      new_tokens=int(statistics.median(tokens)),
                      generated_tokens_per_s=statistics.median(tokens) / med,
                      episodes_per_s=_EVAL_BATCH.value / med))
  peak_bytes, peak_what = common.peak_memory(jax.devices())
  for r in records:
    r.update(benchmark="llafs", config=_CONFIG.value, backend=jax.default_backend(),
             device_kind=device.device_kind, peak_memory_bytes=peak_bytes,
             peak_memory_source=peak_what)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  app.run(main)
