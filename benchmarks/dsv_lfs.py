"""DSV-LFS: speed and memory of a train step and of one inference, printed as JSON lines.

  python benchmarks/dsv_lfs.py --size=demo          # the CPU demo's model (SmolLM2-135M
                                                    # shape, small SAM), batch 4
  python benchmarks/dsv_lfs.py --size=published     # SAM ViT-H (1024) + CLIP ViT-L/14-336 +
                                                    # a 7B LLaMA shape, bf16 (a GPU / TPU)
  python benchmarks/dsv_lfs.py --size=published --remat --batch=4 --fsdp=1
  python benchmarks/dsv_lfs.py --size=published --max_batch_search=64 [--remat]

Weights are random (`model.host_init` off for the published size: Flax's initialisers run
on the device, sharded over `fsdp`); the batch is random images and masks with the
conversation of one class (the published template and description lengths for 'published').
The train step is `fssjax.train.make_train_step` (the trainer's: sharding, donation, AdamW,
clip); inference is `method.predict` under `jax.jit`, one batch. Each JSON line: benchmark
('dsv_lfs_train_step' | 'dsv_lfs_predict' | 'dsv_lfs_max_batch'), size, backend, device kind
and count, batch, text length, precision, remat, compile seconds, median / min / max seconds,
episodes/s, XLA's FLOPs per call, achieved FLOP/s and the fraction of the device's bf16 peak
(`common.PEAK_FLOPS`), peak memory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_enum("size", "demo", ["demo", "published"], "Model size.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch (0: 4 demo, 2 published).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each LLM / SAM encoder layer.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_search", 0, "If > 0: the largest global batch "
                                  "(doubling from --batch, then bisection, up to this value) "
                                  "whose train step runs; one JSON line.")
_SKIP_PREDICT = flags.DEFINE_bool("skip_predict", False, "Only the train step.")

# LLaMA-2-7B / Vicuna-7B shape (LLaVA-1.5-7B's language model), vocabulary 32000 (+[SEM]).
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_config(size: str, batch: int, remat: bool, fsdp: int):
  """The config of `size` ('demo': configs/dsv_lfs_coco.py:demo without its SAM stage;
  'published': the published shapes, random weights)."""
  from configs import dsv_lfs_coco  # pylint: disable=import-outside-toplevel
  c = dsv_lfs_coco.get_config("demo" if size == "demo" else "")
  with c.unlocked():
    c.train.batch_size = batch
    c.train.grad_accum = 1
    c.train.fsdp = fsdp
    c.model.remat = remat
    if size == "demo":
      c.model.sam_pretrain = {}
      c.model.llm = ""
      from fssjax.nn import llama as nl  # pylint: disable=import-outside-toplevel
      from fssjax.priors.local_lm import smollm2_path  # pylint: disable=import-outside-toplevel
      from fssjax.weights import llama as wl  # pylint: disable=import-outside-toplevel
      cfg = wl.gguf_config(wl.read_gguf(smollm2_path()))
      c.model.llm_config = _hf_dict(nl, cfg)
      c.model.tokenizer = "smollm2"
    else:
      c.model.llava = ""
      c.model.llm_config = LLAMA_7B
      c.model.tokenizer = "smollm2"  # any tokenizer: only the sequence length matters
      c.model.host_init = False
      c.data.test_episodes = 1
  return c


def _hf_dict(nl, cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.rms_norm_eps,
              rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
              max_position_embeddings=cfg.max_position_embeddings)


def random_batch(method, batch: int, image_size: int, shot: int, seed: int = 0) -> dict:
  """Random images / masks in every view, and the conversation of one class per row."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  s = image_size
  out = dict(query_image=rng.normal(size=(batch, s, s, 3)).astype(np.float32),
             query_mask=rng.integers(0, 2, size=(batch, s, s)).astype(np.uint8),
             support_images=rng.normal(size=(batch, shot, s, s, 3)).astype(np.float32),
             support_masks=rng.integers(0, 2, size=(batch, shot, s, s)).astype(np.uint8),
             class_id=np.zeros((batch,), np.int32))
  for v in method.views():
    out[f"query_image@{v.name}"] = rng.normal(size=(batch, v.size, v.size, 3)).astype(
        np.float32)
    out[f"support_images@{v.name}"] = rng.normal(
        size=(batch, shot, v.size, v.size, 3)).astype(np.float32)
    out[f"query_size@{v.name}"] = np.full((batch, 2), v.size, np.int32)
    out[f"support_size@{v.name}"] = np.full((batch, shot, 2), v.size, np.int32)
  for t in method.texts():
    names = sorted(t.tokenizer.descriptions)
    ids = np.full((batch, t.max_length), t.tokenizer.pad_id, np.int32)
    mask = np.zeros((batch, t.max_length), np.uint8)
    for i in range(batch):
      e = t.tokenizer.encode(names[i % len(names)])[:t.max_length]
      ids[i, :len(e)], mask[i, :len(e)] = e, 1
    out[f"text@{t.name}"], out[f"text_mask@{t.name}"] = ids, mask
  return out


def build(config):
  """(mesh, method, state, frozen, step, lr, global batch, host batch)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fssjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from fssjax import train  # pylint: disable=import-outside-toplevel
  from fssjax.methods import get_method  # pylint: disable=import-outside-toplevel
  mesh = shd.mesh_from_config(config)
  method = get_method(config)
  host = random_batch(method, int(config.train.batch_size), int(config.data.image_size),
                      int(config.data.shot))
  setup = train.build_setup(config, method, mesh, host)
  state, frozen = train.init_state(setup)
  step = train.make_train_step(setup, 1)
  lr = jax.device_put(np.float32(setup.optimizer.base_lr), shd.replicated(mesh))
  return mesh, method, state, frozen, step, lr, shd.global_batch(host, mesh), host


def _record(name, config, mesh, batch, times, compile_s, flops, text_len) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  rec = common.timing_record(name, config, f"dsv_lfs:{_SIZE.value}", mesh, batch, times,
                             compile_s, flops)
  rec.update(size=_SIZE.value, remat=bool(config.model.remat), text_length=text_len,
             fsdp=int(config.train.fsdp), devices=jax.device_count())
  return rec


def run_once(config) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  mesh, method, state, frozen, step, lr, batch, host = build(config)
  text_len = int(host["text@dsv"].shape[1]) if "text@dsv" in host else 0
  b = int(config.train.batch_size)
  out = []
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    flops = common.flops_of(compiled)
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, frozen, batch, lr)
    jax.block_until_ready(state)
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, metrics = compiled(state, frozen, batch, lr)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t)
    rec = _record("dsv_lfs_train_step", config, mesh, b, times, compile_s, flops, text_len)
    rec["loss"] = float(metrics["loss"])
    out.append(rec)
    print(json.dumps(rec), flush=True)
    if not _SKIP_PREDICT.value:
      predict = jax.jit(method.predict)
      t0 = time.perf_counter()
      compiled_p = predict.lower(state["params"], frozen, batch).compile()
      compile_p = time.perf_counter() - t0
      flops_p = common.flops_of(compiled_p)
      jax.block_until_ready(compiled_p(state["params"], frozen, batch))
      times = []
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        jax.block_until_ready(compiled_p(state["params"], frozen, batch))
        times.append(time.perf_counter() - t)
      rec = _record("dsv_lfs_predict", config, mesh, b, times, compile_p, flops_p, text_len)
      out.append(rec)
      print(json.dumps(rec), flush=True)
  return out


def _fits(batch: int) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  config = make_config(_SIZE.value, batch, _REMAT.value, _FSDP.value)
  try:
    mesh, _, state, frozen, step, lr, gb, _ = build(config)
    with jax.set_mesh(mesh):
      state, metrics = step(state, frozen, gb, lr)
      jax.block_until_ready(metrics["loss"])
    return True
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")):
      return False
    raise
  finally:
    jax.clear_caches()


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  batch = _BATCH.value or (4 if _SIZE.value == "demo" else 2)
  if _MAX_BATCH.value:
    lo, hi, tried = 0, batch, {}
    while hi <= _MAX_BATCH.value:
      tried[hi] = _fits(hi)
      if not tried[hi]:
        break
      lo, hi = hi, hi * 2
    hi = min(hi, _MAX_BATCH.value + 1)
    while hi - lo > 1 and lo:
      mid = (lo + hi) // 2
      tried[mid] = _fits(mid)
      lo, hi = (mid, hi) if tried[mid] else (lo, mid)
    print(json.dumps(dict(benchmark="dsv_lfs_max_batch", size=_SIZE.value,
                          remat=_REMAT.value, fsdp=_FSDP.value,
                          device_kind=jax.devices()[0].device_kind,
                          devices=jax.device_count(), largest_batch=lo,
                          tried={str(k): v for k, v in sorted(tried.items())})), flush=True)
    return
  run_once(make_config(_SIZE.value, batch, _REMAT.value, _FSDP.value))


if __name__ == "__main__":
  app.run(main)
