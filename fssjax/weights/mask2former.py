"""Loading the decoder heads of a Hugging Face Mask2Former checkpoint into fssjax.

`load_mask2former_heads(path)` reads a transformers `Mask2FormerForUniversalSegmentation` (or
`Mask2FormerModel`) directory: `model.safetensors` (or a sharded index; a pickle only with
`allow_pickle=True`, through `fssjax.weights.tensors`) and, when present, `config.json`. It
returns the parts fssjax implements (`fssjax.nn.mask2former`):

  * the pixel decoder: keys `model.pixel_level_module.decoder.*` (or without `model.`);
  * the transformer module: keys `model.transformer_module.*`;
  * the class predictor (`class_predictor.weight` / `.bias`, PyTorch Linear [C + 1, hidden])
    as a Flax Dense {'kernel', 'bias'}, or None for a `Mask2FormerModel`.

The backbone (`model.pixel_level_module.encoder.*`) is not loaded (the method brings its own
vision encoder). The configuration is read from config.json (transformers' field names) when
present; the sizes are inferred from the tensors (feature / mask / hidden sizes, layer counts,
queries, feed-forward widths, heads from `sampling_offsets`) and must agree with it.
`feature_channels` (the backbone channels the pixel decoder expects, finest first) comes from
the tensors: the FPN adapters then the input projections.

Raises `FileNotFoundError` (no weights), `ValueError` (a checkpoint without the decoder keys, or
tensors that do not match the configuration, naming them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fssjax.nn import mask2former as m2
from fssjax.weights.tensors import open_weights

PIXEL_PREFIXES = ("model.pixel_level_module.decoder.", "pixel_level_module.decoder.")
TRANSFORMER_PREFIXES = ("model.transformer_module.", "transformer_module.")


def _sub(state: Mapping[str, Any], prefixes) -> dict[str, Any]:
  for prefix in prefixes:
    keys = [k for k in state if k.startswith(prefix)]
    if keys:
      return {k[len(prefix):]: k for k in keys}
  return {}


def _count(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
  return max(found) + 1 if found else 0


def infer_config(raw: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
                 ) -> tuple[m2.Mask2FormerConfig, tuple[int, ...]]:
  """(config, feature_channels) from config.json fields `raw` and the decoder tensors' shapes
  (`shapes`: pixel-decoder keys prefixed 'pixel.', transformer keys prefixed 'transformer.')."""
  pix = {k[len("pixel."):]: v for k, v in shapes.items() if k.startswith("pixel.")}
  tr = {k[len("transformer."):]: v for k, v in shapes.items() if k.startswith("transformer.")}
  kw = dataclasses.asdict(m2.Mask2FormerConfig.from_dict(raw)) if raw else {}
  fields = {}
  fields["feature_size"] = pix["level_embed"][1]
  fields["mask_feature_size"] = pix["mask_projection.weight"][0]
  fields["hidden_dim"] = tr["queries_features.weight"][1]
  fields["num_queries"] = tr["queries_features.weight"][0]
  fields["encoder_layers"] = _count(pix, r"encoder\.layers\.(\d+)\.")
  fields["encoder_feedforward_dim"] = pix["encoder.layers.0.fc1.weight"][0]
  fields["decoder_layers"] = _count(tr, r"decoder\.layers\.(\d+)\.") + 1
  fields["dim_feedforward"] = tr["decoder.layers.0.fc1.weight"][0]
  # sampling_offsets: heads x 3 levels x 4 points x 2 outputs (fixed in Mask2Former's encoder).
  fields["num_attention_heads"] = pix["encoder.layers.0.self_attn.sampling_offsets.weight"][0] // (
      m2.NUM_FEATURE_LEVELS * 4 * 2)
  for k, v in fields.items():
    if k in kw and raw and k in raw and int(kw[k]) != int(v):
      raise ValueError(f"Mask2Former config.json says {k}={raw[k]} but the tensors give {v}")
    kw[k] = int(v)
  cfg = m2.Mask2FormerConfig(**kw)
  n_fpn = _count(pix, r"adapter_(\d+)\.") - 1 if any(k.startswith("adapter_") for k in pix) else 0
  channels = [pix[f"adapter_{j + 1}.0.weight"][1] for j in range(max(n_fpn, 0))]
  channels += [pix[f"input_projections.{lvl}.0.weight"][1]
               for lvl in range(m2.NUM_FEATURE_LEVELS - 1, -1, -1)]
  return cfg, tuple(int(c) for c in channels)


def load_mask2former_heads(path: str, *, allow_pickle: bool = False,
                           feature_shapes=None) -> dict[str, Any]:
  """Reads the decoder heads of a transformers Mask2Former directory (module docstring).

  Args:
    path: the model directory.
    allow_pickle: accept `pytorch_model.bin` (unpickling can run code).
    feature_shapes: optional ((H, W) per backbone level, finest first) for building the
      parameter templates; default: strides 4..32 of a 64 x 64 image (shapes do not depend on it).

  Returns:
    {'config': Mask2FormerConfig, 'feature_channels': tuple, 'pixel_decoder': params,
     'transformer_module': params, 'class_predictor': {'kernel', 'bias'} or None}.
  """
  state = open_weights(path, "model", allow_pickle=allow_pickle)
  pix_keys = _sub(state, PIXEL_PREFIXES)
  tr_keys = _sub(state, TRANSFORMER_PREFIXES)
  if not pix_keys or not tr_keys:
    raise ValueError(f"{path}: no Mask2Former decoder tensors (expected keys starting with "
                     f"{PIXEL_PREFIXES[0]!r} and {TRANSFORMER_PREFIXES[0]!r})")
  shape = (lambda k: state.shape(k)) if hasattr(state, "shape") else (
      lambda k: tuple(np.shape(state[k])))
  shapes = {f"pixel.{k}": shape(v) for k, v in pix_keys.items()}
  shapes.update({f"transformer.{k}": shape(v) for k, v in tr_keys.items()})
  raw = {}
  cfg_path = os.path.join(path, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      raw = json.load(f)
  cfg, channels = infer_config(raw, shapes)
  n = len(channels)
  if feature_shapes is None:
    feature_shapes = [(max(64 // s, 1), max(64 // s, 1)) for s in cfg.feature_strides[-n:]]
  feats = [jnp.zeros((1, h, w, c)) for (h, w), c in zip(feature_shapes, channels)]
  pixel = m2.Mask2FormerPixelDecoder(cfg, channels)
  pix_tmpl = jax.eval_shape(lambda: pixel.init(jax.random.key(0), feats))["params"]
  pixel_params = m2.params_from_state_dict({k: state[v] for k, v in pix_keys.items()},
                                           pix_tmpl, component=f"{path} pixel decoder")
  mf, ms = jax.eval_shape(lambda p: pixel.apply({"params": p}, feats), pix_tmpl)[:2]
  ms = [jnp.zeros(x.shape) for x in ms]
  mf = jnp.zeros(mf.shape)
  tm = m2.Mask2FormerTransformerModule(cfg, cfg.feature_size)
  tm_tmpl = jax.eval_shape(lambda: tm.init(jax.random.key(0), ms, mf))["params"]
  tm_params = m2.params_from_state_dict({k: state[v] for k, v in tr_keys.items()}, tm_tmpl,
                                        component=f"{path} transformer module")
  classifier = None
  if "class_predictor.weight" in state:
    w = np.asarray(state["class_predictor.weight"], np.float32)
    if w.shape[1] != cfg.hidden_dim:
      raise ValueError(f"{path}: class_predictor.weight has shape {w.shape}; expected "
                       f"[num_labels + 1, {cfg.hidden_dim}]")
    classifier = {"kernel": jnp.asarray(w.T),
                  "bias": jnp.asarray(np.asarray(state["class_predictor.bias"], np.float32))}
  return {"config": cfg, "feature_channels": channels, "pixel_decoder": pixel_params,
          "transformer_module": tm_params, "class_predictor": classifier}
