"""Speed and memory of one method's jitted inference (`method.predict`), as JSON lines.

  python benchmarks/predict_step.py --config=configs/diffews_coco.py[:arg] \
      [--config.eval.batch_size=8 --config.data.image_size=512] [--steps=10 --warmup=2]

The function timed is the one the evaluator calls per batch: `method.predict(params, frozen,
batch)` on a fixed random batch of `config.eval.batch_size` episodes with `config.data.shot`
supports each (for DiffewS: VAE encode of query, supports and support masks, the support pass,
the query pass with the K/V bank, VAE decode and the threshold rule), jitted with the batch
sharded over the mesh's data axis. Parameters are the method's fresh init (random weights
unless the config names weight files). Output fields as in benchmarks/train_step.py, with
`benchmark: "predict_step"` and `global_batch` = episodes per call.
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
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.mark_flag_as_required("config")


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from fssjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax.methods import get_method  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  mesh = shd.mesh_from_config(config)
  method = get_method(config)
  with config.unlocked():
    config.train.batch_size = int(config.eval.batch_size)  # random_batch's batch size
  batch_np = common.random_batch(config)
  setup = train.build_setup(config, method, mesh, batch_np)
  state, frozen = train.init_state(setup)
  params = state["params"]
  batch = shd.global_batch(batch_np, mesh)
  predict = jax.jit(method.predict)

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = predict.lower(params, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = common.flops_of(compiled)
    for _ in range(_WARMUP.value):
      out = compiled(params, frozen, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      jax.block_until_ready(compiled(params, frozen, batch))
      times.append(time.perf_counter() - t)
  record = common.timing_record("predict_step", config, flags.FLAGS["config"].config_filename,
                                mesh, int(config.eval.batch_size), times, compile_s, flops)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
