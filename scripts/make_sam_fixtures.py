"""Builds the tiny SAM fixtures under tests/fixtures/sam/ (read by tests/test_sam.py).

The tests of fssjax's SAM modules and loader need neither torch nor transformers. To
regenerate (deterministic for a given torch / transformers version):

  pip install torch==2.13.0    # transformers is already a dependency
  pip install --no-deps segment-anything==1.0    # the official SAM code (its modeling part)
  python scripts/make_sam_fixtures.py

What is written (a random transformers `SamModel`: image 32, patch 4 -> an 8 x 8 grid,
hidden 16, 3 blocks with block 1 global and windows of 3 -- the grid is zero-padded to 9,
2 heads, MLP 32, 16 output channels; decoder width 16, 2 heads, MLP 32; every parameter
redrawn so that LayerNorms, the position embedding and the relative tables are not trivial
and the outputs are of order one, then rounded to float16):

  hf/                `SamModel.save_pretrained` of the float16 model: config.json +
                     model.safetensors (transformers keeps only the tied
                     `shared_image_embedding.positional_embedding`).
  official.safetensors  the same tensors under the official segment-anything names
                     (image_encoder.blocks.N.attn.qkv, prompt_encoder.pe_layer...,
                     mask_decoder.output_upscaling.0, ...; plus `pixel_mean` / `pixel_std`,
                     which the official release omits (non-persistent buffers) but re-saved
                     copies carry: the loader drops them), float16. The official
                     release is a pickle (`torch.save` of such a state dict); the tests
                     cannot read pickles without torch, so this script itself writes that
                     pickle to a temporary directory and checks that
                     `fssjax.weights.sam.load_sam(..., allow_pickle=True)` reads it into
                     exactly the parameters of the safetensors copy.
  reference.npz      outputs of the model computed in float64 (the exact result for these
                     float16-rounded weights and inputs), stored as float32:
    pixel_values [2, 32, 32, 3] (NHWC; float16, the exact inputs), hidden_states
    [3, 2, 8, 8, 16] (every block's output), image_embeddings [2, 8, 8, 16], image_pe
    [1, 8, 8, 16];
    prompt a (points + box + mask): a_points [2, 2, 2], a_labels [2, 2], a_boxes [2, 4],
    a_masks [2, 32, 32] (float16), a_sparse [2, 4, 16], a_dense [2, 8, 8, 16], a_masks_multi
    [2, 3, 32, 32], a_iou_multi [2, 3], a_masks_single [2, 1, 32, 32], a_iou_single [2, 1];
    prompt b (points only, labels with -1 and -10, no mask): b_points, b_labels,
    b_sparse [2, 3, 16] (a not-a-point appended), b_dense, b_masks_multi, b_iou_multi;
    get_rel_pos of a 7-row table: rel_table [7, 4], rel_5_5 [5, 5, 4] (interpolated to 9
    rows), rel_3_6 [3, 6, 4] (unequal query / key sizes);
    official_a_masks_multi [2, 3, 32, 32], official_a_iou_multi [2, 3]: prompt a through the
    official segment-anything modules (PyPI `segment-anything` 1.0; float64) built with the
    same sizes and loaded, strictly, with the official-named tensors. They differ from
    transformers' only through the two-way transformer's LayerNorm eps (1e-5 there, 1e-6 in
    transformers' config); the script checks that the official image encoder and prompt
    encoder give transformers' results.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from flax import traverse_util
from safetensors.torch import save_file
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "sam")

CONFIG = dict(
    vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=3,
                       num_attention_heads=2, image_size=32, patch_size=4, window_size=3,
                       global_attn_indexes=[1], num_pos_feats=8, mlp_dim=32),
    prompt_encoder_config=dict(hidden_size=16, image_size=32, patch_size=4,
                               mask_input_channels=8),
    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                             num_attention_heads=2, iou_head_hidden_dim=16))


def build() -> SamModel:
  torch.manual_seed(0)
  model = SamModel(SamConfig(**CONFIG)).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "rel_pos" in name or "pos_embed" in name:
        p.copy_(0.3 * noise)
      elif p.ndim == 1 and name.endswith(".weight"):  # LayerNorm scales
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:  # biases
        p.copy_(0.1 * noise)
      elif "positional_embedding" in name or "embed" in name or "token" in name:
        p.copy_(noise)  # Fourier matrix N(0, 1) as the official init; nn.Embedding tables
      else:  # Linear / Conv / ConvTranspose: unit-variance outputs
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
        if re.search(r"mask_decoder\..*\.(q_proj|k_proj)\.", name):
          p.mul_(0.4)  # moderate decoder attention logits: a well-conditioned reference
      p.copy_(p.half().float())
  return model


_OFFICIAL = [  # transformers -> segment-anything (inverse of convert_sam_to_hf.py's mapping)
    ("vision_encoder.", "image_encoder."),
    ("patch_embed.projection", "patch_embed.proj"),
    ("image_encoder.layers.", "image_encoder.blocks."),
    ("neck.conv1", "neck.0"), ("neck.layer_norm1", "neck.1"),
    ("neck.conv2", "neck.2"), ("neck.layer_norm2", "neck.3"),
    ("shared_embedding.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
    ("mask_embed.conv1", "mask_downscaling.0"), ("mask_embed.layer_norm1", "mask_downscaling.1"),
    ("mask_embed.conv2", "mask_downscaling.3"), ("mask_embed.layer_norm2", "mask_downscaling.4"),
    ("mask_embed.conv3", "mask_downscaling.6"),
    ("prompt_encoder.point_embed.", "prompt_encoder.point_embeddings."),
    ("upscale_conv1", "output_upscaling.0"), ("upscale_layer_norm", "output_upscaling.1"),
    ("upscale_conv2", "output_upscaling.3"),
    ("layer_norm_final_attn", "norm_final_attn"),
]


def official_state_dict(model: SamModel) -> dict:
  out = {}
  for key, v in model.state_dict().items():
    if key.startswith("shared_image_embedding."):
      continue  # the official model has the prompt encoder's copy only
    for a, b in _OFFICIAL:
      key = key.replace(a, b)
    key = re.sub(r"\.layer_norm(\d)\.", r".norm\1.", key)  # blocks and two-way layers
    m = re.match(r"(.*(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
                 r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", key)
    if m:
      head, part, k, leaf = m.groups()
      depth = 3  # both MLPs have 3 layers in this config
      idx = 0 if part == "proj_in" else depth - 1 if part == "proj_out" else int(k) + 1
      key = f"{head}.layers.{idx}.{leaf}"
    out[key] = v.detach().clone().half()
  out["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
  out["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
  return out


def check_official_pickle(official: dict) -> None:
  """The pickle path of the loader (torch needed, so checked here rather than in the tests)."""
  from fssjax.weights.sam import load_sam
  heads = {"vision_config": {"num_attention_heads": 2},
           "mask_decoder_config": {"num_attention_heads": 2}}
  with tempfile.TemporaryDirectory() as tmp:
    pth = os.path.join(tmp, "sam_vit_tiny.pth")
    torch.save(official, pth)
    cfg_a, params_a = load_sam(pth, allow_pickle=True, config=heads)
  cfg_b, params_b = load_sam(os.path.join(ROOT, "official.safetensors"), config=heads)
  assert cfg_a == cfg_b, (cfg_a, cfg_b)
  flat_a, flat_b = traverse_util.flatten_dict(params_a), traverse_util.flatten_dict(params_b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))
  print("official pickle read by load_sam(allow_pickle=True): identical parameters")


def official_modules():
  """segment_anything.modeling without the package's __init__ (its predictor imports
  torchvision, which the modeling code does not need)."""
  import importlib.util
  import types
  spec = importlib.util.find_spec("segment_anything")
  if spec is None:
    raise SystemExit("pip install --no-deps segment-anything==1.0 (the official SAM code)")
  pkg = types.ModuleType("segment_anything")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["segment_anything"] = pkg
  import segment_anything.modeling as sm  # pylint: disable=g-import-not-at-top
  return sm


def official_reference(official: dict, ref: dict, pixels, prompt) -> None:
  """Prompt a through the official Sam (float64), image by image as `Sam.forward` does."""
  sm = official_modules()
  v, p, d = (CONFIG["vision_config"], CONFIG["prompt_encoder_config"],
             CONFIG["mask_decoder_config"])
  grid = v["image_size"] // v["patch_size"]
  sam = sm.Sam(
      image_encoder=sm.ImageEncoderViT(
          img_size=v["image_size"], patch_size=v["patch_size"], embed_dim=v["hidden_size"],
          depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
          mlp_ratio=v["mlp_dim"] / v["hidden_size"], out_chans=v["output_channels"],
          qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
          use_rel_pos=True, window_size=v["window_size"],
          global_attn_indexes=v["global_attn_indexes"]),
      prompt_encoder=sm.PromptEncoder(
          embed_dim=p["hidden_size"], image_embedding_size=(grid, grid),
          input_image_size=(p["image_size"], p["image_size"]),
          mask_in_chans=p["mask_input_channels"]),
      mask_decoder=sm.MaskDecoder(
          num_multimask_outputs=3, transformer=sm.TwoWayTransformer(
              depth=d["num_hidden_layers"], embedding_dim=d["hidden_size"],
              mlp_dim=d["mlp_dim"], num_heads=d["num_attention_heads"]),
          transformer_dim=d["hidden_size"], iou_head_depth=3,
          iou_head_hidden_dim=d["iou_head_hidden_dim"])).double().eval()
  state = {k: v.double() for k, v in official.items() if k not in ("pixel_mean", "pixel_std")}
  sam.load_state_dict(state, strict=True)  # every official name exists, none is left over
  # The official PositionEmbeddingRandom computes in float32 whatever the model's dtype.
  pe = sam.prompt_encoder.pe_layer
  pe.register_buffer("positional_encoding_gaussian_matrix",
                     pe.positional_encoding_gaussian_matrix.float())
  masks, ious = [], []
  with torch.no_grad():
    emb = sam.image_encoder(pixels)
    np.testing.assert_allclose(nhwc(emb), ref["image_embeddings"], atol=1e-10)
    for i in range(pixels.shape[0]):
      sparse, dense = sam.prompt_encoder(
          points=(prompt["input_points"][i], prompt["input_labels"][i]),
          boxes=prompt["input_boxes"][i], masks=prompt["input_masks"][i:i + 1])
      sparse = sparse.double()  # float32 Fourier features (as fssjax computes them too)
      np.testing.assert_allclose(sparse[0].numpy(), ref["a_sparse"][i], atol=1e-5)
      np.testing.assert_allclose(nhwc(dense)[0], ref["a_dense"][i], atol=1e-10)
      m, q = sam.mask_decoder(image_embeddings=emb[i:i + 1],
                              image_pe=sam.prompt_encoder.get_dense_pe().double(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=True)
      masks.append(m[0].numpy())
      ious.append(q[0].numpy())
  ref["official_a_masks_multi"] = np.stack(masks)
  ref["official_a_iou_multi"] = np.stack(ious)
  err = np.abs(ref["official_a_masks_multi"] - ref["a_masks_multi"]).max()
  print(f"official vs transformers masks (LayerNorm eps 1e-5 vs 1e-6): max diff {err:.2e}")


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy().transpose(0, 2, 3, 1)


def main():
  if os.path.exists(ROOT):
    shutil.rmtree(ROOT)
  os.makedirs(ROOT)
  model = build()
  model.half().save_pretrained(os.path.join(ROOT, "hf"))
  official = official_state_dict(model.float())
  save_file({k: v.contiguous() for k, v in official.items()},
            os.path.join(ROOT, "official.safetensors"), metadata={"format": "pt"})
  check_official_pickle(official)
  # The reference is computed in float64 (the exact result for these weights and inputs), so
  # a float32 implementation is compared with the truth, not with PyTorch's float32 rounding.
  model = model.double()

  g = torch.Generator().manual_seed(2)
  ref = {}
  pixels = torch.randn(2, 3, 32, 32, generator=g).half().double()
  ref["pixel_values"] = nhwc(pixels).astype(np.float16)  # exact: the values are float16
  with torch.no_grad():
    vis = model.vision_encoder(pixels, output_hidden_states=True)
    assert len(vis.hidden_states) == 4  # the embeddings, then every block's output
    ref["hidden_states"] = np.stack([h.numpy() for h in vis.hidden_states[1:]])
    ref["image_embeddings"] = nhwc(vis.last_hidden_state)
    ref["image_pe"] = nhwc(model.get_image_wide_positional_embeddings())

    prompts = {
        "a": dict(input_points=torch.tensor([[[[3.0, 5.5], [20.25, 11.0]]],
                                             [[[30.0, 1.0], [9.5, 27.0]]]], dtype=torch.float64),
                  input_labels=torch.tensor([[[1, 0]], [[0, 1]]]),
                  input_boxes=torch.tensor([[[2.0, 4.0, 25.0, 18.5]], [[10.0, 0.0, 31.0, 29.0]]],
                                           dtype=torch.float64),
                  input_masks=torch.randn(2, 1, 32, 32, generator=g).half().double() * 4),
        "b": dict(input_points=torch.tensor([[[[7.0, 7.0], [1.0, 30.0]]],
                                             [[[16.0, 16.0], [0.0, 0.0]]]], dtype=torch.float64),
                  input_labels=torch.tensor([[[1, -1]], [[0, -10]]]),
                  input_boxes=None, input_masks=None),
    }
    for name, p in prompts.items():
      sparse, dense = model.prompt_encoder(**p)
      ref[f"{name}_points"] = p["input_points"][:, 0].numpy()
      ref[f"{name}_labels"] = p["input_labels"][:, 0].numpy().astype(np.int32)
      if p["input_boxes"] is not None:
        ref[f"{name}_boxes"] = p["input_boxes"][:, 0].numpy()
      if p["input_masks"] is not None:
        ref[f"{name}_masks"] = p["input_masks"][:, 0].numpy().astype(np.float16)  # exact
      ref[f"{name}_sparse"] = sparse[:, 0].numpy()
      ref[f"{name}_dense"] = nhwc(dense.expand(2, -1, -1, -1))
      for multi in ((True, False) if name == "a" else (True,)):
        out = model(pixel_values=pixels, multimask_output=multi, **p)
        tag = "multi" if multi else "single"
        ref[f"{name}_masks_{tag}"] = out.pred_masks[:, 0].numpy()
        ref[f"{name}_iou_{tag}"] = out.iou_scores[:, 0].numpy()

    official_reference(official, ref, pixels, prompts["a"])
    table = torch.randn(7, 4, generator=g).double()
    attn = model.vision_encoder.layers[0].attn
    ref["rel_table"] = table.numpy()
    ref["rel_5_5"] = SamVisionAttention.get_rel_pos(attn, 5, 5, table).numpy()
    ref["rel_3_6"] = SamVisionAttention.get_rel_pos(attn, 3, 6, table).numpy()
  ref = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in ref.items()}
  np.savez_compressed(os.path.join(ROOT, "reference.npz"),
                      **{k: np.ascontiguousarray(v) for k, v in ref.items()})
  for d, _, fs in os.walk(ROOT):
    for f in fs:
      os.chmod(os.path.join(d, f), 0o644)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  print(f"wrote {ROOT} ({total / 1024:.0f} KiB), transformers {transformers.__version__}, "
        f"torch {torch.__version__}")


if __name__ == "__main__":
  main()
