"""Builds the tiny diffusers / transformers fixtures under tests/fixtures/diffusers/.

The tests of fssjax's Stable-Diffusion modules (tests/test_unet.py, test_vae.py,
test_clip_text.py, test_diffusers_weights.py) read these files and need neither torch nor
diffusers. To regenerate (outputs are deterministic for a given torch / diffusers version):

  pip install torch==2.14.1 diffusers    # plus transformers, already a dependency
  python scripts/make_diffusers_fixtures.py

What is written (every array NHWC / [B, T, D]; the script transposes to torch's NCHW and back):

  sd15_tiny/            a full pipeline root (model_index.json, unet/, vae/, text_encoder/,
                        tokenizer/): SD-1.5-like UNet (conv proj_in/out, one head count),
                        AutoencoderKL, CLIP text encoder (quick_gelu, keys with the published
                        `text_model.` prefix and the `position_ids` buffer), a tiny BPE tokenizer.
  sd21_tiny/            SD-2.1-like UNet (use_linear_projection, per-block head counts:
                        2 in the outer blocks, 4 in the mid block; upcast_attention) with the
                        DiffewS K/V-bank reference, and a CLIP text encoder with gelu saved the
                        way transformers 5 saves it (no `text_model.` prefix).
  unet_variants/        a UNet exercising the rest of the supported config surface
                        (scale_shift, mish, only_cross_attention, transformer_layers_per_block,
                        UNetMidBlock2D, downsample_padding 0, 1x1 conv_in/out, odd input size...).
  reference.npz         inputs and PyTorch outputs, keys `<name>/<what>` (see below).

Weights are stored as float16 safetensors (like the published fp16 variants); the reference
outputs were computed in float32 from those same float16-rounded weights, so a float32 forward
in JAX must match them to float32 round-off.

The K/V-bank reference implements DiffewS (aim-uofa/DiffewS `attention_processor_v2.py`) as a
diffusers attention processor on every `attn1`: the support pass (batch B*K, supports of
query b at rows b*K..b*K+K-1, through a separate 8-channel input conv as in DiffewS) records
each attn1's K and V (the to_k / to_v outputs); the query pass concatenates
[own K/V, the K supports' K/V] along the token axis; queries stay the query's own.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fssjax.utils import atomic_write_bytes, atomic_write_json  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "diffusers")

SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=32, norm_num_groups=8, use_linear_projection=False)

SD21_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=[2, 4],
    cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
    upcast_attention=True)

VARIANTS_UNET = dict(
    sample_size=12, in_channels=3, out_channels=5,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[8, 16], layers_per_block=[1, 2], transformer_layers_per_block=[2, 1],
    attention_head_dim=[2, 4], only_cross_attention=[False, True], cross_attention_dim=24,
    norm_num_groups=4, norm_eps=1e-6, mid_block_type="UNetMidBlock2D",
    mid_block_scale_factor=1.5, resnet_time_scale_shift="scale_shift", act_fn="mish",
    center_input_sample=True, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    conv_in_kernel=1, conv_out_kernel=1, time_embedding_dim=24, time_embedding_act_fn="silu",
    timestep_post_act="gelu")

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8)


# ---------------------------------------------------------------------------------------------
# Helpers.


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
  """Adds noise to every parameter (norm scales/biases would otherwise be exactly 1/0), then
  rounds to float16 so the stored fp16 weights are exactly the ones the reference used."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
      p.copy_(p.half().float())


def write_safetensors(path: str, tensors: dict) -> None:
  tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
  atomic_write_bytes(path, st_save(tensors, metadata={"format": "pt"}))


def save_diffusers_model(model, directory: str) -> None:
  """config.json + diffusion_pytorch_model.safetensors (float16), like save_pretrained."""
  os.makedirs(directory, exist_ok=True)
  atomic_write_json(os.path.join(directory, "config.json"), json.loads(model.to_json_string()),
                    indent=2, sort_keys=True)
  state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
  write_safetensors(os.path.join(directory, "diffusion_pytorch_model.safetensors"), state)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32)


class BankProcessor:
  """DiffewS's self-attention K/V bank as a diffusers attention processor (for attn1)."""

  def __init__(self, name: str, state: dict):
    self.name = name
    self.state = state

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, **kwargs):
    assert encoder_hidden_states is None and attention_mask is None
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    mode = self.state["mode"]
    if mode == "write":
      self.state["bank"][self.name] = (key, value)
    elif mode == "read":
      k_bank, v_bank = self.state["bank"][self.name]
      b = query.shape[0]
      # [B*K, S, C] -> [B, K*S, C]: the K supports of query b are rows b*K .. b*K+K-1.
      k_bank = k_bank.reshape(b, -1, k_bank.shape[-1])
      v_bank = v_bank.reshape(b, -1, v_bank.shape[-1])
      key = torch.cat([key, k_bank], dim=1)
      value = torch.cat([value, v_bank], dim=1)
    b, t, inner = query.shape
    hd = inner // attn.heads
    split = lambda a: a.view(b, -1, attn.heads, hd).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    out = out.transpose(1, 2).reshape(b, t, inner)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def install_bank(unet) -> dict:
  state = {"mode": None, "bank": {}}
  procs = {}
  for name, proc in unet.attn_processors.items():
    module_path = name[: -len(".processor")]
    if module_path.endswith("attn1"):
      block = unet.get_submodule(module_path.rsplit(".", 1)[0])
      if not block.only_cross_attention:
        procs[name] = BankProcessor(module_path, state)
        continue
    procs[name] = proc
  unet.set_attn_processor(procs)
  return state


# ---------------------------------------------------------------------------------------------
# Components.


def make_unet(name: str, config: dict, seed: int, out: dict, rng: np.random.Generator,
              height: int, width: int, bank: bool) -> None:
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**config).eval()
  perturb_(unet, seed + 1)
  save_diffusers_model(unet, os.path.join(ROOT, name, "unet"))
  b, tokens = 2, 5
  ctx_dim = config["cross_attention_dim"]
  sample = rng.standard_normal((b, height, width, config["in_channels"])).astype(np.float32)
  context = rng.standard_normal((b, tokens, ctx_dim)).astype(np.float32)
  timesteps = np.array([1, 981], np.int64)
  with torch.no_grad():
    y = unet(nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  out.update({f"{name}/sample": sample, f"{name}/context": context,
              f"{name}/timesteps": timesteps, f"{name}/out": nhwc(y)})
  if not bank:
    return
  # DiffewS: K = 2 supports per query through an 8-channel input conv, timestep 1.
  shots = 2
  conv_in_ref = torch.nn.Conv2d(8, config["block_out_channels"][0], 3, padding=1)
  perturb_(conv_in_ref, seed + 2)
  support = rng.standard_normal((b * shots, height, width, 8)).astype(np.float32)
  support_ctx = np.repeat(context, shots, axis=0)
  state = install_bank(unet)
  original_conv_in = unet.conv_in
  with torch.no_grad():
    state["mode"] = "write"
    unet.conv_in = conv_in_ref
    unet(nchw(support), 1, torch.from_numpy(support_ctx))
    unet.conv_in = original_conv_in
    state["mode"] = "read"
    y_bank = unet(nchw(sample), 1, torch.from_numpy(context)).sample
    state["mode"] = None
    y_plain_t1 = unet(nchw(sample), 1, torch.from_numpy(context)).sample
  first = sorted(state["bank"])[0]
  k0, v0 = state["bank"][first]
  out.update({
      f"{name}/support": support, f"{name}/support_context": support_ctx,
      f"{name}/conv_in_ref_weight": conv_in_ref.weight.detach().numpy(),  # OIHW
      f"{name}/conv_in_ref_bias": conv_in_ref.bias.detach().numpy(),
      f"{name}/bank_out": nhwc(y_bank), f"{name}/plain_t1_out": nhwc(y_plain_t1),
      f"{name}/bank_first_key": np.array(first),
      f"{name}/bank_first_k": k0.numpy(), f"{name}/bank_first_v": v0.numpy(),
  })


def make_vae(name: str, seed: int, out: dict, rng: np.random.Generator) -> None:
  torch.manual_seed(seed)
  vae = AutoencoderKL(**VAE).eval()
  perturb_(vae, seed + 1)
  save_diffusers_model(vae, os.path.join(ROOT, name, "vae"))
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(nchw(x)).latent_dist
    dec = vae.decode(nchw(z)).sample
    rec = vae(nchw(x), sample_posterior=False).sample
  out.update({f"{name}/vae_x": x, f"{name}/vae_mean": nhwc(dist.mean),
              f"{name}/vae_logvar": nhwc(dist.logvar), f"{name}/vae_z": z,
              f"{name}/vae_decoded": nhwc(dec), f"{name}/vae_reconstruction": nhwc(rec)})


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


MERGES = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("c", "a"), ("ca", "t</w>"),
          ("d", "o"), ("do", "g</w>")]


def make_tokenizer(directory: str) -> dict:
  """A tiny CLIP BPE vocabulary built like OpenAI's (bytes, bytes</w>, merges, specials)."""
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  encoder = {tok: i for i, tok in enumerate(vocab)}
  os.makedirs(directory, exist_ok=True)
  atomic_write_json(os.path.join(directory, "vocab.json"), encoder, ensure_ascii=False)
  merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
  atomic_write_bytes(os.path.join(directory, "merges.txt"), merges.encode("utf-8"))
  atomic_write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "CLIPTokenizer", "model_max_length": 16,
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True},
                    indent=2)
  atomic_write_json(os.path.join(directory, "special_tokens_map.json"), {
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2)
  return encoder


def make_text_encoder(name: str, seed: int, act: str, prefixed: bool, vocab: dict, out: dict,
                      rng: np.random.Generator) -> None:
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act=act, layer_norm_eps=1e-5,
      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"])
  model = transformers.CLIPTextModel(config).eval()
  perturb_(model, seed + 1)
  directory = os.path.join(ROOT, name, "text_encoder")
  os.makedirs(directory, exist_ok=True)
  config_dict = dict(config.to_dict(), architectures=["CLIPTextModel"])
  atomic_write_json(os.path.join(directory, "config.json"), config_dict, indent=2,
                    sort_keys=True)
  state = {k: v.half() for k, v in model.state_dict().items()}
  if prefixed:
    # The published SD checkpoints (transformers 4) carry a `text_model.` prefix and the
    # position_ids buffer.
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(16, dtype=torch.int64)[None]
  write_safetensors(os.path.join(directory, "model.safetensors"), state)
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  ids = np.full((3, 16), eos, np.int64)
  ids[:, 0] = bos
  ids[0, 1:4] = [vocab["photo</w>"], vocab["a</w>"], eos]
  ids[1, 1:7] = rng.integers(0, 512, 6)
  ids[1, 7] = eos
  ids[2, 1:15] = rng.integers(0, 512, 14)  # eos only at the end
  mask = np.ones_like(ids)
  mask[0, 5:] = 0
  with torch.no_grad():
    o = model(torch.from_numpy(ids), output_hidden_states=True)
    om = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  out.update({f"{name}/text_ids": ids, f"{name}/text_mask": mask,
              f"{name}/text_last": o.last_hidden_state.numpy(),
              f"{name}/text_pooled": o.pooler_output.numpy(),
              f"{name}/text_hidden1": o.hidden_states[1].numpy(),
              f"{name}/text_last_masked": om.last_hidden_state.numpy()})


def main() -> None:
  torch.set_grad_enabled(False)
  os.makedirs(ROOT, exist_ok=True)
  rng = np.random.default_rng(0)
  out: dict = {}
  make_unet("sd15_tiny", SD15_UNET, 100, out, rng, 16, 16, bank=False)
  make_unet("sd21_tiny", SD21_UNET, 200, out, rng, 16, 16, bank=True)
  make_unet("unet_variants", VARIANTS_UNET, 300, out, rng, 9, 12, bank=False)
  make_vae("sd15_tiny", 400, out, rng)
  vocab = make_tokenizer(os.path.join(ROOT, "sd15_tiny", "tokenizer"))
  make_text_encoder("sd15_tiny", 500, "quick_gelu", True, vocab, out, rng)
  make_text_encoder("sd21_tiny", 600, "gelu", False, vocab, out, rng)
  tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(ROOT, "sd15_tiny", "tokenizer"))
  enc = tok(["a photo", "cat dog"], padding="max_length", max_length=16)
  out["sd15_tiny/tokenized"] = np.array(enc["input_ids"], np.int64)
  atomic_write_json(os.path.join(ROOT, "sd15_tiny", "model_index.json"), {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"]}, indent=2)
  buf = io.BytesIO()
  np.savez_compressed(buf, **out)
  atomic_write_bytes(os.path.join(ROOT, "reference.npz"), buf.getvalue())
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  print(f"wrote {ROOT} ({total / 1e6:.2f} MB) with torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
  main()
