"""Loading diffusers-layout checkpoints: conversion rules, file variants and clear errors.

Uses the tiny fixtures in tests/fixtures/diffusers (numerical parity is in test_unet.py,
test_vae.py and test_clip_text.py); broken variants are written to tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn.clip_text import CLIPTextConfig, CLIPTextModel
from fssjax.nn.unet import UNet2DConditionModel, UNetConfig
from fssjax.nn.vae import AutoencoderKL, VAEConfig
from fssjax.methods.base import initialize
from fssjax.weights import diffusers as W

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
SD15 = os.path.join(FIXTURES, "sd15_tiny")


def raw(component: str, fixture: str = SD15) -> dict:
  stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
  return load_file(os.path.join(fixture, component, f"{stem}.safetensors"))


def test_load_pipeline_converts_every_component():
  sd = W.load_pipeline(SD15)
  assert isinstance(sd.unet, UNet2DConditionModel)
  assert isinstance(sd.vae, AutoencoderKL)
  assert isinstance(sd.text_encoder, CLIPTextModel)
  assert sd.model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
  assert sd.tokenizer("a photo")["input_ids"][0] == sd.tokenizer.bos_token_id
  unet_sd, vae_sd, text_sd = raw("unet"), raw("vae"), raw("text_encoder")
  p = sd.unet_params
  # Conv OIHW -> HWIO, linear [out, in] -> [in, out], GroupNorm weight -> scale.
  np.testing.assert_array_equal(p["conv_in"]["kernel"],
                                unet_sd["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["time_embedding"]["linear_1"]["kernel"],
                                unet_sd["time_embedding.linear_1.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(p["down_blocks_0"]["resnets_0"]["norm1"]["scale"],
                                unet_sd["down_blocks.0.resnets.0.norm1.weight"])
  ff = p["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]
  np.testing.assert_array_equal(
      ff["net_0"]["proj"]["kernel"],
      unet_sd["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"].T)
  attn1 = p["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
  assert "bias" not in attn1["to_q"] and set(attn1["to_out"]) == {"kernel", "bias"}
  # SD 1.5 layout: proj_in is a 1x1 conv; SD 2.1 layout: a linear.
  assert p["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 16, 16)
  _, p21 = W.load_unet(os.path.join(FIXTURES, "sd21_tiny"))
  assert p21["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (16, 16)
  np.testing.assert_array_equal(
      sd.vae_params["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
      vae_sd["encoder.mid_block.attentions.0.to_q.weight"].T)
  np.testing.assert_array_equal(
      sd.text_encoder_params["embeddings"]["token_embedding"]["embedding"],
      text_sd["text_model.embeddings.token_embedding.weight"])
  for tree in (sd.unet_params, sd.vae_params, sd.text_encoder_params):
    leaves = jax.tree.leaves(tree)
    assert leaves and all(a.dtype == jnp.float32 for a in leaves)


def test_shape_mismatch_names_the_key_and_shapes():
  config = UNetConfig.from_diffusers(W.read_config(os.path.join(SD15, "unet")))
  sd = raw("unet")
  key = "down_blocks.0.resnets.0.conv1.weight"
  sd[key] = sd[key][:, :8]
  with pytest.raises(ValueError) as e:
    W.unet_params_from_state_dict(config, sd)
  msg = str(e.value)
  assert key in msg and "(16, 8, 3, 3)" in msg and "(3, 3, 16, 16)" in msg


def test_missing_and_unexpected_tensors_are_named():
  config = UNetConfig.from_diffusers(W.read_config(os.path.join(SD15, "unet")))
  sd = raw("unet")
  del sd["mid_block.resnets.1.norm2.bias"]
  sd["conv_in_ref.weight"] = np.zeros((16, 8, 3, 3), np.float16)  # a DiffewS extra
  with pytest.raises(ValueError) as e:
    W.unet_params_from_state_dict(config, sd)
  assert "conv_in_ref.weight" in str(e.value)
  assert "mid_block/resnets_1/norm2/bias" in str(e.value)


def test_config_and_checkpoint_disagreeing_on_projection_type():
  cfg = W.read_config(os.path.join(SD15, "unet"))
  cfg["use_linear_projection"] = True  # the SD 1.5 checkpoint has 1x1 conv projections
  with pytest.raises(ValueError, match=r"proj_in\.weight"):
    W.unet_params_from_state_dict(UNetConfig.from_diffusers(cfg), raw("unet"))


def test_diffews_checkpoint_extras_via_the_low_level_api(tmp_path):
  unet_dir = tmp_path / "unet"
  shutil.copytree(os.path.join(SD15, "unet"), unet_dir)
  cfg = json.loads((unet_dir / "config.json").read_text())
  cfg["in_channels_ref"] = 8
  (unet_dir / "config.json").write_text(json.dumps(cfg))
  sd = W.read_state_dict(str(unet_dir), "diffusion_pytorch_model")
  sd["conv_in_ref.weight"] = np.ones((16, 8, 3, 3), np.float16)
  sd["conv_in_ref.bias"] = np.ones((16,), np.float16)
  save_file(sd, str(unet_dir / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match="in_channels_ref"):
    W.load_unet(str(tmp_path))
  with pytest.raises(ValueError, match="conv_in_ref"):
    W.load_unet(str(tmp_path), ignore_config_fields=("in_channels_ref",))
  extra = {k: sd.pop(k) for k in ("conv_in_ref.weight", "conv_in_ref.bias")}
  config = UNetConfig.from_diffusers(W.read_config(str(unet_dir)),
                                     ignore_fields=("in_channels_ref",))
  params = W.unet_params_from_state_dict(config, sd)
  assert params["conv_in"]["kernel"].shape == (3, 3, 4, 16)
  assert extra["conv_in_ref.weight"].shape == (16, 8, 3, 3)


def test_diffews_layout_pipeline_brings_its_support_conv(tmp_path):
  """A DiffewS-layout pipeline (unet/ with conv_in_ref.*): load_pipeline returns the support
  conv converted to HWIO, and the DiffewS method uses it instead of the repeat-and-halve init."""
  from fssjax import configlib  # pylint: disable=g-import-not-at-top
  from fssjax.methods import diffews  # pylint: disable=g-import-not-at-top
  root = tmp_path / "sd"
  shutil.copytree(SD15, root)
  unet_dir = root / "unet"
  cfg = json.loads((unet_dir / "config.json").read_text())
  cfg["in_channels_ref"] = 2 * cfg["in_channels"]
  (unet_dir / "config.json").write_text(json.dumps(cfg))
  sd = W.read_state_dict(str(unet_dir), "diffusion_pytorch_model")
  c0 = cfg["block_out_channels"][0]
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(c0, cfg["in_channels_ref"], 3, 3)).astype(np.float32)
  bias = rng.normal(size=(c0,)).astype(np.float32)
  save_file(dict(sd, **{"conv_in_ref.weight": weight, "conv_in_ref.bias": bias}),
            str(unet_dir / "diffusion_pytorch_model.safetensors"))
  pipe = W.load_pipeline(str(root))
  np.testing.assert_array_equal(pipe.support_conv["kernel"], weight.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(pipe.support_conv["bias"], bias)
  assert W.load_pipeline(SD15).support_conv is None

  c = configlib.base_config()
  c.method = "diffews"
  c.model.sd_path = str(root)
  method = diffews.DiffewS(c)
  batch = dict(query_image=np.zeros((1, 16, 16, 3), np.float32),
               support_images=np.zeros((1, 1, 16, 16, 3), np.float32),
               support_masks=np.zeros((1, 1, 16, 16), np.uint8))
  params, _ = initialize(method, jax.random.key(0), batch)
  np.testing.assert_array_equal(params["conv_in_support"]["kernel"],
                                weight.transpose(2, 3, 1, 0))
  # The published starting checkpoint has the tensors but no in_channels_ref field: the
  # channels (8) come from conv_in_ref.weight's shape.
  del cfg["in_channels_ref"]
  (unet_dir / "config.json").write_text(json.dumps(cfg))
  _, _, support = W.load_unet(str(unet_dir), return_support_conv=True)
  assert support["kernel"].shape == (3, 3, 8, c0)
  params, _ = initialize(diffews.DiffewS(c), jax.random.key(0), batch)
  np.testing.assert_array_equal(params["conv_in_support"]["kernel"],
                                weight.transpose(2, 3, 1, 0))
  # A field without tensors is an error naming both.
  cfg["in_channels_ref"] = 8
  (unet_dir / "config.json").write_text(json.dumps(cfg))
  save_file(sd, str(unet_dir / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match="in_channels_ref=8 but no conv_in_ref"):
    W.load_pipeline(str(root))


def test_pickles_need_allow_pickle(tmp_path):
  d = tmp_path / "text_encoder"
  d.mkdir()
  shutil.copy(os.path.join(SD15, "text_encoder", "config.json"), d / "config.json")
  (d / "model.bin").write_bytes(b"not opened without allow_pickle")
  with pytest.raises(ValueError, match="allow_pickle"):
    W.load_text_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    W.load_vae(str(tmp_path))


def _write_bf16_safetensors(path, tensors):
  """A safetensors file with BF16 tensors (the format numpy's safetensors API cannot write)."""
  header, blobs, offset = {}, [], 0
  for key, arr in tensors.items():
    data = np.ascontiguousarray(arr.astype(ml_dtypes.bfloat16)).tobytes()
    header[key] = {"dtype": "BF16", "shape": list(arr.shape),
                   "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_bf16_sharded_and_variant_files(tmp_path):
  # bf16 weights under a variant name.
  te = tmp_path / "bf16" / "text_encoder"
  te.mkdir(parents=True)
  shutil.copy(os.path.join(SD15, "text_encoder", "config.json"), te / "config.json")
  sd = raw("text_encoder")
  floats = {k: v.astype(np.float32) for k, v in sd.items() if v.dtype != np.int64}
  _write_bf16_safetensors(te / "model.bf16.safetensors", floats)
  with pytest.raises(FileNotFoundError):
    W.load_text_encoder(str(te))
  _, params = W.load_text_encoder(str(te), variant="bf16")
  np.testing.assert_array_equal(
      params["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"],
      floats["text_model.encoder.layers.1.mlp.fc1.weight"].astype(ml_dtypes.bfloat16)
      .astype(np.float32).T)
  # A sharded VAE (index.json + two shards) loads to the same params as the single file.
  vae_dir = tmp_path / "sharded" / "vae"
  vae_dir.mkdir(parents=True)
  shutil.copy(os.path.join(SD15, "vae", "config.json"), vae_dir / "config.json")
  vsd = raw("vae")
  keys = sorted(vsd)
  shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
  for shard, ks in shards.items():
    save_file({k: vsd[k] for k in ks}, str(vae_dir / shard))
  index = {"weight_map": {k: s for s, ks in shards.items() for k in ks}}
  (vae_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
  _, sharded = W.load_vae(str(vae_dir.parent))
  _, single = W.load_vae(SD15)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  # Legacy VAE attention names (query/key/value/proj_attn) load to the same params.
  legacy = {}
  for k, v in vsd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    legacy[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  config = VAEConfig.from_diffusers(W.read_config(os.path.join(SD15, "vae")))
  jax.tree.map(np.testing.assert_array_equal,
                             W.vae_params_from_state_dict(config, legacy), single)


def test_text_encoder_position_ids_are_checked():
  config = CLIPTextConfig.from_transformers(W.read_config(os.path.join(SD15, "text_encoder")))
  sd = raw("text_encoder")
  sd["text_model.embeddings.position_ids"] = sd["text_model.embeddings.position_ids"][:, ::-1]
  with pytest.raises(ValueError, match="position_ids"):
    W.text_encoder_params_from_state_dict(config, sd)
  sd = raw("text_encoder")
  sd["embeddings.extra.weight"] = sd.pop("text_model.embeddings.token_embedding.weight")
  with pytest.raises(ValueError, match="text_model"):
    W.text_encoder_params_from_state_dict(config, sd)


def test_model_index_must_name_supported_classes(tmp_path):
  root = tmp_path / "pipe"
  shutil.copytree(SD15, root)
  index = json.loads((root / "model_index.json").read_text())
  index["unet"] = ["diffusers", "UNet2DModel"]
  (root / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="UNet2DModel"):
    W.load_pipeline(str(root))
  with pytest.raises(FileNotFoundError):
    W.load_unet(str(tmp_path / "nowhere"))
