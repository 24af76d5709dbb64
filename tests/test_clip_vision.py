"""CLIP ViT vision tower against transformers' CLIPVisionModel (fixtures made by
scripts/make_llava_fixtures.py; no torch here)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn import clip_vision as cv
from fssjax.weights import llava as wv
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llava")
REF = np.load(os.path.join(FIXTURES, "reference.npz"))


@pytest.fixture(scope="module")
def tower():
  return wv.load_clip_vision(os.path.join(FIXTURES, "clip"))


def test_hidden_states_match_transformers(tower):
  config, params = tower
  assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size,
          config.hidden_act) == (16, 2, 16, 4, "quick_gelu")
  out = jax.jit(lambda p, x: cv.CLIPVisionModel(config).apply(
      {"params": p}, x, output_hidden_states=True))(params, REF["pixel_values"])
  assert len(out["hidden_states"]) == 3  # embeddings + each layer, as transformers
  for i, h in enumerate(out["hidden_states"]):
    assert_close(h, REF[f"clip/hidden_states_{i}"], 1e-4, f"hidden_states[{i}]")
  assert_close(out["last_hidden_state"], REF["clip/last_hidden_state"], 1e-4, "last")
  assert_close(out["pooler_output"], REF["clip/pooler_output"], 1e-4, "pooler")
  # The layers differ from each other (the test would catch a repeated or skipped layer).
  assert np.abs(REF["clip/hidden_states_1"] - REF["clip/hidden_states_2"]).max() > 1e-2
  plain = cv.CLIPVisionModel(config).apply({"params": params}, REF["pixel_values"])
  assert plain["hidden_states"] == ()


def test_clipmodel_layout_with_prefix_and_text_tower(tmp_path, tower):
  """A CLIPModel directory (vision_model.* + text_model.* keys, nested vision_config) loads the
  same tower; the text tower and projections are ignored."""
  d = tmp_path / "clip_full"
  d.mkdir()
  state = load_file(os.path.join(FIXTURES, "clip", "model.safetensors"))
  full = {"vision_model." + k: v for k, v in state.items()}
  full["text_model.embeddings.token_embedding.weight"] = np.zeros((4, 8), np.float16)
  full["visual_projection.weight"] = np.zeros((8, 16), np.float16)
  full["logit_scale"] = np.zeros((), np.float32)
  full["vision_model.embeddings.position_ids"] = np.arange(17)[None].astype(np.int64)
  save_file(full, str(d / "model.safetensors"))
  with open(os.path.join(FIXTURES, "clip", "config.json")) as f:
    vision = json.load(f)
  (d / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision,
                                             "text_config": {}}))
  config, params = wv.load_clip_vision(str(d))
  assert config == tower[0]
  jax.tree.map(np.testing.assert_array_equal, params, tower[1])


def test_vit_l_14_336_preset_shapes():
  config = cv.clip_vision_config("vit_l_14_336")
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
          config.patch_size, config.image_size, config.hidden_act) == (
              1024, 24, 16, 14, 336, "quick_gelu")
  model = cv.CLIPVisionModel(config)
  x = jax.ShapeDtypeStruct((1, 336, 336, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
  p = shapes["params"]
  assert p["embeddings"]["position_embedding"]["embedding"].shape == (577, 1024)
  assert p["embeddings"]["patch_embedding"]["kernel"].shape == (14, 14, 3, 1024)
  assert p["encoder"]["layers_23"]["mlp"]["fc1"]["kernel"].shape == (1024, 4096)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
  assert n == 303_507_456  # transformers' CLIPVisionModel (openai/clip-vit-large-patch14-336)
  out = jax.eval_shape(lambda v, a: model.apply(v, a, output_hidden_states=True), shapes, x)
  assert len(out["hidden_states"]) == 25
  assert out["hidden_states"][-2].shape == (1, 577, 1024)
  with pytest.raises(ValueError, match="unknown CLIP vision preset 'vit_x'"):
    cv.clip_vision_config("vit_x")


def test_bf16_close(tower):
  config, params = tower
  out = cv.CLIPVisionModel(config, dtype=jnp.bfloat16).apply(
      {"params": params}, REF["pixel_values"], output_hidden_states=True)
  assert out["hidden_states"][-1].dtype == jnp.bfloat16
  err = np.abs(np.asarray(out["last_hidden_state"], np.float32)
               - REF["clip/last_hidden_state"]).max()
  assert err < 0.05 * np.abs(REF["clip/last_hidden_state"]).max(), err


def test_errors_name_the_problem(tmp_path, tower):
  config, params = tower
  with pytest.raises(ValueError,
                     match=r"pixel_values has shape \(2, 3, 16, 16\).*\[B, 16, 16, 3\]"):
    cv.CLIPVisionModel(config).apply({"params": params}, REF["pixel_values"].transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="hidden_act = 'relu' is not supported"):
    cv.CLIPVisionConfig.from_hf({"hidden_act": "relu"}, "x.json")
  with pytest.raises(ValueError, match="x.json: vision model_type = 'siglip_vision_model'"):
    cv.CLIPVisionConfig.from_hf({"model_type": "siglip_vision_model"}, "x.json")
  d = tmp_path / "clip"
  shutil.copytree(os.path.join(FIXTURES, "clip"), d)
  state = load_file(str(d / "model.safetensors"))
  bad = dict(state)
  bad["encoder.layers.1.mlp.fc2.weight"] = bad["encoder.layers.1.mlp.fc2.weight"][:, :5]
  save_file(bad, str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'encoder\.layers\.1\.mlp\."
                                       r"fc2\.weight' has shape \(16, 5\)"):
    wv.load_clip_vision(str(d))
  bad = dict(state)
  del bad["post_layernorm.bias"]
  save_file(bad, str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing CLIP vision tensors.*post_layernorm/bias"):
    wv.load_clip_vision(str(d))
  save_file(dict(state, **{"encoder.extra": state["post_layernorm.bias"]}),
            str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.extra'"):
    wv.load_clip_vision(str(d))
