"""BLIP-2 Q-Former parity with transformers (fixtures by scripts/make_qformer_fixtures.py).

Two tiny random transformers Blip2Models (cross-attention every 2nd layer with erf GELU; every
layer with gelu_new), the Q-Former path run as Blip2Model runs it: query_tokens -> qformer ->
language_projection, with and without an image-feature padding mask. Tolerance: max |ours -
reference| <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn.qformer import (Blip2QFormerModel, QFormerConfig, QFormerVisualTokens,
                               init_params, load_qformer, qformer_params_from_state_dict)
from parity import assert_close  # tests/parity.py

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "qformer")


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", ["freq2", "freq1"])
def test_qformer_matches_transformers(name, ref):
  model, params = load_qformer(os.path.join(FIXTURES, name))
  cfg = model.config
  expect = {"freq2": (3, 2, 8, "gelu"), "freq1": (2, 1, 4, "gelu_new")}[name]
  assert (cfg.num_hidden_layers, cfg.cross_attention_frequency, cfg.num_query_tokens,
          cfg.hidden_act) == expect
  assert cfg.llm_hidden_size == 40 and cfg.encoder_hidden_size == 24
  layers = params["qformer"]["encoder"]
  # Cross-attention exactly in the layers transformers gives it (i % frequency == 0).
  for i in range(cfg.num_hidden_layers):
    assert ("crossattention" in layers[f"layer_{i}"]) == (i % cfg.cross_attention_frequency == 0)
    assert set(layers[f"layer_{i}"]["attention"]) == {"attention", "output"}

  @jax.jit
  def run(params, feats, mask):
    out = model.apply({"params": params}, feats, mask)
    inner = Blip2QFormerModel(cfg).apply(
        {"params": params["qformer"]},
        jnp.broadcast_to(params["query_tokens"], (feats.shape[0],) + params["query_tokens"].shape[1:]),
        feats, mask, output_hidden_states=True)
    return out, inner

  feats = ref[f"{name}/image_features"]
  for prefix, mask in (("", None), ("masked_", ref[f"{name}/encoder_mask"])):
    out, inner = run(params, feats, mask)
    p = f"{name}/{prefix}"
    assert out["tokens"].shape == (2, cfg.num_query_tokens, 40)
    assert_close(out["qformer"], ref[p + "last_hidden_state"], what=p + "last_hidden_state")
    assert_close(out["tokens"], ref[p + "tokens"], what=p + "tokens")
    assert_close(inner["hidden_states"][1], ref[p + "hidden1"], what=p + "hidden_states[1]")
    assert len(inner["hidden_states"]) == cfg.num_hidden_layers + 1
    assert_close(inner["pooler_output"], ref[p + "last_hidden_state"][:, 0], what=p + "pooler")
  # The mask matters: row 1 differs with and without it, row 0 (no padding) does not.
  masked, unmasked = ref[f"{name}/masked_tokens"], ref[f"{name}/tokens"]
  assert np.abs(masked[1] - unmasked[1]).max() > 1e-3
  assert_close(masked[0], unmasked[0], what="unpadded row")


def test_nhwc_features_and_padding_equivalence(ref):
  """NHWC input is flattened row-major; masked padding equals dropping those features."""
  model, params = load_qformer(os.path.join(FIXTURES, "freq2"))
  feats = ref["freq2/image_features"]  # [2, 10, 24]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x)["tokens"])
  flat = apply(params, feats)
  nhwc = apply(params, feats.reshape(2, 2, 5, 24))
  assert_close(nhwc, flat, tol=1e-6, what="NHWC vs [B, S, E]")
  alone = apply(params, feats[1:2, :7])
  assert_close(alone, ref["freq2/masked_tokens"][1:2], what="dropped vs masked padding")


def test_init_shapes_and_config_errors():
  cfg = QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, encoder_hidden_size=12, num_query_tokens=3,
                      llm_hidden_size=20)
  m = QFormerVisualTokens(cfg)
  shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4, 4, 12)))["params"]
  assert shapes["query_tokens"].shape == (1, 3, 16)
  assert shapes["language_projection"]["kernel"].shape == (16, 20)
  cross = shapes["qformer"]["encoder"]["layer_0"]["crossattention"]["attention"]
  assert cross["key"]["kernel"].shape == (12, 16) and cross["query"]["kernel"].shape == (16, 16)
  assert "crossattention" not in shapes["qformer"]["encoder"]["layer_1"]
  # numpy init: Flax's tree, BERT statistics.
  p = init_params(cfg, 0)
  assert jax.tree.structure(p) == jax.tree.structure(shapes)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(shapes)))
  assert abs(float(np.std(p["query_tokens"])) - 0.02) < 0.01
  ln = p["qformer"]["encoder"]["layer_1"]["output_query"]["LayerNorm"]
  assert (ln["scale"] == 1).all() and (ln["bias"] == 0).all()
  assert not p["language_projection"]["bias"].any()
  assert not np.array_equal(p["query_tokens"], init_params(cfg, 1)["query_tokens"])
  noproj = QFormerVisualTokens(QFormerConfig(**dict(cfg.__dict__, llm_hidden_size=None)))
  out = jax.eval_shape(noproj.init_with_output, jax.random.key(0), jnp.zeros((2, 5, 12)))[0]
  assert out["tokens"].shape == (2, 3, 16)
  with pytest.raises(ValueError, match="hidden_act"):
    QFormerConfig(hidden_act="swish")
  with pytest.raises(ValueError, match="divisible"):
    QFormerConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="model_type"):
    QFormerConfig.from_transformers({"model_type": "bert"})
  with pytest.raises(ValueError, match="use_qformer_text_input"):
    QFormerConfig.from_transformers({"model_type": "blip_2_qformer",
                                     "use_qformer_text_input": True})
  with pytest.raises(ValueError, match="encoder_hidden_size=12"):
    jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4, 13)))
  with pytest.raises(ValueError, match="encoder_attention_mask"):
    jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4, 12)), jnp.ones((1, 5)))


def test_loader_errors(tmp_path):
  src = os.path.join(FIXTURES, "freq2")
  sd = load_file(os.path.join(src, "model.safetensors"))
  cfg = QFormerConfig.from_transformers(json.load(open(os.path.join(src, "config.json"))))
  with pytest.raises(ValueError, match="query_tokens"):
    qformer_params_from_state_dict(cfg, {k: v for k, v in sd.items() if k != "query_tokens"})
  with pytest.raises(ValueError, match="missing Flax parameters.*crossattention"):
    qformer_params_from_state_dict(cfg, {k: v for k, v in sd.items()
                                         if "layer.2.crossattention.attention.key" not in k})
  # A config contradicting the tensors: the shape error names the tensor.
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  raw = json.loads((bad / "config.json").read_text())
  raw["qformer_config"]["intermediate_size"] = 40
  (bad / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"intermediate_query\.dense\.(weight|bias).*expects"):
    load_qformer(str(bad))
  # A text-input Q-Former's extra tensors are unexpected, not silently dropped.
  extra = tmp_path / "extra"
  shutil.copytree(src, extra)
  sd2 = dict(sd)
  sd2["qformer.encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 32), np.float32)
  save_file(sd2, str(extra / "model.safetensors"))
  with pytest.raises(ValueError, match="unexpected tensors.*layer.0.intermediate"):
    load_qformer(str(extra))
  with pytest.raises(FileNotFoundError):
    load_qformer(str(tmp_path / "nowhere"))
