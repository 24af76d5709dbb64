"""Parity of fssjax.nn.clip_text.CLIPTextModel with transformers (stored fixtures, float32).

sd15_tiny's encoder uses quick_gelu and the published key layout (`text_model.` prefix plus
the position_ids buffer); sd21_tiny's uses gelu and transformers 5's layout (no prefix).
Tolerance: max |ours - reference| <= 1e-4 * max(1, max |reference|) (observed ~1.5e-6).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn.clip_text import CLIPTextConfig
from fssjax.weights.diffusers import load_text_encoder, load_tokenizer
from parity import FIXTURES, assert_close  # tests/parity.py


@pytest.mark.parametrize("name,act", [("sd15_tiny", "quick_gelu"), ("sd21_tiny", "gelu")])
def test_clip_text_matches_transformers(name, act):
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    ref = {k[len(name) + 1:]: f[k] for k in f.files if k.startswith(f"{name}/text_")}
  model, params = load_text_encoder(os.path.join(FIXTURES, name))
  assert model.config.hidden_act == act

  @jax.jit
  def run(params, ids, mask):
    v = {"params": params}
    return (model.apply(v, ids, output_hidden_states=True),
            model.apply(v, ids, mask)["last_hidden_state"])

  out, masked = run(params, ref["text_ids"], ref["text_mask"])
  assert_close(out["last_hidden_state"], ref["text_last"], what="last_hidden_state")
  assert_close(out["pooler_output"], ref["text_pooled"], what="pooler_output")
  assert_close(out["hidden_states"][1], ref["text_hidden1"], what="hidden_states[1]")
  assert len(out["hidden_states"]) == model.config.num_hidden_layers + 1
  assert_close(masked, ref["text_last_masked"], what="padding mask")
  # Causality: changing the last token leaves every earlier position unchanged.
  ids2 = ref["text_ids"].copy()
  ids2[:, -1] = 7
  out2, _ = run(params, ids2, ref["text_mask"])
  np.testing.assert_allclose(out2["last_hidden_state"][:, :-1], out["last_hidden_state"][:, :-1],
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(out2["last_hidden_state"][:, -1])
                - np.asarray(out["last_hidden_state"][:, -1])).max() > 1e-3


def test_tokenizer_from_the_pipeline_directory():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    expected = f["sd15_tiny/tokenized"]
  tok = load_tokenizer(os.path.join(FIXTURES, "sd15_tiny"))
  ids = tok(["a photo", "cat dog"], padding="max_length", max_length=16)["input_ids"]
  np.testing.assert_array_equal(np.array(ids), expected)
  assert ids[0][0] == tok.bos_token_id and ids[0][3] == tok.eos_token_id


def test_clip_config_and_input_errors():
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig.from_transformers({"hidden_act": "relu"})
  with pytest.raises(ValueError, match="model_type"):
    CLIPTextConfig.from_transformers({"model_type": "clip_vision_model"})
  with pytest.raises(ValueError, match="num_attention_heads"):
    CLIPTextConfig.from_transformers({"hidden_size": 30, "num_attention_heads": 4})
  model, params = load_text_encoder(os.path.join(FIXTURES, "sd15_tiny"))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 17), jnp.int32)), params)
