"""Builds the tiny LLaVA / CLIP-vision / LoRA fixtures under tests/fixtures/llava/ (read by
tests/test_clip_vision.py, tests/test_llava.py and tests/test_lora.py; no torch there).

To regenerate (deterministic for a given torch / transformers / peft version):

  pip install torch==2.13.0 peft==0.21.2     # transformers is already a dependency
  python scripts/make_llava_fixtures.py

A random transformers `LlavaForConditionalGeneration` with a tiny CLIP tower (hidden 16,
2 layers, 2 heads, 16 x 16 images, patch 4: 16 patches + [CLS]) and a tiny Llama (hidden 24,
2 layers, 4 heads / 2 KV heads, vocab 64, image token 60); all weights perturbed (norms not
exactly 1) and rounded to float16, so the float32 forwards below are exact references for a
float32 JAX forward of the stored weights. Written:

  hf/             `save_pretrained` of the model in float16: what transformers 5 writes
                  (`vision_tower.embeddings.*` without `vision_model.`,
                  `multi_modal_projector.*`, `language_model.model.*`,
                  `language_model.lm_head.weight`), config.json.
  hub_old/        the same tensors under the names of the older llava-hf hub files
                  (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
                  `language_model.model.*`, `language_model.lm_head.weight`) in two shards with
                  `model.safetensors.index.json`, and an old-style config.json that omits the
                  fields a loader must infer from the tensors (sizes, layer counts).
  v452/           the names of transformers 4.52-4.57 (`model.vision_tower.vision_model.*`,
                  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`).
  original/       haotian-liu/LLaVA's layout (`LlavaLlamaForCausalLM`): `model.layers.*`,
                  `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`, the
                  projector as `model.mm_projector.0/2.*`, a flat llama config.json with
                  `mm_vision_select_layer` / `mm_vision_select_feature` / `mm_projector_type`,
                  and no vision tower (it is loaded from clip/).
  clip/           the vision tower alone, `CLIPVisionModel.save_pretrained` (`vision_model.*`).
  adapter/        a PEFT LoRA adapter (`get_peft_model(model, LoraConfig(r=4, lora_alpha=16,
                  target_modules=<regex: the language model's q_proj and v_proj>,
                  lora_dropout=0.05))`, lora_A and lora_B set to random nonzero values),
                  saved by PEFT (`adapter_config.json`, `adapter_model.safetensors`).
  reference.npz   pixel_values [2, 16, 16, 3] (NHWC), input_ids [2, 30] (one image of 16
                  image tokens per row, at different offsets), clip/hidden_states_{0,1,2}
                  [2, 17, 16], clip/last_hidden_state, clip/pooler_output [2, 16],
                  image_features [2, 16, 24] (projected), logits [2, 30, 64],
                  lora_logits [2, 30, 64] (the adapter applied, dropout off).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "llava")

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              projection_dim=8)
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=1e4, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)
IMAGE_TOKEN = 60


def build() -> transformers.LlavaForConditionalGeneration:
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION),
      text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
      image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu")
  model = transformers.LlavaForConditionalGeneration(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
      p.copy_(p.half().float())
  return model


def rename(key: str, layout: str) -> str:
  """A key as transformers 5's save_pretrained writes it (`vision_tower.<CLIP names>`,
  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`) ->
  the old llava-hf hub names (layout 'hub_old': `vision_tower.vision_model.*`) or the
  transformers 4.52-4.57 names (layout 'v452': `model.vision_tower.vision_model.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`)."""
  if key.startswith("vision_tower."):
    key = "vision_tower.vision_model." + key[len("vision_tower."):]
  if layout == "hub_old":
    return key
  for old, new in (("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector."),
                   ("language_model.model.", "model.language_model."),
                   ("language_model.lm_head.", "lm_head.")):
    if key.startswith(old):
      return new + key[len(old):]
  raise KeyError(key)


def save_sharded(state: dict, directory: str, shards: int) -> None:
  keys = sorted(state)
  weight_map = {}
  for i in range(shards):
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = keys[i::shards]
    save_file({k: state[k] for k in part}, os.path.join(directory, fname),
              metadata={"format": "pt"})
    weight_map.update({k: fname for k in part})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1)


def main():
  if os.path.exists(ROOT):
    shutil.rmtree(ROOT)
  os.makedirs(ROOT)
  model = build()
  ref = {}

  # Inputs: one image per row, 16 expanded image tokens at offsets 3 and 8.
  rng = np.random.default_rng(0)
  t = 30
  ids = rng.integers(3, 56, size=(2, t)).astype(np.int64)
  ids[0, 3:19] = IMAGE_TOKEN
  ids[1, 8:24] = IMAGE_TOKEN
  pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  ref["input_ids"] = ids.astype(np.int32)
  ref["pixel_values"] = pixels.transpose(0, 2, 3, 1)
  with torch.no_grad():
    tower = model.model.vision_tower
    out = tower(torch.from_numpy(pixels), output_hidden_states=True)
    for i, h in enumerate(out.hidden_states):
      ref[f"clip/hidden_states_{i}"] = h.numpy()
    ref["clip/last_hidden_state"] = out.last_hidden_state.numpy()
    ref["clip/pooler_output"] = out.pooler_output.numpy()
    feats = model.model.get_image_features(torch.from_numpy(pixels),
                                           vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    ref["image_features"] = torch.stack(list(feats)).numpy()
    ref["logits"] = model(input_ids=torch.from_numpy(ids),
                          pixel_values=torch.from_numpy(pixels)).logits.numpy()

  # hf/: transformers' own naming.
  half = build().half()  # the same (fp16-exact) weights
  hf_dir = os.path.join(ROOT, "hf")
  half.save_pretrained(hf_dir)
  state = load_file(os.path.join(hf_dir, "model.safetensors"))
  print("hf keys:", sorted({".".join(k.split(".")[:3]) for k in state}))

  # hub_old/: renamed keys, sharded, a sparse config.
  old_dir = os.path.join(ROOT, "hub_old")
  os.makedirs(old_dir)
  save_sharded({rename(k, "hub_old"): v for k, v in state.items()}, old_dir, 2)
  old_config = {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
      "image_token_index": IMAGE_TOKEN, "projector_hidden_act": "gelu",
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
      "text_config": {"model_type": "llama", "num_attention_heads": 4,
                      "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e4,
                      "max_position_embeddings": 64},
      "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                        "num_attention_heads": 2},
  }
  with open(os.path.join(old_dir, "config.json"), "w") as f:
    json.dump(old_config, f, indent=1)

  # v452/: transformers 4.52-4.57 names, config.json as written by transformers 5.
  new_dir = os.path.join(ROOT, "v452")
  os.makedirs(new_dir)
  save_file({rename(k, "v452"): v for k, v in state.items()},
            os.path.join(new_dir, "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(os.path.join(hf_dir, "config.json"), new_dir)

  # original/: haotian-liu/LLaVA's names, no tower.
  orig_dir = os.path.join(ROOT, "original")
  os.makedirs(orig_dir)
  orig = {}
  for k, v in state.items():
    if k.startswith("language_model.model."):
      orig["model." + k[len("language_model.model."):]] = v
    elif k == "language_model.lm_head.weight":
      orig["lm_head.weight"] = v
    elif k.startswith("multi_modal_projector."):
      m = re.match(r"multi_modal_projector\.linear_(\d)\.(weight|bias)", k)
      orig[f"model.mm_projector.{0 if m.group(1) == '1' else 2}.{m.group(2)}"] = v
  save_file(orig, os.path.join(orig_dir, "model.safetensors"), metadata={"format": "pt"})
  orig_config = dict(TEXT, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                     hidden_act="silu", mm_vision_tower="openai/clip-vit-large-patch14-336",
                     mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                     mm_projector_type="mlp2x_gelu", mm_hidden_size=VISION["hidden_size"],
                     mm_use_im_start_end=False, mm_use_im_patch_token=False)
  with open(os.path.join(orig_dir, "config.json"), "w") as f:
    json.dump(orig_config, f, indent=1)

  # clip/: the tower as a CLIPVisionModel.
  half.model.vision_tower.save_pretrained(os.path.join(ROOT, "clip"))

  # adapter/: PEFT LoRA on the language model's q_proj / v_proj.
  lora_config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05,
                                target_modules=r".*language_model.*\.(q_proj|v_proj)")
  pm = peft.get_peft_model(build(), lora_config).eval()
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_((0.2 * torch.randn(p.shape, generator=g)).half().float())
    ref["lora_logits"] = pm(input_ids=torch.from_numpy(ids),
                            pixel_values=torch.from_numpy(pixels)).logits.numpy()
  pm.save_pretrained(os.path.join(ROOT, "adapter"))
  ad = load_file(os.path.join(ROOT, "adapter", "adapter_model.safetensors"))
  print("adapter keys:", sorted(ad)[:2], len(ad))

  np.savez_compressed(os.path.join(ROOT, "reference.npz"), **ref)
  for d, _, fs in os.walk(ROOT):
    for f in fs:
      if f == "README.md":
        os.remove(os.path.join(d, f))  # PEFT's model card: not needed
      else:
        os.chmod(os.path.join(d, f), 0o644)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  print(f"wrote {ROOT} ({total / 1024:.0f} KiB), transformers {transformers.__version__}, "
        f"torch {torch.__version__}, peft {peft.__version__}")


if __name__ == "__main__":
  main()
