"""CLIPModel (both towers, projections) against transformers (fixture made by
scripts/make_clip_fixtures.py; no torch here)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn import clip as nc
from fssjax.weights import clip as wc
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "clip")
TINY = os.path.join(FIXTURES, "tiny")
REF = np.load(os.path.join(FIXTURES, "reference.npz"))
TEXTS = ["red colour", "a photo of a cat", "the shape of a star"]


@pytest.fixture(scope="module")
def clip():
  return wc.load_clip_model(TINY)


def test_embeddings_match_transformers(clip):
  config, params = clip
  assert (config.projection_dim, config.vision.image_size, config.vision.patch_size,
          config.text.max_position_embeddings) == (8, 32, 8, 64)
  model = nc.CLIPModel(config)
  img = model.apply({"params": params}, REF["pixel_values"], method=model.get_image_features)
  assert_close(img, REF["image_embeds"], 1e-4, "image_embeds")
  txt = model.apply({"params": params}, REF["input_ids"], REF["attention_mask"],
                    method=model.get_text_features)
  assert_close(txt, REF["text_embeds"], 1e-4, "text_embeds")
  out = model.apply({"params": params}, REF["input_ids"], REF["attention_mask"],
                    REF["pixel_values"])
  assert_close(out["logits_per_image"], REF["logits_per_image"], 1e-4, "logits_per_image")
  # The texts differ (a loader that dropped the text tower's weights would not be caught by
  # one row).
  assert np.abs(REF["text_embeds"][0] - REF["text_embeds"][1]).max() > 1e-2


def test_tokenizer_and_params_tree(clip):
  config, params = clip
  ids, mask = wc.tokenize(wc.load_clip_tokenizer(TINY), TEXTS, config)
  assert ids.shape == (3, 64)
  np.testing.assert_array_equal(ids[:, :16], REF["input_ids"])
  np.testing.assert_array_equal(mask[:, :16], REF["attention_mask"])
  assert not mask[:, 16:].any()
  model = nc.CLIPModel(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), REF["input_ids"],
                          REF["attention_mask"], REF["pixel_values"])["params"]
  got = jax.tree.map(np.shape, params)
  assert got == jax.tree.map(lambda s: s.shape, shapes)


def test_refuses_partial_or_odd_checkpoints(tmp_path):
  state = load_file(os.path.join(TINY, "model.safetensors"))
  with open(os.path.join(TINY, "config.json")) as f:
    raw = json.load(f)
  d = tmp_path / "no_proj"
  d.mkdir()
  save_file({k: v for k, v in state.items() if k != "text_projection.weight"},
            str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="text_projection.weight"):
    wc.load_clip_model(str(d))
  d2 = tmp_path / "extra"
  shutil.copytree(TINY, d2)
  save_file(dict(state, **{"extra.weight": np.zeros(2, np.float16)}),
            str(d2 / "model.safetensors"))
  with pytest.raises(ValueError, match="extra.weight"):
    wc.load_clip_model(str(d2))
  d3 = tmp_path / "vision_only"
  d3.mkdir()
  (d3 / "config.json").write_text(json.dumps(raw["vision_config"]))
  with pytest.raises(ValueError, match="CLIPModel config"):
    wc.load_clip_model(str(d3))
