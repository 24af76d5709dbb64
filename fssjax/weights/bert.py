"""Loads transformers `BertModel` checkpoints (safetensors + config.json) into fssjax.nn.bert.

Layout (a Hugging Face model directory, e.g. sentence-transformers/all-MiniLM-L6-v2):
  config.json                 transformers BertConfig (model_type bert)
  model.safetensors           or a sharded `model.safetensors.index.json`
  tokenizer.json              read by fssjax.priors.text_encoder, not here

Conversion: `encoder.layer.0.attention.self.query.weight` -> `encoder/layer_0/attention/self/
query/kernel` (transposed), LayerNorm `weight` -> `scale`, embeddings -> `embedding`. Accepted
variants: a `bert.` prefix on every key (checkpoints saved from BertFor* heads; head tensors
such as `cls.*` are then an error, since only the encoder is built), the
`embeddings.position_ids` buffer (checked to be arange, then dropped), and no pooler (BertModel
with add_pooling_layer=False: `config.add_pooling_layer` follows the tensors). Fields that
config.json omits are inferred from the tensors where they can be (vocab_size, hidden_size,
max_position_embeddings, type_vocab_size, intermediate_size, num_hidden_layers); a field given
in config.json that the tensors contradict is a shape error naming the tensor. PyTorch pickles
(`pytorch_model.bin`) are read only with `allow_pickle=True`.

Functions: `load_bert(path)` -> (BertModel, params); `config_from_state_dict`,
`bert_params_from_state_dict`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn.bert import BertConfig, BertModel
from fssjax.weights.diffusers import convert_state_dict, read_config, read_state_dict

PyTree = Any
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict:
  keys = list(state_dict)
  prefixed = [k.startswith("bert.") for k in keys]
  if not any(prefixed):
    return dict(state_dict)
  if not all(prefixed):
    odd = [k for k, p in zip(keys, prefixed) if not p][:5]
    raise ValueError(f"bert: the checkpoint mixes 'bert.'-prefixed encoder tensors with others "
                     f"{odd}; only the encoder (BertModel) is supported")
  return {k[len("bert."):]: v for k, v in state_dict.items()}


def config_from_state_dict(raw_config: Mapping[str, Any],
                           state_dict: Mapping[str, np.ndarray]) -> BertConfig:
  """BertConfig from config.json, with the fields it omits inferred from the tensors.

  `num_attention_heads`, `hidden_act` and `layer_norm_eps` cannot be read from tensors: when
  config.json omits them, transformers' defaults (12, 'gelu', 1e-12) apply.

  Raises:
    ValueError: for a config that fails BertConfig's checks, or a state dict without
      `embeddings.word_embeddings.weight`.
  """
  sd = _strip_prefix(state_dict)
  shape = lambda k: tuple(np.shape(sd[k])) if k in sd else None  # noqa: E731
  word = shape("embeddings.word_embeddings.weight")
  if word is None:
    raise ValueError(f"bert: no 'embeddings.word_embeddings.weight' among the tensors "
                     f"({sorted(sd)[:5]}...); not a BERT checkpoint")
  inferred: dict[str, Any] = {"vocab_size": word[0], "hidden_size": word[1]}
  if (pos := shape("embeddings.position_embeddings.weight")) is not None:
    inferred["max_position_embeddings"] = pos[0]
  if (typ := shape("embeddings.token_type_embeddings.weight")) is not None:
    inferred["type_vocab_size"] = typ[0]
  if (inter := shape("encoder.layer.0.intermediate.dense.weight")) is not None:
    inferred["intermediate_size"] = inter[0]
  layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
  inferred["num_hidden_layers"] = max(layers) + 1 if layers else 0
  merged = dict(inferred)
  merged.update({k: v for k, v in raw_config.items() if v is not None})
  return BertConfig.from_transformers(merged, add_pooling_layer="pooler.dense.weight" in sd)


def bert_params_from_state_dict(config: BertConfig, state_dict: Mapping[str, np.ndarray], *,
                                param_dtype: Any = jnp.float32) -> PyTree:
  """Converts a transformers BertModel state dict for `BertModel(config)`.

  Raises:
    ValueError: on unexpected or missing tensors or shape mismatches (naming them), or a
      `position_ids` buffer that is not arange(max_position_embeddings).
  """
  sd = _strip_prefix(state_dict)
  pos = sd.pop("embeddings.position_ids", None)
  if pos is not None:
    pos = np.asarray(pos).reshape(-1)
    if not np.array_equal(pos, np.arange(config.max_position_embeddings)):
      raise ValueError(f"bert: embeddings.position_ids is not arange("
                       f"{config.max_position_embeddings}) (shape {pos.shape})")
  module = BertModel(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  return convert_state_dict(sd, shapes, component="bert", param_dtype=param_dtype)


def load_bert(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
              attention_implementation: Optional[str] = None,
              allow_pickle: bool = False) -> Tuple[BertModel, PyTree]:
  """Loads a BertModel directory (config.json + model.safetensors) -> (BertModel, params).

  Raises:
    FileNotFoundError: no config.json or no weights in `path`.
    ValueError: a config or checkpoint that does not describe one BERT encoder (see above).
  """
  raw = read_config(path)
  try:
    sd = read_state_dict(path, "model", allow_pickle=allow_pickle)
  except FileNotFoundError:
    # transformers' pickle name; read_state_dict refuses it without allow_pickle.
    sd = read_state_dict(path, "pytorch_model", allow_pickle=allow_pickle)
  config = config_from_state_dict(raw, sd)
  params = bert_params_from_state_dict(config, sd, param_dtype=param_dtype)
  module = BertModel(config, dtype=dtype, param_dtype=param_dtype,
                     attention_implementation=attention_implementation)
  return module, params
