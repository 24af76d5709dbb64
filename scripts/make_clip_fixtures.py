"""Builds the tiny CLIPModel fixture under tests/fixtures/clip/ (read by tests/test_clip_model.py
and tests/test_llafs.py; no torch there).

To regenerate (deterministic for a given torch / transformers version):

  pip install torch==2.13.0            # transformers is already a dependency
  python scripts/make_clip_fixtures.py

A random transformers `CLIPModel`: vision tower hidden 16, 2 layers, 2 heads, 32 x 32 images,
patch 8 (16 patches + [CLS]); text tower hidden 16, 2 layers, 2 heads, 64 positions; both
projected to 8 dimensions. Every weight is perturbed (norms not exactly 1) and rounded to
float16, so the float32 forwards below are exact references for a float32 JAX forward of the
stored weights. The tokenizer is a tiny CLIP BPE vocabulary built like OpenAI's (every byte,
every byte + `</w>`, a few merges, the two special tokens; lower-casing), as in
scripts/make_diffusers_fixtures.py. Written:

  tiny/           `CLIPModel.save_pretrained` in float16 (config.json with text_config and
                  vision_config, model.safetensors: `vision_model.*`, `text_model.*`,
                  `visual_projection.weight`, `text_projection.weight`, `logit_scale`) and the
                  tokenizer (vocab.json, merges.txt, tokenizer_config.json,
                  special_tokens_map.json).
  reference.npz   pixel_values [2, 32, 32, 3] (NHWC, CLIP-normalised), input_ids [3, 16] and
                  attention_mask [3, 16] (the tokenizer's output for TEXTS, padded to 16),
                  image_embeds [2, 8] (`get_image_features`), text_embeds [3, 8]
                  (`get_text_features`), logits_per_image [2, 3].
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "clip")

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_SIZES = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
PROJECTION_DIM = 8
TEXTS = ["red colour", "a photo of a cat", "the shape of a star"]
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "o"), ("co", "l"), ("s", "t"), ("st", "a"),
          ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"),
          ("pho", "to</w>")]


def bytes_to_unicode() -> dict:
  """OpenAI CLIP's reversible byte -> unicode table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer(directory: str) -> dict:
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  encoder = {tok: i for i, tok in enumerate(vocab)}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(encoder, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=64,
                   do_lower_case=True), f, indent=2)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  return encoder


def main():
  if os.path.exists(ROOT):
    shutil.rmtree(ROOT)
  tiny = os.path.join(ROOT, "tiny")
  vocab = make_tokenizer(tiny)
  torch.manual_seed(0)
  text = transformers.CLIPTextConfig(vocab_size=len(vocab), **TEXT_SIZES,
                                     bos_token_id=vocab["<|startoftext|>"],
                                     eos_token_id=vocab["<|endoftext|>"],
                                     pad_token_id=vocab["<|endoftext|>"])
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=VISION,
                                   projection_dim=PROJECTION_DIM)
  model = transformers.CLIPModel(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
      p.copy_(p.half().float())
  tok = transformers.CLIPTokenizer.from_pretrained(tiny)
  enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ids = torch.from_numpy(enc["input_ids"].astype(np.int64))
    att = torch.from_numpy(enc["attention_mask"].astype(np.int64))
    img = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    txt = model.get_text_features(input_ids=ids, attention_mask=att)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    out = model(input_ids=ids, attention_mask=att, pixel_values=torch.from_numpy(pixels))
  ref = {"pixel_values": pixels.transpose(0, 2, 3, 1), "input_ids": enc["input_ids"]
         .astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
         "image_embeds": img.numpy(), "text_embeds": txt.numpy(),
         "logits_per_image": out.logits_per_image.numpy()}
  model.half().save_pretrained(tiny, safe_serialization=True)
  np.savez(os.path.join(ROOT, "reference.npz"), **ref)
  with open(os.path.join(ROOT, "README.md"), "w") as f:
    f.write("# Tiny CLIPModel fixture\n\nWritten by `scripts/make_clip_fixtures.py` (torch "
            f"{torch.__version__}, transformers {transformers.__version__}; deterministic); "
            "see its docstring for the contents. Texts of the reference: "
            f"{TEXTS}.\n")
  print({k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
  main()
