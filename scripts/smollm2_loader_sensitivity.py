"""How far SmolLM2's perplexity moves when one GGUF loading step is wrong.

  python scripts/smollm2_loader_sensitivity.py

Prints, for the paragraph of tests/test_smollm2.py, the perplexity of its first copy and of
an exact repetition (the paragraph twice; the second copy's tokens only), plus the greedy
answer to "What is the capital of France?", for:
  correct            fssjax.weights.llama as shipped;
  no-unpermute       llama.cpp's q/k rotary permutation left in place;
  q4_1-no-offset     Q4_1 blocks (f16 scale d, f16 offset m, 32 4-bit values q: w = d*q + m)
                     read as d*q, without the offset.
These are the numbers the bounds of tests/test_smollm2.py are chosen from.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fssjax.priors import local_lm  # noqa: E402
from fssjax.weights import llama as wl  # noqa: E402
from test_smollm2 import PARAGRAPH  # noqa: E402


def report(name: str) -> None:
  lm = local_lm.LocalLM.smollm2()
  ids = lm.tokenizer.encode(PARAGRAPH)
  nll = lm.token_nll(ids + ids)
  n = len(ids)
  answer = lm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   max_new_tokens=12)
  print(f"{name:16s} ppl {math.exp(nll[:n - 1].mean()):10.4g}   repeat ppl "
        f"{math.exp(nll[n - 1:].mean()):10.4g}   answer {answer!r}", flush=True)


def q4_1_without_offset(t) -> np.ndarray:
  from gguf import GGMLQuantizationType
  if t.tensor_type != GGMLQuantizationType.Q4_1:
    return correct_tensor(t)
  raw = np.asarray(t.data).reshape(-1, 20)  # 2 + 2 bytes of f16 d, m; 16 bytes of nibbles
  d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
  q = np.concatenate([raw[:, 4:] & 0x0F, raw[:, 4:] >> 4], -1).astype(np.float32)
  return (d * q).reshape(tuple(int(x) for x in reversed(list(t.shape))))


correct_tensor = wl.gguf_tensor


def main():
  report("correct")
  unpermute = wl.unpermute_qk
  wl.unpermute_qk = lambda w, heads: w
  report("no-unpermute")
  wl.unpermute_qk = unpermute
  wl.gguf_tensor = q4_1_without_offset
  report("q4_1-no-offset")
  wl.gguf_tensor = correct_tensor


if __name__ == "__main__":
  main()
