"""Loads Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`)
into fssjax's LoRA layout (Hu et al. 2021; `fssjax.nn.lora`), and merges them.

PEFT (`peft.PeftModel.save_pretrained`) stores, for each adapted linear layer,

  base_model.model.<module path>.lora_A.weight   [r, in]   -> <path>/lora_A/kernel [in, r]
  base_model.model.<module path>.lora_B.weight   [out, r]  -> <path>/lora_B/kernel [r, out]

with `r`, `lora_alpha`, `lora_dropout`, `use_rslora` and `target_modules` (a list of module
names or a regex) in adapter_config.json. Adapters of the LLM of a `LlamaForCausalLM`
(`model.layers.N.<self_attn|mlp>.<proj>`) and of a LLaVA model's language model
(`model.language_model.layers.N...` as transformers 5 names it, or the older
`language_model.model.layers.N...`) are read; LoRA on the vision tower, DoRA, LoRA biases,
per-module rank / alpha patterns and `modules_to_save` are not supported and raise.

Functions:
  read_adapter_config(directory) -> LoraSettings
  load_peft_adapter(directory, config=None) -> (LoraSettings, tree)   # tree: LLM layout
    {'model': {'layers_N': {'self_attn': {'q_proj': {'lora_A': {'kernel'}, 'lora_B': ...}}}}}
    `config` (a LlamaConfig) checks the rank, alpha, rsLoRA, targets and shapes.
  apply_peft_adapter(config, params, directory) -> (config, params)
    config: a LlamaConfig or a LlavaConfig; the returned config has the adapter's lora_*
    fields, the params its factors (`scan_layers`-stacked trees get stacked factors).
  merge_lora(params, alpha, use_rslora=False)  (from fssjax.nn.lora)

Every problem raises one ValueError / FileNotFoundError naming the file, the key or field,
the value found and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Tuple

import numpy as np

from fssjax.nn import llama as nl
from fssjax.nn.lora import merge_lora, merge_trees  # noqa: F401  (merge_lora re-exported)
from fssjax.weights import tensors

PyTree = Any
__all__ = ["LoraSettings", "read_adapter_config", "load_peft_adapter", "apply_peft_adapter",
           "merge_lora"]

_KEY = re.compile(r"^base_model\.model\.(?P<prefix>model\.language_model\.|language_model\.model\."
                  r"|model\.)layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
                  r"(?P<proj>[a-z_]+)\.(?P<factor>lora_A|lora_B)\.weight$")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """The adapter_config.json fields that define the computation."""

  r: int
  lora_alpha: float
  lora_dropout: float
  use_rslora: bool
  target_modules: Any  # list of names or a regex string, as PEFT stores it
  targets: tuple = ()  # the projection names that hold factors in the weights

  def apply_to(self, config: nl.LlamaConfig) -> nl.LlamaConfig:
    """`config` with lora_rank / lora_alpha / lora_dropout / lora_targets / rsLoRA set."""
    return dataclasses.replace(config, lora_rank=self.r, lora_alpha=float(self.lora_alpha),
                               lora_dropout=float(self.lora_dropout),
                               lora_targets=tuple(self.targets),
                               lora_use_rslora=self.use_rslora).validate()


def read_adapter_config(directory: str) -> LoraSettings:
  """LoraSettings from `<directory>/adapter_config.json` (targets filled by the loader)."""
  path = os.path.join(directory, "adapter_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no adapter_config.json in {directory} (a PEFT adapter directory "
                            "has adapter_config.json and adapter_model.safetensors)")
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e
  if raw.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type = {raw.get('peft_type')!r}; only 'LORA' adapters are "
                     "supported")
  unsupported = [(k, raw.get(k)) for k in ("use_dora", "lora_bias", "modules_to_save",
                                           "rank_pattern", "alpha_pattern", "layers_to_transform",
                                           "trainable_token_indices", "target_parameters")
                 if raw.get(k)]
  if raw.get("bias", "none") != "none":
    unsupported.append(("bias", raw["bias"]))
  if unsupported:
    k, v = unsupported[0]
    raise ValueError(f"{path}: {k} = {v!r} is not supported; fssjax loads plain LoRA adapters "
                     "(one rank and alpha for all layers, no DoRA, no biases or saved modules)")
  try:
    r, alpha = int(raw["r"]), float(raw["lora_alpha"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{path}: needs integer 'r' and number 'lora_alpha' fields (found r = "
                     f"{raw.get('r')!r}, lora_alpha = {raw.get('lora_alpha')!r})") from None
  return LoraSettings(r=r, lora_alpha=alpha, lora_dropout=float(raw.get("lora_dropout") or 0.0),
                      use_rslora=bool(raw.get("use_rslora", False)),
                      target_modules=raw.get("target_modules"))


def _open_adapter(directory: str):
  path = os.path.join(directory, "adapter_model.safetensors")
  if not os.path.exists(path):
    pickled = os.path.join(directory, "adapter_model.bin")
    hint = (" (found adapter_model.bin: PyTorch pickles are not read; convert it with "
            "safetensors.torch.save_file)" if os.path.exists(pickled) else "")
    raise FileNotFoundError(f"no adapter_model.safetensors in {directory}{hint}")
  return tensors.open_file(path), path


def load_peft_adapter(directory: str, config: Optional[nl.LlamaConfig] = None
                      ) -> Tuple[LoraSettings, PyTree]:
  """(settings, LoRA tree in the LLM layout) of a PEFT adapter; see the module docstring.

  Raises:
    FileNotFoundError: no adapter_config.json / adapter_model.safetensors.
    ValueError: unsupported adapter options, keys outside a LLaMA decoder's layers, a lora_A
      without its lora_B, factor shapes inconsistent with r, or (with `config`) a rank, alpha,
      rsLoRA or target set different from config's lora_* fields, or shapes that do not fit
      its layers.
  """
  settings = read_adapter_config(directory)
  files, path = _open_adapter(directory)
  flat, targets = {}, set()
  for key in files:
    m = _KEY.match(key)
    if not m:
      where = ("the vision tower" if "vision_tower" in key else
               "the projector" if "projector" in key else "a module outside the decoder layers")
      raise ValueError(f"{path}: tensor {key!r} adapts {where}; fssjax loads LoRA factors of "
                       "the LLaMA decoder layers only (base_model.model.[model.language_model. | "
                       "language_model.model. | model.]layers.N.<self_attn|mlp>.<proj>."
                       "lora_A|lora_B.weight)")
    proj = m["proj"]
    if proj not in nl.LORA_TARGETS:
      raise ValueError(f"{path}: tensor {key!r} adapts {proj!r}, which is not a LLaMA decoder "
                       f"projection {nl.LORA_TARGETS}")
    w = np.asarray(files[key], np.float32)
    rank_axis = 0 if m["factor"] == "lora_A" else 1
    if w.ndim != 2 or w.shape[rank_axis] != settings.r:
      raise ValueError(f"{path}: tensor {key!r} has shape {w.shape}; with r = {settings.r} "
                       f"(adapter_config.json) a {m['factor']}.weight is "
                       f"{'[r, in]' if rank_axis == 0 else '[out, r]'}")
    targets.add(proj)
    flat[("model", f"layers_{m['layer']}", m["block"], proj, m["factor"], "kernel")] = (
        np.ascontiguousarray(w.T))
  if not flat:
    raise ValueError(f"{path}: no LoRA tensors")
  for k in list(flat):
    other = k[:-2] + ("lora_B" if k[-2] == "lora_A" else "lora_A", "kernel")
    if other not in flat:
      raise ValueError(f"{path}: {'/'.join(k[:-2])} has {k[-2]} but no {other[-2]}")
  settings = dataclasses.replace(settings, targets=tuple(t for t in nl.LORA_TARGETS
                                                         if t in targets))
  if config is not None:
    _check_against(settings, config, flat, path)
  from flax import traverse_util
  return settings, traverse_util.unflatten_dict(flat)


def _check_against(settings: LoraSettings, config: nl.LlamaConfig, flat, path: str) -> None:
  if config.lora_rank and (
      (config.lora_rank, float(config.lora_alpha), config.lora_use_rslora,
       tuple(sorted(config.lora_targets))) !=
      (settings.r, settings.lora_alpha, settings.use_rslora, tuple(sorted(settings.targets)))):
    raise ValueError(
        f"{path}: the adapter has r = {settings.r}, lora_alpha = {settings.lora_alpha}, "
        f"use_rslora = {settings.use_rslora}, targets {list(settings.targets)}, but the model "
        f"config has lora_rank = {config.lora_rank}, lora_alpha = {config.lora_alpha}, "
        f"lora_use_rslora = {config.lora_use_rslora}, lora_targets "
        f"{list(config.lora_targets)}; use LoraSettings.apply_to(config) (or "
        "apply_peft_adapter) to take the adapter's settings")
  from fssjax.weights.llama import expected_shapes
  shapes = expected_shapes(dataclasses.replace(config, lora_rank=0))
  for k, v in flat.items():
    kernel = shapes.get(k[:-2] + ("kernel",))
    if kernel is None:
      raise ValueError(f"{path}: LoRA factors for {'/'.join(k[:-2])}, which a model with "
                       f"{config.num_hidden_layers} layers does not have")
    want = (kernel[0], settings.r) if k[-2] == "lora_A" else (settings.r, kernel[1])
    if v.shape != want:
      raise ValueError(f"{path}: {'/'.join(k[:-2])}/{k[-2]} has shape {v.shape[::-1]} (torch "
                       f"order); the layer's kernel {kernel} needs {want[::-1]}")


def apply_peft_adapter(config, params, directory: str):
  """(config with the adapter's lora_* settings, params with its factors added).

  `config` is a LlamaConfig (params a LlamaForCausalLM tree) or a LlavaConfig (params a
  LLaVA tree; the factors go to `language_model`). Trees in the `scan_layers` layout get
  stacked factors. Raises as `load_peft_adapter`, and ValueError when params already hold
  LoRA factors.
  """
  llava = hasattr(config, "text") and hasattr(config, "vision")
  text = config.text if llava else config
  lm = params["language_model"] if llava else params
  base_text = dataclasses.replace(text, lora_rank=0)
  settings, tree = load_peft_adapter(directory, base_text)
  from fssjax.nn.lora import split_lora
  existing, _ = split_lora(lm)
  if existing:
    raise ValueError(f"{directory}: the parameters already hold LoRA factors; merge_lora or "
                     "split_lora them before applying another adapter")
  block = {t: ("mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn")
           for t in settings.targets}
  missing = [f"layers_{i}/{block[t]}/{t}" for i in range(text.num_hidden_layers)
             for t in settings.targets
             if t not in tree["model"].get(f"layers_{i}", {}).get(block[t], {})]
  if missing:
    raise ValueError(f"{directory}: the adapter has no factors for {missing[:4]}; fssjax's "
                     f"LoRA adapts {list(settings.targets)} in every layer (per-layer subsets "
                     "are not supported)")
  if "layers" in lm.get("model", {}):  # scan_layers layout
    tree = nl.stack_layers(tree)
  new_text = settings.apply_to(text)
  lm = merge_trees(lm, tree)
  if llava:
    return dataclasses.replace(config, text=new_text), {**params, "language_model": lm}
  return new_text, lm
