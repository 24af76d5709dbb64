"""LLMFormer: speed of one train step and of one inference, printed as JSON lines.

  python benchmarks/llmformer.py --size=demo        # the CPU demo's model, 128 x 128, batch 8
  python benchmarks/llmformer.py --size=published   # ResNet-50 + Mask2Former's published
                                                    # decoder (256 wide, 100 queries, 9 layers,
                                                    # 6 deformable layers), 640 x 640, batch 2
  python benchmarks/llmformer.py --size=published --attentions=none   # the plain decoder

Weights are random; the batch is random images with random priors (the demo's padding:
6 objects, 24 attributes, 16 relations; published-like: 16 / 64 / 64) and text embeddings
of K random class names (60 demo, 171 COCO-Stuff); targets: `max_targets` random masks.
The train step is `fssjax.methods.llmformer.make_train_step` (the config's optimiser from
`fssjax.optim`, Hungarian matching
through a host callback, auxiliary losses on every layer); inference is
`LLMFormer.dense_logits` under `jax.jit`. Each JSON line: benchmark
('llmformer_train_step' | 'llmformer_predict'), size, attentions, backend, device kind, batch,
image size, compile seconds, median / min / max seconds, images/s, XLA's FLOPs per call,
peak memory.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_enum("size", "demo", ["demo", "published"], "Model size.")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch (0: 8 demo, 2 published).")
_ATTN = flags.DEFINE_string("attentions", "semantic+scaled+relation",
                            "'+'-joined attentions or 'none'.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls.")


class _RandomText:
  """Stand-in text encoder (random unit vectors; speed does not depend on the words)."""

  dim = 384

  def encode(self, texts):
    import numpy as np  # pylint: disable=import-outside-toplevel
    x = np.random.default_rng(len(texts)).standard_normal((len(texts), self.dim))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_config(size: str, batch: int, attentions: str):
  from configs import llmformer_cocostuff as cfgmod  # pylint: disable=import-outside-toplevel
  arg = f"attentions={attentions}" + (",demo=True" if size == "demo" else "")
  c = cfgmod.get_config(arg)
  if size == "demo":
    on = cfgmod._attentions(attentions)  # pylint: disable=protected-access
    for k, v in on.items():
      c.model[k] = v
  c.train.batch_size = batch or (8 if size == "demo" else 2)
  return c


def _time(fn, *args):
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return compiled, compile_s, times


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fssjax import optim  # pylint: disable=import-outside-toplevel
  from fssjax.methods import llmformer as L  # pylint: disable=import-outside-toplevel
  from fssjax.methods.base import partition  # pylint: disable=import-outside-toplevel
  from fssjax.nn import llmformer as nl  # pylint: disable=import-outside-toplevel
  c = make_config(_SIZE.value, _BATCH.value, _ATTN.value)
  method = L.LLMFormer(c, text_encoder=_RandomText())
  o = method.opts
  b, s = int(c.train.batch_size), int(c.data.image_size)
  k = 60 if _SIZE.value == "demo" else 171
  rng = np.random.default_rng(0)
  n, a, r, d = o["max_objects"], o["max_attributes"], o["max_relations"], 384
  batch = dict(image=rng.standard_normal((b, s, s, 3)).astype(np.float32))
  pri = nl.Priors(rng.standard_normal((b, n, d)).astype(np.float32), np.ones((b, n), bool),
                  rng.standard_normal((b, a, d)).astype(np.float32),
                  rng.integers(0, n, (b, a)).astype(np.int32), np.ones((b, a), bool),
                  rng.standard_normal((b, r, d)).astype(np.float32),
                  rng.integers(0, n, (b, r, 2)).astype(np.int32), np.ones((b, r), bool))
  batch.update(zip(nl.PRIOR_KEYS, pri))
  t = int(o["max_targets"])
  batch["target_classes"] = np.tile(np.arange(t, dtype=np.int32) % k, (b, 1))
  batch["target_masks"] = (rng.random((b, t, s, s)) > 0.5).astype(np.float32)
  batch["class_embeddings"] = method.class_embeddings([f"class {i}" for i in range(k)])
  params, frozen = partition(jax.jit(method.init)(jax.random.PRNGKey(0), batch),
                             method.trainable_patterns())
  tx = optim.make_optimizer(c).tx  # the generic trainer's optimiser (lr profile, peak 1)
  opt = tx.init(params)
  step = L.make_train_step(method, tx)
  key = jax.random.PRNGKey(1)

  def record(name, compile_s, times, compiled):
    median = statistics.median(times)
    peak_bytes, peak_what = common.peak_memory(jax.devices()[:1])
    rec = dict(benchmark=name, method="llmformer", size=_SIZE.value, attentions=_ATTN.value,
               backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
               global_batch=b, image_size=s, num_classes=k, compile_s=round(compile_s, 3),
               steps=len(times), step_s_median=median, step_s_min=min(times),
               step_s_max=max(times), images_per_s=b / median,
               flops_per_step=common.flops_of(compiled), peak_memory_bytes=peak_bytes,
               peak_memory_source=peak_what)
    print(json.dumps(rec), flush=True)

  # Train step (not donated here: the same state is reused for every timed call).
  def train_fn(p, op, f, bt, kk):
    return step.__wrapped__(p, op, f, bt, kk) if hasattr(step, "__wrapped__") else step(
        p, op, f, bt, kk)

  compiled, cs, times = _time(train_fn, params, opt, frozen, batch, key)
  record("llmformer_train_step", cs, times, compiled)
  text = batch["class_embeddings"]

  def predict(p, f, image, pr):
    return method.dense_logits(p, f, image, text, nl.Priors(*pr))

  compiled, cs, times = _time(predict, params, frozen, batch["image"], tuple(pri))
  record("llmformer_predict", cs, times, compiled)


if __name__ == "__main__":
  app.run(main)
