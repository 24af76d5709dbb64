"""Loads a transformers `CLIPModel` directory (both towers, the projections, logit_scale).

Layout: config.json (`model_type: clip`, `text_config`, `vision_config`, `projection_dim`)
and model.safetensors (or a sharded index; PyTorch pickles only with `allow_pickle=True`),
with the published names: `vision_model.*` (the CLIP vision tower), `text_model.*` (the text
tower), `visual_projection.weight` [P, Dv], `text_projection.weight` [P, Dt], `logit_scale`
(a scalar); `position_ids` buffers are skipped. The towers are converted by
`fssjax.weights.llava.params_from_clip_vision_state` and `fssjax.weights.diffusers.
text_encoder_params_from_state_dict`; the projections are transposed to Flax [in, out].
Every tensor must be used and every parameter filled: an unexpected or missing key or a shape
mismatch raises ValueError naming the file and the key.

  config, params = load_clip_model(directory)      # fssjax.nn.clip.CLIPModel's
  tokenizer = load_clip_tokenizer(directory)       # transformers CLIPTokenizer (vocab.json)
  ids, mask = tokenize(tokenizer, texts, config)   # int32 [N, T], padded to the positions
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Tuple

import numpy as np

from fssjax.nn.clip import CLIPModelConfig
from fssjax.nn.clip_text import CLIPTextConfig
from fssjax.weights import diffusers as wd
from fssjax.weights import llava as wv
from fssjax.weights import tensors

PyTree = Any


def load_clip_model(directory: str, *, allow_pickle: bool = False
                    ) -> Tuple[CLIPModelConfig, PyTree]:
  """(CLIPModelConfig, params of `fssjax.nn.clip.CLIPModel`) of a transformers CLIPModel
  directory (see the module docstring).

  Raises:
    FileNotFoundError: no directory, config.json or weights.
    ValueError: not a CLIPModel config, or unexpected / missing / mis-shaped tensors.
  """
  cfg_path = os.path.join(directory, "config.json")
  raw = wv._read_json(cfg_path)  # pylint: disable=protected-access
  if raw.get("model_type") != "clip" or "text_config" not in raw or "vision_config" not in raw:
    raise ValueError(f"{cfg_path}: model_type={raw.get('model_type')!r}; expected a "
                     "transformers CLIPModel config (model_type 'clip' with text_config and "
                     "vision_config)")
  files = tensors.open_weights(directory, "model", allow_pickle=allow_pickle)
  where = getattr(files, "where", directory)
  vision, text, other = {}, {}, {}
  for k in files:
    if k.endswith("position_ids"):
      continue
    if k.startswith("vision_model."):
      vision[k[len("vision_model."):]] = k
    elif k.startswith("text_model."):
      text[k] = k
    elif k in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
      other[k] = k
    else:
      raise ValueError(f"{where}: unexpected tensor {k!r} in a CLIPModel checkpoint (expected "
                       "vision_model.*, text_model.*, visual_projection.weight, "
                       "text_projection.weight, logit_scale)")
  missing = sorted({"visual_projection.weight", "text_projection.weight", "logit_scale"}
                   - set(other))
  if missing:
    raise ValueError(f"{where}: missing tensors {missing} (a CLIPVisionModel or CLIPTextModel "
                     "directory is not a whole CLIPModel)")
  vstate = wv._Renamed(files, vision, where)  # pylint: disable=protected-access
  vconfig = wv.infer_clip_vision_config(raw, vstate, cfg_path)
  vparams = wv.params_from_clip_vision_state(vstate, vconfig, where)
  tconfig = CLIPTextConfig.from_transformers(raw["text_config"])
  try:
    tparams = wd.text_encoder_params_from_state_dict(tconfig, {k: files[k] for k in text})
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  vp = np.asarray(files["visual_projection.weight"], np.float32)
  tp = np.asarray(files["text_projection.weight"], np.float32)
  pdim = int(raw.get("projection_dim") or vp.shape[0])
  for name, w, width in (("visual_projection.weight", vp, vconfig.hidden_size),
                         ("text_projection.weight", tp, tconfig.hidden_size)):
    if w.shape != (pdim, width):
      raise ValueError(f"{where}: tensor {name!r} has shape {w.shape}; the config implies "
                       f"({pdim}, {width}) (projection_dim, tower width)")
  scale = np.asarray(files["logit_scale"], np.float32).reshape(())
  config = CLIPModelConfig(text=tconfig, vision=vconfig, projection_dim=pdim,
                           logit_scale_init_value=float(raw.get("logit_scale_init_value",
                                                                2.6592)))
  params = {"vision_model": vparams, "text_model": tparams,
            "visual_projection": {"kernel": np.ascontiguousarray(vp.T)},
            "text_projection": {"kernel": np.ascontiguousarray(tp.T)}, "logit_scale": scale}
  return config, params


def load_clip_tokenizer(directory: str):
  """transformers' CLIPTokenizer of a CLIPModel directory (vocab.json, merges.txt)."""
  return wd.load_tokenizer(directory)


def tokenize(tokenizer, texts: Sequence[str], config: CLIPModelConfig
             ) -> Tuple[np.ndarray, np.ndarray]:
  """(ids, attention_mask) int32 [N, max_position_embeddings]: padded and truncated as CLIP's
  processor does (the EOS token ends every row, so the pooled state is the EOS token's)."""
  t = int(config.text.max_position_embeddings)
  enc = tokenizer(list(texts), padding="max_length", max_length=t, truncation=True,
                  return_tensors="np")
  return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))
