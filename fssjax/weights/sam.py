"""Loads Segment Anything checkpoints into `fssjax.nn.sam` parameters.

Two published layouts:

* Hugging Face transformers `SamModel` (`facebook/sam-vit-base` / `-large` / `-huge`): a
  directory with `model.safetensors` (or shards listed in `model.safetensors.index.json`) and
  an optional `config.json`, or a single `.safetensors` file. Keys are transformers' names
  (`vision_encoder.layers.3.attn.qkv.weight`, `prompt_encoder.point_embed.0.weight`,
  `mask_decoder.output_hypernetworks_mlps.0.proj_in.weight`, ...).
* The official facebookresearch/segment-anything checkpoints `sam_vit_{b,l,h}_*.pth`: a
  PyTorch pickle of the `Sam` state dict (`image_encoder.blocks.3.attn.qkv.weight`,
  `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`,
  `mask_decoder.output_upscaling.0.weight`, ...). Unpickling can execute code, so it is read
  only with `allow_pickle=True` (through `fssjax.weights.tensors.read_torch_pickle`, which
  needs torch). Its names are mapped to transformers' as transformers'
  `convert_sam_to_hf.py` does (`blocks` -> `layers`, `.norm` -> `.layer_norm`, `neck.0..3`,
  `mask_downscaling.0/1/3/4/6`, `output_upscaling.0/1/3`, `point_embeddings`, MLP
  `layers.0 / k / last` -> `proj_in / layers.k-1 / proj_out`); `pixel_mean` / `pixel_std`
  are dropped (`fssjax.nn.sam.PIXEL_MEAN` / `PIXEL_STD` hold them). The official two-way
  transformer normalises with PyTorch's LayerNorm default eps 1e-5, so an official checkpoint
  gets `mask_decoder_config.layer_norm_eps = 1e-5` unless `config` says otherwise.

Either key layout is accepted in either container (a pickle of transformers keys, a
safetensors file of official keys).

Tensor conversions to Flax: Linear [out, in] -> kernel [in, out]; Conv2d [O, I, kh, kw] and
ConvTranspose2d [I, O, kh, kw] -> kernel [kh, kw, I, O] / [kh, kw, O, I] (both
`w.transpose(2, 3, 1, 0)`; the decoder's `nn.ConvTranspose` uses `transpose_kernel=True`);
LayerNorm weight -> scale; Embedding weight -> embedding; `pos_embed`, `rel_pos_h/w` and
the Fourier matrix unchanged.

Config. Fields come from `config.json` (transformers' SamConfig layout), then the `config`
argument (the same nested layout, e.g. `{"vision_config": {"num_attention_heads": 2}}`)
overrides them, and whatever is still missing is inferred from tensor shapes:
vision hidden_size, num_channels, patch_size (patch embedding), image_size (`pos_embed` grid
x patch), num_hidden_layers, mlp_dim, qkv_bias, use_abs_pos, use_rel_pos, output_channels,
num_pos_feats, and `global_attn_indexes` / `window_size` from the relative tables (a global
block's table has 2 * image_size / patch_size - 1 rows, a windowed block's 2 * window - 1);
prompt hidden_size, mask_input_channels, num_point_embeddings; decoder hidden_size,
num_multimask_outputs, num_hidden_layers, mlp_dim, attention_downsample_rate,
iou_head_depth, iou_head_hidden_dim. Head counts are not visible in shapes: the encoder's
comes from the published preset with the same width (768 -> ViT-B 12, 1024 -> ViT-L 16,
1280 -> ViT-H 16; any other width must be given), the decoder's defaults to SAM's 8.

Every parameter must be filled and every tensor used: missing or unexpected tensors and
shape mismatches raise ValueError naming the file, the keys and the shapes.

`load_sam(path, allow_pickle=False, dtype=np.float32, config=None, prefix='')` ->
(SamConfig, params) (`prefix`: the SAM part of a larger checkpoint, e.g. LISA's
'model.visual_model.');
params is `{'vision_encoder': ..., 'prompt_encoder': ..., 'mask_decoder': ...}` for
`fssjax.nn.sam.SamModel` (each sub-tree is the params of the matching module).
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from fssjax.nn import sam as nsam
from fssjax.weights import tensors

PyTree = Any

_OFFICIAL_TO_HF = (  # transformers' convert_sam_to_hf.py KEYS_TO_MODIFY_MAPPING (in order)
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_OFFICIAL_DROPPED = ("pixel_mean", "pixel_std")
_MLP_RE = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
                     r"\.layers\.(\d+)\.(weight|bias)$")
_SHARED = "prompt_encoder.shared_embedding.positional_embedding"
_SHARED_TIED = "shared_image_embedding.positional_embedding"

_REFUSE = (
    "{path} is a PyTorch pickle (the official segment-anything checkpoints are): unpickling "
    "can execute arbitrary code, so fssjax reads it only when asked by name. Pass "
    "allow_pickle=True to load_sam (it needs torch) if you trust the file, or use the "
    "safetensors release of the same weights (transformers' facebook/sam-vit-base, "
    "-large or -huge, or convert it with safetensors.torch.save_file(state_dict, path)).")


# ----------------------------------------------------------------------------------------------
# Reading.


def _open_file(path: str, allow_pickle: bool):
  if tensors.is_safetensors(path):
    return tensors.open_file(path)
  if path.endswith(".safetensors"):
    raise ValueError(f"{path}: not a readable safetensors file (no valid header; truncated?)")
  if not allow_pickle:
    raise ValueError(_REFUSE.format(path=path))
  return tensors.read_torch_pickle(path, True)


def _open(path: str, allow_pickle: bool):
  """(weights mapping, where, raw config.json dict or {})."""
  if os.path.isfile(path):
    return _open_file(path, allow_pickle), path, {}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"SAM checkpoint not found: {path} (expected a directory with "
                            "model.safetensors, a .safetensors file or an official .pth)")
  raw = {}
  cfg_path = os.path.join(path, "config.json")
  if os.path.exists(cfg_path):
    try:
      with open(cfg_path) as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single) or os.path.exists(single + ".index.json"):
    where = single if os.path.exists(single) else single + ".index.json"
    return tensors.open_weights(path, "model"), where, raw
  pickles = sorted(n for n in os.listdir(path) if n.endswith(tensors.PICKLE_EXTS))
  if pickles:
    return _open_file(os.path.join(path, pickles[0]), allow_pickle), os.path.join(
        path, pickles[0]), raw
  raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or PyTorch "
                          f"checkpoint in {path}")


def official_to_hf_keys(keys) -> Dict[str, Optional[str]]:
  """{official segment-anything key: transformers key (None: dropped buffer)}.

  The MLP heads' `layers.0 / k / last` become `proj_in / layers.(k-1) / proj_out` for any
  depth (the depth is read off the keys).
  """
  keys = list(keys)
  renamed = {}
  for key in keys:
    if key in _OFFICIAL_DROPPED:
      renamed[key] = None
      continue
    new = key
    for a, b in _OFFICIAL_TO_HF:
      if a in new:
        new = new.replace(a, b)
    renamed[key] = new
  last: Dict[str, int] = {}
  for new in renamed.values():
    m = new and _MLP_RE.match(new)
    if m:
      last[m.group(1)] = max(last.get(m.group(1), 0), int(m.group(2)))
  for key, new in renamed.items():
    m = new and _MLP_RE.match(new)
    if m:
      head, k, leaf = m.group(1), int(m.group(2)), m.group(3)
      part = ("proj_in" if k == 0 else "proj_out" if k == last[head] else f"layers.{k - 1}")
      renamed[key] = f"{head}.{part}.{leaf}"
  return renamed


class _Renamed:
  """A {transformers key: tensor} view of a weights mapping with other names."""

  def __init__(self, weights, names: Mapping[str, str]):
    self._w, self._names = weights, names  # names: new -> old

  def keys(self):
    return list(self._names)

  def shape(self, key):
    if hasattr(self._w, "shape"):  # WeightFiles: the header only
      return tuple(self._w.shape(self._names[key]))
    return tuple(np.shape(self._w[self._names[key]]))

  def __getitem__(self, key):
    return self._w[self._names[key]]

  def source_key(self, key):
    return self._names[key]


def _hf_view(weights, where: str, prefix: str = "") -> Tuple[_Renamed, bool]:
  """(transformers-named view, whether the checkpoint used the official names); with a
  `prefix`, only the keys that start with it, without it."""
  strip = {k[len(prefix):]: k for k in weights.keys() if k.startswith(prefix)}
  keys = list(strip)
  if any(k.startswith("vision_encoder.") for k in keys):
    return _Renamed(weights, strip), False
  if any(k.startswith("image_encoder.") for k in keys):
    names = {new: strip[old] for old, new in official_to_hf_keys(keys).items()
             if new is not None}
    return _Renamed(weights, names), True
  nested = sorted({k[:k.index(m) + 1] for k in weights.keys()
                   for m in (".vision_encoder.", ".image_encoder.") if m in k})
  hint = (f"; the SAM tensors sit under {nested[0]!r}: pass prefix={nested[0]!r}"
          if nested else "")
  raise ValueError(f"{where}: no SAM tensors{f' under prefix {prefix!r}' if prefix else ''}: "
                   "expected keys starting with 'vision_encoder.' (transformers SamModel) or "
                   f"'image_encoder.' (segment-anything); found {sorted(keys)[:5]}{hint}")


# ----------------------------------------------------------------------------------------------
# Config inference.


def _count(keys, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_config(shapes: Mapping[str, Tuple[int, ...]], raw: Optional[Mapping] = None,
                 where: str = "checkpoint", official: bool = False) -> nsam.SamConfig:
  """SamConfig from a transformers-layout config dict `raw` (may be empty or partial), the
  rest inferred from `shapes` ({transformers key: shape}); see the module docstring.

  Raises:
    ValueError: a tensor needed for inference is missing, the relative tables disagree on
      the window size, or the encoder's head count is neither given nor a preset's.
  """
  raw = dict(raw or {})
  keys = list(shapes)

  def need(key):
    if key not in shapes:
      raise ValueError(f"{where}: no tensor {key!r} to infer the SAM config from (not a SAM "
                       "checkpoint, or a truncated one?)")
    return shapes[key]

  v = dict(raw.get("vision_config") or {})
  hidden, chans, patch, _ = need("vision_encoder.patch_embed.projection.weight")
  v.setdefault("hidden_size", hidden)
  v.setdefault("num_channels", chans)
  v.setdefault("patch_size", patch)
  pos = shapes.get("vision_encoder.pos_embed")
  v.setdefault("use_abs_pos", pos is not None)
  if pos is not None:
    v.setdefault("image_size", pos[1] * v["patch_size"])
  layers = _count(keys, r"^vision_encoder\.layers\.(\d+)\.")
  v.setdefault("num_hidden_layers", layers)
  v.setdefault("mlp_dim", need("vision_encoder.layers.0.mlp.lin1.weight")[0])
  v.setdefault("qkv_bias", "vision_encoder.layers.0.attn.qkv.bias" in shapes)
  v.setdefault("output_channels", need("vision_encoder.neck.conv1.weight")[0])
  rel = {i: shapes.get(f"vision_encoder.layers.{i}.attn.rel_pos_h") for i in range(layers)}
  v.setdefault("use_rel_pos", all(r is not None for r in rel.values()))
  if v["use_rel_pos"] and ("global_attn_indexes" not in v or "window_size" not in v):
    grid = v.get("image_size", nsam.SamVisionConfig.image_size) // v["patch_size"]
    glob = [i for i, r in rel.items() if r[0] == 2 * grid - 1]
    windows = sorted({(r[0] + 1) // 2 for i, r in rel.items() if i not in glob})
    if len(windows) > 1:
      raise ValueError(f"{where}: the windowed blocks' relative tables imply different window "
                       f"sizes {windows}; set vision_config.window_size and "
                       "global_attn_indexes in the config")
    v.setdefault("global_attn_indexes", glob)
    if windows:
      v.setdefault("window_size", windows[0])
  if "num_attention_heads" not in v:
    preset = nsam.vit_preset_for_hidden_size(v["hidden_size"])
    if preset is None:
      raise ValueError(
          f"{where}: the image encoder's head count cannot be read from tensor shapes and its "
          f"width {v['hidden_size']} matches no published SAM (768 ViT-B, 1024 ViT-L, 1280 "
          "ViT-H); give it in config.json or as load_sam(..., config={'vision_config': "
          "{'num_attention_heads': N}})")
    v["num_attention_heads"] = nsam.sam_config(preset).vision_config.num_attention_heads
  v.setdefault("num_pos_feats", need(_SHARED)[1])

  p = dict(raw.get("prompt_encoder_config") or {})
  p.setdefault("hidden_size", need("prompt_encoder.no_mask_embed.weight")[1])
  p.setdefault("mask_input_channels", need("prompt_encoder.mask_embed.conv2.weight")[0])
  p.setdefault("num_point_embeddings", _count(keys, r"^prompt_encoder\.point_embed\.(\d+)\."))
  p.setdefault("image_size", v.get("image_size", nsam.SamVisionConfig.image_size))
  p.setdefault("patch_size", v["patch_size"])

  d = dict(raw.get("mask_decoder_config") or {})
  dh = need("mask_decoder.iou_token.weight")[1]
  d.setdefault("hidden_size", dh)
  d.setdefault("num_multimask_outputs", need("mask_decoder.mask_tokens.weight")[0] - 1)
  d.setdefault("num_hidden_layers", _count(keys, r"^mask_decoder\.transformer\.layers\.(\d+)\."))
  d.setdefault("mlp_dim", need("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0])
  inner = need("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
  d.setdefault("attention_downsample_rate", max(1, dh // inner))
  d.setdefault("iou_head_hidden_dim", need("mask_decoder.iou_prediction_head.proj_in.weight")[0])
  d.setdefault("iou_head_depth",
               2 + _count(keys, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\."))
  if official:
    d.setdefault("layer_norm_eps", 1e-5)  # PyTorch's LayerNorm default in the official code
  return nsam.SamConfig.from_hf({**raw, "model_type": raw.get("model_type", "sam"),
                                 "vision_config": v, "prompt_encoder_config": p,
                                 "mask_decoder_config": d}, where)


# ----------------------------------------------------------------------------------------------
# Parameters.


@functools.lru_cache(maxsize=8)
def _expected(config: nsam.SamConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = config.vision_config.image_size
  c = config.vision_config.num_channels
  tree = jax.eval_shape(lambda: nsam.SamModel(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, s, s, c))))["params"]
  return {k: tuple(x.shape) for k, x in traverse_util.flatten_dict(tree).items()}


def expected_shapes(config: nsam.SamConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{Flax path: shape} of every parameter of `SamModel(config)` (from `jax.eval_shape`)."""
  return dict(_expected(config))


def _module_path(key: str) -> Tuple[str, ...]:
  """transformers key without its leaf -> Flax module path (`layers.3` -> `layers_3`)."""
  parts = key.split(".")[:-1]
  out = []
  for part in parts:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _hf_name(path: Tuple[str, ...]) -> str:
  """Flax path -> the transformers key it is read from (for error messages)."""
  parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


def _flax_shape(shape: Tuple[int, ...], leaf: str) -> Tuple[int, ...]:
  if leaf != "kernel" or len(shape) not in (2, 4):
    return tuple(shape)
  return tuple(shape[::-1]) if len(shape) == 2 else (shape[2], shape[3], shape[1], shape[0])


def _convert(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  return value


def params_from_weights(weights, config: nsam.SamConfig, where: str = "checkpoint",
                        dtype=np.float32) -> PyTree:
  """Flax params (numpy, nested dicts) of `SamModel(config)` from a transformers-named
  mapping (`.keys()`, `.shape(key)`, `[key]`).

  Raises:
    ValueError: unexpected or missing tensors, or shape mismatches (naming file, key, shapes).
  """
  expected = _expected(config)
  plan: Dict[Tuple[str, ...], str] = {}
  keys = list(weights.keys())
  for key in keys:
    if key == _SHARED_TIED:
      if _SHARED in keys:
        continue  # transformers' tied copy
      module, leaf = ("prompt_encoder", "shared_embedding"), "positional_embedding"
    else:
      module, leaf = _module_path(key), key.rsplit(".", 1)[-1]
    if leaf == "weight":
      leaf = next((name for name in ("kernel", "scale", "embedding")
                   if module + (name,) in expected), "kernel")
    path = module + (leaf,)
    src = getattr(weights, "source_key", lambda k: k)(key)
    if path not in expected:
      raise ValueError(f"{where}: unexpected tensor {src!r} {tuple(weights.shape(key))}: the "
                       f"config {_summary(config)} has no parameter {'/'.join(path)}")
    shape = tuple(weights.shape(key))
    want = expected[path]
    if _flax_shape(shape, leaf) != want:
      torch_want = want
      if leaf == "kernel":  # invert _flax_shape
        torch_want = want[::-1] if len(want) == 2 else (want[3], want[2], want[0], want[1])
      raise ValueError(f"{where}: tensor {src!r} has shape {shape}; the config "
                       f"{_summary(config)} implies {tuple(torch_want)}")
    plan[path] = key
  missing = sorted(set(expected) - set(plan))
  if missing:
    names = [_hf_name(p) for p in missing]
    raise ValueError(f"{where}: missing tensors {names[:8]}{' ...' if len(names) > 8 else ''}"
                     f" ({len(names)} of {len(expected)} parameters of a SAM with config "
                     f"{_summary(config)})")
  params = {}
  for path, key in plan.items():
    value = np.asarray(weights[key])
    params[path] = np.ascontiguousarray(_convert(value, path[-1]).astype(dtype))
  return traverse_util.unflatten_dict(params)


def _summary(config: nsam.SamConfig) -> str:
  v = config.vision_config
  return (f"(hidden {v.hidden_size}, {v.num_hidden_layers} blocks, global "
          f"{list(v.global_attn_indexes)}, window {v.window_size}, image {v.image_size})")


def _merge(a: Mapping, b: Optional[Mapping]) -> dict:
  out = dict(a)
  for k, val in (b or {}).items():
    out[k] = _merge(out.get(k) or {}, val) if isinstance(val, Mapping) else val
  return out


def load_sam(path: str, *, allow_pickle: bool = False, dtype=np.float32,
             config: Optional[Mapping[str, Any]] = None,
             prefix: str = "") -> Tuple[nsam.SamConfig, PyTree]:
  """(SamConfig, params) from a SAM checkpoint; see the module docstring.

  Args:
    path: a transformers SamModel directory (config.json optional), a `.safetensors` file,
      or an official `sam_vit_*.pth`.
    allow_pickle: read PyTorch pickles (they can execute code; needs torch).
    dtype: dtype of the returned arrays (numpy float32 by default; `ml_dtypes.bfloat16`...).
    config: transformers-layout config fields that override config.json (nested dicts:
      `{'vision_config': {'num_attention_heads': 12}}`).
    prefix: read only the tensors whose keys start with it, without it: the SAM part of a
      larger checkpoint (LISA-style models keep it under 'model.visual_model.').

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: a pickle without allow_pickle; a file that is not a SAM checkpoint; missing
      or unexpected tensors or shapes that do not fit the config (named).
  """
  weights, where, raw = _open(path, allow_pickle)
  view, official = _hf_view(weights, where, prefix)
  shapes = {k: view.shape(k) for k in view.keys()}
  if _SHARED not in shapes and _SHARED_TIED in shapes:
    shapes[_SHARED] = shapes[_SHARED_TIED]
  cfg = infer_config(shapes, _merge(raw, config), where, official)
  return cfg, params_from_weights(view, cfg, where, dtype)
