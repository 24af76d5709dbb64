"""Loads LLaMA-family checkpoints (Hugging Face safetensors or llama.cpp GGUF) into fssjax.

Hugging Face layout (`LlamaForCausalLM.save_pretrained`): a directory with `config.json` and
`model.safetensors`, or shards listed in `model.safetensors.index.json`. Tensors are renamed
to the Flax paths of `fssjax.nn.llama.LlamaForCausalLM`:

  model.embed_tokens.weight                    -> model/embed_tokens/embedding
  model.layers.{i}.self_attn.q_proj.weight     -> model/layers_{i}/self_attn/q_proj/kernel (.T)
  model.layers.{i}.mlp.gate_proj.weight        -> model/layers_{i}/mlp/gate_proj/kernel (.T)
  model.layers.{i}.input_layernorm.weight      -> model/layers_{i}/input_layernorm/weight
  model.norm.weight                            -> model/norm/weight
  lm_head.weight                               -> lm_head/kernel (.T; absent when tied)

Fields that `config.json` omits are inferred from the tensor shapes (vocab_size, hidden_size,
intermediate_size, num_hidden_layers, num_key_value_heads, tie_word_embeddings).
PyTorch pickles (`pytorch_model.bin`) are never read: convert them to safetensors first.

GGUF (llama.cpp; read with the `gguf` package, no llama.cpp needed): the metadata
`{arch}.block_count`, `.embedding_length`, `.feed_forward_length`, `.attention.head_count`,
`.attention.head_count_kv`, `.rope.freq_base`, `.attention.layer_norm_rms_epsilon`,
`.context_length`, `.vocab_size`, `.rope.scaling.*` and the `rope_freqs` tensor become a
LlamaConfig; quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised with
`gguf.quants.dequantize`; names map as llama.cpp's `gguf-py/gguf/tensor_mapping.py`
(token_embd, blk.N.attn_q, attn_k, attn_v, attn_output, attn_norm, ffn_gate, ffn_up,
ffn_down, ffn_norm, output_norm, output). llama.cpp's `convert_hf_to_gguf.py`
(`LlamaModel.permute`) reorders the rows of q_proj and k_proj within each head from
transformers' rotate-half layout to interleaved pairs:

  w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

`unpermute_qk` inverts it (reshape(heads, head_dim // 2, 2, in).swapaxes(1, 2)).

Every tensor must be used and every parameter filled: unexpected or missing keys and shape
mismatches raise ValueError naming the file, the key and the shapes.

Functions: `load(path)` -> (LlamaConfig, params) for a directory or a .gguf file;
`load_hf(directory)`, `load_gguf(path)`, `params_from_hf_state_dict(state, config)`,
`gguf_config(reader)`, `unpermute_qk`, `permute_qk`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from fssjax.nn.llama import LlamaConfig, RopeScaling

StateDict = Dict[str, np.ndarray]
PyTree = Any

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors.


def _read_safetensors_file(path: str) -> StateDict:
  """All tensors of one safetensors file as float32 numpy arrays (bf16 / fp16 upcast).

  Parses the format directly (8-byte header length, JSON header, raw little-endian data), so
  bfloat16 needs no torch. Raises ValueError naming the file for anything malformed.
  """
  import ml_dtypes  # a jax dependency
  with open(path, "rb") as fh:
    data = fh.read()
  try:
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + n > len(data):
      raise ValueError("truncated header")
    header = json.loads(data[8:8 + n])
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info.get("dtype") not in dtypes:
      raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}")
    begin, end = info["data_offsets"]
    if 8 + n + end > len(data):
      raise ValueError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
    arr = np.frombuffer(data[8 + n + begin:8 + n + end], dtypes[info["dtype"]])
    out[key] = arr.reshape(info["shape"]).astype(np.float32)
  return out


def read_hf_state_dict(directory: str) -> Tuple[StateDict, Dict[str, str]]:
  """(tensors, {key: file it came from}) from `model.safetensors` or its sharded index.

  Raises:
    FileNotFoundError: no `model.safetensors` / `model.safetensors.index.json` (a pickle-only
      checkpoint is named in the message: it is not read).
    ValueError: a corrupt file, an index without `weight_map`, or a shard missing a tensor.
  """
  single = os.path.join(directory, "model.safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    state = _read_safetensors_file(single)
    return state, {k: single for k in state}
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    except json.JSONDecodeError as e:
      raise ValueError(f"{index}: invalid JSON ({e})") from e
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dict (tensor name -> shard file)")
    state, source = {}, {}
    for shard in sorted(set(weight_map.values())):
      path = os.path.join(directory, shard)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not in {directory}")
      part = _read_safetensors_file(path)
      for k, v in part.items():
        state[k] = v
        source[k] = path
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"{index}: tensors {missing[:5]} are listed but not in their shards")
    return state, source
  pickles = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
             if os.path.exists(os.path.join(directory, n))]
  hint = (f" (found {pickles[0]}: PyTorch pickles are not read; convert it to safetensors)"
          if pickles else "")
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                          f"{directory}{hint}")


def infer_hf_config(raw: Mapping[str, Any], state: Mapping[str, np.ndarray],
                    where: str = "config.json") -> LlamaConfig:
  """LlamaConfig from a config.json dict, filling omitted fields from the tensor shapes."""
  raw = dict(raw)
  emb = state.get("model.embed_tokens.weight")
  if emb is None:
    raise ValueError(f"{where}: checkpoint has no tensor 'model.embed_tokens.weight' (not a "
                     "LlamaForCausalLM checkpoint?)")
  raw.setdefault("vocab_size", emb.shape[0])
  raw.setdefault("hidden_size", emb.shape[1])
  layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
  raw.setdefault("num_hidden_layers", len(layers))
  gate = state.get("model.layers.0.mlp.gate_proj.weight")
  if gate is not None:
    raw.setdefault("intermediate_size", gate.shape[0])
  if "num_attention_heads" not in raw:
    raise ValueError(f"{where}: no 'num_attention_heads' (it cannot be inferred from shapes)")
  k = state.get("model.layers.0.self_attn.k_proj.weight")
  if k is not None and raw.get("num_key_value_heads") is None:
    hd = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    raw["num_key_value_heads"] = k.shape[0] // hd
  if "tie_word_embeddings" not in raw:
    raw["tie_word_embeddings"] = "lm_head.weight" not in state
  return LlamaConfig.from_hf(raw, where)


def expected_shapes(config: LlamaConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{Flax path: shape} of every parameter of `LlamaForCausalLM(config)` (unrolled layout)."""
  d, v, inner = config.hidden_size, config.vocab_size, config.intermediate_size
  q, kv = config.num_attention_heads * config.dim_per_head, config.kv_heads * config.dim_per_head
  out = {("model", "embed_tokens", "embedding"): (v, d), ("model", "norm", "weight"): (d,)}
  if not config.tie_word_embeddings:
    out[("lm_head", "kernel")] = (d, v)
  for i in range(config.num_hidden_layers):
    layer = ("model", f"layers_{i}")
    out[layer + ("input_layernorm", "weight")] = (d,)
    out[layer + ("post_attention_layernorm", "weight")] = (d,)
    for name, shape, bias in (("q_proj", (d, q), config.attention_bias),
                              ("k_proj", (d, kv), config.attention_bias),
                              ("v_proj", (d, kv), config.attention_bias),
                              ("o_proj", (q, d), config.attention_bias)):
      out[layer + ("self_attn", name, "kernel")] = shape
      if bias:
        out[layer + ("self_attn", name, "bias")] = shape[1:]
    for name, shape in (("gate_proj", (d, inner)), ("up_proj", (d, inner)),
                        ("down_proj", (inner, d))):
      out[layer + ("mlp", name, "kernel")] = shape
      if config.mlp_bias:
        out[layer + ("mlp", name, "bias")] = shape[1:]
  return out


def hf_key_to_path(key: str) -> Tuple[Tuple[str, ...], bool]:
  """transformers key -> (Flax path, transpose?); ValueError for a key this model lacks."""
  if key == "model.embed_tokens.weight":
    return ("model", "embed_tokens", "embedding"), False
  if key == "model.norm.weight":
    return ("model", "norm", "weight"), False
  if key == "lm_head.weight":
    return ("lm_head", "kernel"), True
  m = _LAYER_RE.match(key)
  if m:
    layer, mod, leaf = m.groups()
    parts = mod.split(".")
    if parts[-1].endswith("layernorm") and leaf == "weight" and len(parts) == 1:
      return ("model", f"layers_{layer}", parts[0], "weight"), False
    if len(parts) == 2 and parts[0] in ("self_attn", "mlp"):
      return (("model", f"layers_{layer}", *parts, "kernel" if leaf == "weight" else "bias"),
              leaf == "weight")
  raise ValueError(f"unexpected tensor {key!r}")


def params_from_hf_state_dict(state: Mapping[str, np.ndarray], config: LlamaConfig,
                              source: Optional[Mapping[str, str]] = None) -> PyTree:
  """Flax params (float32 numpy, nested dicts) from a transformers LlamaForCausalLM state dict.

  Raises:
    ValueError: unexpected / missing tensors or shape mismatches, naming the file and key.
  """
  source = source or {}
  expected = expected_shapes(config)
  params: Dict[Tuple[str, ...], np.ndarray] = {}
  for key, value in state.items():
    where = source.get(key, "checkpoint")
    if _DROPPED.search(key):
      continue
    if key == "lm_head.weight" and config.tie_word_embeddings:
      continue  # some exports keep the tied copy
    try:
      path, transpose = hf_key_to_path(key)
    except ValueError as e:
      raise ValueError(f"{where}: {e}; a LlamaForCausalLM checkpoint has only model.* and "
                       "lm_head.weight tensors") from None
    value = np.asarray(value, np.float32)
    if transpose:
      value = value.T
    if path not in expected:
      raise ValueError(f"{where}: tensor {key!r} has no parameter {'/'.join(path)} in a model "
                       f"with {config.num_hidden_layers} layers (config mismatch?)")
    if tuple(value.shape) != expected[path]:
      shape = value.T.shape if transpose else value.shape
      want = expected[path][::-1] if transpose else expected[path]
      raise ValueError(f"{where}: tensor {key!r} has shape {tuple(shape)}; the config implies "
                       f"{tuple(want)}")
    params[path] = np.ascontiguousarray(value)
  missing = sorted("/".join(p) for p in set(expected) - set(params))
  if missing:
    raise ValueError(f"{sorted(set(source.values())) or 'checkpoint'}: missing tensors for "
                     f"parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}")
  return traverse_util.unflatten_dict(params)


def load_hf(directory: str) -> Tuple[LlamaConfig, PyTree]:
  """(config, params) from a transformers LlamaForCausalLM directory (see module docstring)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e
  state, source = read_hf_state_dict(directory)
  config = infer_hf_config(raw, state, path)
  return config, params_from_hf_state_dict(state, config, source)


# ----------------------------------------------------------------------------------------------
# GGUF.


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotate-half rows -> pairs.

  w: [heads * head_dim, ...] (a q_proj / k_proj weight [out, in] or bias [out]).
  """
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of `permute_qk`: GGUF attn_q / attn_k rows back to transformers' layout."""
  return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def gguf_config(reader, path: str = "GGUF") -> LlamaConfig:
  """LlamaConfig from a GGUF file's metadata (a `gguf.GGUFReader`).

  Raises:
    ValueError: architecture other than llama, or a required key missing (named).
  """
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: general.architecture = {arch!r}; expected 'llama'")

  def need(name):
    v = _field(reader, f"{arch}.{name}")
    if v is None:
      raise ValueError(f"{path}: metadata key '{arch}.{name}' is missing")
    return v

  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  kv = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    emb = _gguf_tensor_infos(reader).get("token_embd.weight")
    vocab = len(tokens.data) if tokens is not None else int(emb.shape[-1])
  scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
  rope = RopeScaling()
  if scaling_type == "linear":
    rope = RopeScaling("linear", factor=float(need("rope.scaling.factor")))
  elif scaling_type not in ("none", None):
    raise ValueError(f"{path}: {arch}.rope.scaling.type = {scaling_type!r} is not supported "
                     "(expected 'none' or 'linear')")
  freqs = _gguf_tensor_infos(reader).get("rope_freqs.weight")
  if freqs is not None:
    rope = dataclasses.replace(rope, freq_factors=tuple(
        float(x) for x in np.asarray(freqs.data, np.float32).reshape(-1)))
  infos = _gguf_tensor_infos(reader)
  tied = "output.weight" not in infos
  cfg = LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
      num_key_value_heads=kv, head_dim=head_dim if head_dim != hidden // heads else None,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
      rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=rope, attention_bias="blk.0.attn_q.bias" in infos,
      mlp_bias="blk.0.ffn_gate.bias" in infos, tie_word_embeddings=tied,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
  return cfg.validate(path)


def _gguf_tensor_infos(reader) -> dict:
  return {t.name: t for t in reader.tensors}


_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def gguf_tensor(t) -> np.ndarray:
  """A GGUF tensor as float32 numpy in numpy order (llama.cpp's ne reversed), dequantised."""
  from gguf import GGMLQuantizationType
  from gguf.quants import dequantize
  shape = tuple(int(x) for x in reversed(list(t.shape)))
  if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
    arr = np.asarray(t.data)
  else:
    arr = dequantize(np.asarray(t.data), t.tensor_type)
  return np.asarray(arr, np.float32).reshape(shape)


def gguf_state_dict(reader, config: LlamaConfig, path: str = "GGUF") -> StateDict:
  """The GGUF tensors renamed to transformers keys, q/k unpermuted (see module docstring)."""
  state = {}
  for t in reader.tensors:
    name = t.name
    if name == "rope_freqs.weight":
      continue  # already in the config
    if name in _GGUF_TOP:
      key = _GGUF_TOP[name]
    else:
      m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
      if not m or m.group(2) not in _GGUF_LAYER:
        raise ValueError(f"{path}: unexpected tensor {name!r} (not part of a llama model)")
      key = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    try:
      w = gguf_tensor(t)
    except NotImplementedError as e:
      raise ValueError(f"{path}: tensor {name!r} has quantisation {t.tensor_type.name}, which "
                       f"gguf.quants cannot dequantise ({e})") from e
    if ".self_attn.q_proj." in key:
      w = unpermute_qk(w, config.num_attention_heads)
    elif ".self_attn.k_proj." in key:
      w = unpermute_qk(w, config.kv_heads)
    state[key] = w
  return state


def read_gguf(path: str):
  """A `gguf.GGUFReader` of `path` (FileNotFoundError / ValueError naming the file)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no GGUF file {path}")
  import gguf
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def load_gguf(path: str, reader=None) -> Tuple[LlamaConfig, PyTree]:
  """(config, params) from a llama.cpp GGUF file of a llama-architecture model.

  `reader`: an already opened `gguf.GGUFReader` of `path` (parsing the metadata of a large
  vocabulary takes seconds; `LocalLM.load` shares one reader with the tokenizer).
  """
  reader = reader if reader is not None else read_gguf(path)
  config = gguf_config(reader, path)
  state = gguf_state_dict(reader, config, path)
  return config, params_from_hf_state_dict(state, config, {k: path for k in state})


def load(path: str) -> Tuple[LlamaConfig, PyTree]:
  """(config, params) from a `.gguf` file or a transformers checkpoint directory."""
  if os.path.isdir(path):
    return load_hf(path)
  if path.endswith(".gguf"):
    return load_gguf(path)
  raise ValueError(f"{path}: expected a .gguf file or a directory with config.json and "
                   "model.safetensors")
